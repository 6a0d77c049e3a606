"""``zim-lightning matte``: matte one object of one image from a box or points (ZIM paper, Sec. 3.3:
promptable matting with box and point prompts).

``zim-lightning matte IMAGE (--box x1,y1,x2,y2 | --point x,y[,label] ...) [--model NAME |
--run-config RUN/config.yaml] [--checkpoint PATH] --out DIR`` writes ``<stem>_alpha.png`` (8-bit
grayscale alpha) and ``<stem>_cutout.png`` (the image as RGBA with that alpha) into ``DIR``, using
:class:`~zim_lightning.predictor.ZimPredictor`. Coordinates are ``(X, Y)`` pixels of the image as it
is displayed (its EXIF orientation applied, as the outputs are); a point's label is 1 (foreground, the
default) or 0 (background). A value starting with ``-`` needs the ``=`` form (``--box=-5,0,50,50``),
or the argument parser takes it for an option.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from zim_lightning.images import alpha_to_uint8, read_rgb, read_transparency, save_png

log = logging.getLogger(__name__)

#: Point labels accepted on the command line (SAM's convention).
POINT_LABELS: tuple[int, ...] = (0, 1)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """Parse ``x1,y1,x2,y2`` (pixels) into a box with x1 < x2 and y1 < y2."""
    parts = text.split(",")
    try:
        x1, y1, x2, y2 = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--box expects four numbers x1,y1,x2,y2 (pixels), got {text!r}"
        ) from None
    if not (x1 < x2 and y1 < y2):
        raise argparse.ArgumentTypeError(
            f"--box expects x1 < x2 and y1 < y2 (top-left then bottom-right corner), got {text!r}"
        )
    return x1, y1, x2, y2


def parse_point(text: str) -> tuple[float, float, int]:
    """Parse ``x,y`` or ``x,y,label`` (pixels; label 1 foreground, 0 background)."""
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--point expects x,y or x,y,label (pixels, label 0 or 1), got {text!r}"
        ) from None
    if label not in POINT_LABELS:
        raise argparse.ArgumentTypeError(
            f"--point label must be 0 (background) or 1 (foreground), got {text!r}"
        )
    return x, y, label


def _check_inside(name: str, coords: list[tuple[float, float]], width: int, height: int) -> str | None:
    for x, y in coords:
        if not (0 <= x <= width and 0 <= y <= height):
            return f"{name} ({x:g}, {y:g}) lies outside the {width}x{height} image"
    return None


def output_paths(out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Where :func:`write_outputs` writes the matte and the cut-out of the image ``stem``."""
    return out_dir / f"{stem}_alpha.png", out_dir / f"{stem}_cutout.png"


def write_outputs(
    image: np.ndarray,
    alpha: np.ndarray,
    out_dir: Path,
    stem: str,
    transparency: np.ndarray | None = None,
) -> tuple[Path, Path]:
    """Write the alpha matte and the RGBA cutout.

    Args:
        image: HxWx3 uint8 RGB.
        alpha: HxW float alpha in [0, 1].
        out_dir: folder, created if needed.
        stem: file name stem of the input image.
        transparency: the input's own HxW uint8 alpha channel, or None: the cut-out keeps what the input
            hid (its opacity is the matte's times the input's); the alpha PNG is the matte alone.

    Returns:
        ``(alpha_path, cutout_path)``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    alpha8 = alpha_to_uint8(alpha)
    alpha_path, cutout_path = output_paths(out_dir, stem)
    save_png(alpha8, alpha_path)
    opacity = alpha8
    if transparency is not None:
        opacity = np.round(alpha8.astype(np.float32) * transparency.astype(np.float32) / 255.0).astype(
            np.uint8
        )
    save_png(np.dstack([image, opacity]), cutout_path)
    return alpha_path, cutout_path


class _StoreOnce(argparse.Action):
    """Store an option's value, refusing a second one (the command mattes one box)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string}: given twice; this command mattes one box per run")
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    from zim_lightning.model_options import add_precision_argument, add_zim_arguments

    parser = argparse.ArgumentParser(
        prog="zim-lightning matte",
        description="Matte one object of an image from a box or points; writes <stem>_alpha.png and "
        "<stem>_cutout.png. Coordinates are (X, Y) pixels of the image as displayed (EXIF orientation "
        "applied).",
    )
    parser.add_argument("image", type=Path, help="input image (any format PIL reads)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--box", type=parse_box, action=_StoreOnce, metavar="X1,Y1,X2,Y2", help="box prompt")
    prompt.add_argument(
        "--point",
        type=parse_point,
        action="append",
        metavar="X,Y[,LABEL]",
        help="point prompt, repeatable; LABEL 1 foreground (default) or 0 background",
    )
    add_zim_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_precision_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``zim-lightning matte``."""
    from zim_lightning.command_checks import check_out_folder, device_for_command
    from zim_lightning.model_options import zim_for_command

    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        image = read_rgb(args.image)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    height, width = image.shape[:2]
    if args.box is not None:
        x1, y1, x2, y2 = args.box
        problem = _check_inside("--box corner", [(x1, y1), (x2, y2)], width, height)
    else:
        problem = _check_inside("--point", [(x, y) for x, y, _ in args.point], width, height)
    if problem:
        parser.error(problem)
    check_out_folder(parser, args.out)
    for output in output_paths(args.out, args.image.stem):
        if output.is_dir():
            parser.error(f"--out: {str(output)!r}, where an output goes, is a folder")
    device = device_for_command(parser, args.device)

    from zim_lightning.predictor import ZimPredictor

    predictor = ZimPredictor(zim_for_command(parser, args).eval().to(device), precision=args.precision)
    try:
        predictor.set_image(image)
    except ValueError as err:  # an image the network cannot take (e.g. 1x3000 pixels)
        parser.error(f"{args.image}: {err}")
    if args.box is not None:
        masks, _, _ = predictor.predict(box=np.array(args.box, dtype=np.float32), multimask_output=False)
    else:
        points = np.array([(x, y) for x, y, _ in args.point], dtype=np.float32)
        labels = np.array([label for _, _, label in args.point], dtype=np.float32)
        masks, _, _ = predictor.predict(point_coords=points, point_labels=labels, multimask_output=False)
    alpha_path, cutout_path = write_outputs(
        image, masks[0], args.out, args.image.stem, transparency=read_transparency(args.image)
    )
    print(f"wrote {alpha_path}")
    print(f"wrote {cutout_path}")
    return 0
