"""``zim-lightning build-sa1b-matte``: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException

from zim_lightning.sa1b_matte.geometry import MODES, CropConfig
from zim_lightning.sa1b_matte.job import build, print_summary


def add_converter_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    """``--checkpoint CKPT`` (``args.converter``), the converter's weights (the builder's, and its
    benchmark's); without it the converter keeps random weights."""
    p.add_argument(
        "--checkpoint",
        "--converter",
        dest="converter",
        metavar="CKPT",
        default=None,
        help="converter checkpoint (state dict or Lightning .ckpt); --converter is the older name",
    )


def add_crop_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`CropConfig` (the builder's, and its benchmark's)."""
    defaults = CropConfig()
    p.add_argument(
        "--mode", choices=MODES, default=defaults.mode, help="per-mask crop or whole image (default crop)"
    )
    p.add_argument(
        "--crop-size",
        type=int,
        default=defaults.crop_size,
        help="converter input side, multiple of 32 (1024)",
    )
    p.add_argument(
        "--context", type=float, default=defaults.context, help="crop mode: context around the box (0.5)"
    )
    p.add_argument(
        "--min-crop",
        type=int,
        default=defaults.min_crop,
        help="crop mode: smallest crop side in pixels (128)",
    )
    p.add_argument(
        "--margin", type=float, default=defaults.margin, help="matte box margin, fraction of the box (0.1)"
    )
    p.add_argument(
        "--clamp",
        action=argparse.BooleanOptionalAction,
        default=defaults.clamp,
        help="zero the matte beyond the margin from the mask (default on)",
    )


def crop_config(args: argparse.Namespace) -> CropConfig:
    """The :class:`CropConfig` of options parsed with :func:`add_crop_arguments`."""
    return CropConfig(
        crop_size=args.crop_size,
        mode=args.mode,
        context=args.context,
        min_crop=args.min_crop,
        margin=args.margin,
        clamp=args.clamp,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zim-lightning build-sa1b-matte",
        description="Convert SA-1B masks into SA1B-Matte shards with the label converter (resumable).",
    )
    p.add_argument(
        "--sa1b", nargs="+", required=True, help="SA-1B shards: directories, brace patterns or paths"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory for SA1B-Matte shards")
    add_converter_checkpoint_argument(p)
    p.add_argument(
        "--model",
        default=None,
        help="converter architecture (default: the one a `zim-lightning fit` checkpoint carries, else "
        "converter_hiera_b_plus); without --checkpoint: random weights",
    )
    add_crop_arguments(p)
    p.add_argument("--batch-size", type=int, default=16, help="masks per converter forward (16)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank (4)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, gpu, cpu)")
    p.add_argument("--devices", default="auto", help="devices per node (auto, N)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (SLURM / torchrun set the rest)")
    p.add_argument(
        "--precision", default=None, help="Trainer precision (default bf16-mixed on GPU, else 32-true)"
    )
    from zim_lightning.speed import COMPILE_MODES  # here: spawned DataLoader workers import this package

    p.add_argument(
        "--accept-truncated",
        action="store_true",
        help="finish shards whose input tar is damaged with what can be read (default: leave them "
        "unfinished, with a note, for a rerun after fetching them again)",
    )
    p.add_argument("--channels-last", action="store_true", help="NHWC convolution weights (GPUs)")
    p.add_argument(
        "--compile", default=None, choices=COMPILE_MODES, help="torch.compile mode (default: eager)"
    )
    return p


def launched_layout(devices: str | int, num_nodes: int) -> tuple[str | int, int]:
    """``(devices, num_nodes)`` for the Trainer: under torchrun (``LOCAL_WORLD_SIZE``, ``WORLD_SIZE``),
    ``--devices auto`` means one device per process it launched and ``--num-nodes 1`` the nodes it spans.
    Lightning's own ``auto`` counts visible GPUs, one CPU, so CPU processes would each build alone."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    world = os.environ.get("WORLD_SIZE", "")
    if not (local.isdigit() and world.isdigit()) or int(local) < 1:
        return devices, num_nodes
    if devices == "auto":
        devices = int(local)
    if num_nodes == 1 and int(world) > int(local):
        num_nodes = int(world) // int(local)
    return devices, num_nodes


def main(argv: list[str] | None = None) -> int:
    """`zim-lightning build-sa1b-matte`; returns 0 when every shard is complete, 1 if not, 2 on bad input."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    devices: str | int = int(args.devices) if str(args.devices).isdigit() else args.devices
    devices, num_nodes = launched_layout(devices, args.num_nodes)
    try:
        config = crop_config(args)
        summary = build(
            sa1b=args.sa1b,
            out=args.out,
            model=args.model,
            checkpoint=args.converter,
            config=config,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            accelerator=args.accelerator,
            devices=devices,
            num_nodes=num_nodes,
            precision=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            accept_truncated=args.accept_truncated,
        )
    except ValueError as error:
        print(f"zim-lightning build-sa1b-matte: error: {error}", file=sys.stderr)
        return 2
    except SIGTERMException as stop:  # Lightning's own (no message), or the error the signal caused
        print(
            f"zim-lightning build-sa1b-matte: {str(stop) or 'stopped by SIGTERM'}; a rerun resumes",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except OSError as error:  # a full disk, a permission: what was finished stays finished
        name = getattr(error, "filename", None)
        where = f" ({name})" if name and str(name) not in str(error) else ""
        print(
            f"zim-lightning build-sa1b-matte: error: {error}{where}; finished shards are kept, and a rerun "
            "resumes with the others",
            file=sys.stderr,
        )
        return 2
    if summary["rank"] == 0:
        print_summary(summary, args.out)
    return 0 if not summary["missing"] else 1
