"""Pack a matting or segmentation dataset (a folder of images, a folder of alphas or masks) into shards.

The label converter trains on matting shards (image + alpha) mixed with segmentation shards (image +
mask, for STL), in the format of docs/architecture.md, "File formats": ``<key>.jpg`` (or ``<key>.png``)
the image's own bytes, ``<key>.alpha.png`` an 8-bit alpha or ``<key>.mask.png`` a 0 / 255 mask, and
``<key>.json`` ``{"kind": ..., "source": ...}``. Public matting sets (AM-2K, P3M, Distinctions-646,
AIM-500, ...) ship as two folders whose files share a stem, which is what this reads::

    zim-lightning pack-shards --images AM-2K/train/original --alphas AM-2K/train/mask \\
        --out data/matting/train --name matting
    zim-lightning pack-shards --images seg/images --masks seg/masks --out data/seg --name seg

Alphas are normalised as the shard reader expects them: 16-bit grayscale scaled to 8 bits, three equal
channels taken as one; masks are thresholded at the midpoint. A pair whose image and alpha differ in
size, or that cannot be decoded, is skipped and listed. Shards are written atomically and the same input
gives byte-identical shards, so a rerun replaces them safely. ``<name>.pack.json`` beside them records
the folders they came from: packing other folders under the same ``--out`` and ``--name`` is refused
(it would replace those shards) unless ``--overwrite`` says so. It says ``"complete": false`` while a
run writes (an interrupted run's shards may be fewer, or an earlier run's), and ``true`` with the
number of shards and samples at the end; a run removes the temporary files a killed one left.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from zim_lightning.command_checks import out_folder_problem
from zim_lightning.data.decode import decode_gray
from zim_lightning.data.skips import CorruptSample
from zim_lightning.data.tar_writer import PARTIAL_SUFFIX, encode_png, write_atomic, write_tar

log = logging.getLogger(__name__)

#: Image files read, by suffix, and the shard member each is stored under (its bytes are kept).
IMAGE_SUFFIXES: dict[str, str] = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
#: Alpha / mask files read, in the order they are looked for.
LABEL_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
KINDS: tuple[str, ...] = ("fine", "solid")
#: Shard name prefixes: safe in file names, globs and brace patterns.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class PackSummary:
    """What :func:`pack` wrote and left out."""

    shards: list[Path]
    samples: int
    skipped: list[str]
    unmatched_images: list[str]
    unmatched_labels: list[str]


def _key(stem: str, taken: set[str]) -> str:
    # webdataset splits a member name at the first dot of its base name: keys must hold none; and keys
    # starting with "__" are metadata the readers skip
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem).lstrip("_") or "sample"
    unique, n = key, 1
    while unique in taken:
        n += 1
        unique = f"{key}_{n}"
    taken.add(unique)
    return unique


def _files(folder: Path, suffixes: tuple[str, ...] | dict[str, str]) -> dict[str, Path]:
    """stem -> file of ``folder`` with one of ``suffixes`` (case-insensitive); for a stem with several,
    the one whose suffix comes first."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder")
    order = list(suffixes)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if not (path.is_file() and suffix in order):
            continue
        kept = found.get(path.stem)
        if kept is None or order.index(suffix) < order.index(kept.suffix.lower()):
            found[path.stem] = path
    return found


def _sample(
    image_path: Path, label_path: Path, *, key: str, mask: bool, kind: str, source: str
) -> list[tuple[str, bytes]]:
    """The members of one sample. Raises CorruptSample for a pair the shard reader would skip."""
    image_bytes = image_path.read_bytes()
    try:
        # decoded whole: verify() reads no JPEG scan data, so a truncated JPEG would pass it
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            width, height = image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptSample(
            f"cannot decode image {image_path.name} ({error})", key=key, reason="corrupt_image"
        ) from error
    label = decode_gray(label_path.read_bytes(), key=f"{key} ({label_path.name})")
    if label.shape != (height, width):
        raise CorruptSample(
            f"{label_path.name} is {label.shape[1]}x{label.shape[0]}, its image {width}x{height}",
            key=key,
            reason="corrupt_image",
        )
    if mask:  # 0 / 255 masks, or 0 / 1 ones (saved as class indices)
        label = np.where(label > (127 if label.max() > 1 else 0), 255, 0).astype(np.uint8)
    if not label.any():
        raise CorruptSample(f"{label_path.name} is empty", key=key, reason="empty_mask")
    member = IMAGE_SUFFIXES[image_path.suffix.lower()]
    meta = {"kind": kind, "source": source}
    return [
        (f"{key}.{member}", image_bytes),
        (f"{key}.{'mask' if mask else 'alpha'}.png", encode_png(label)),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


def pack(
    *,
    images: str | Path,
    labels: str | Path,
    out: str | Path,
    masks: bool = False,
    name: str | None = None,
    shard_size: int = 256,
    kind: str | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> PackSummary:
    """Pack image / alpha (or mask) pairs that share a file stem into numbered shards.

    Args:
        images: folder of images (jpg, png).
        labels: folder of alphas (or masks with ``masks``), the same stems as the images.
        out: folder for ``<name>-000000.tar``, ``<name>-000001.tar``, ... (created).
        masks: the labels are segmentation masks (STL shards) rather than alphas.
        name: shard name prefix (default ``seg`` with ``masks``, else ``matting``).
        shard_size: samples per shard.
        kind: ``"fine"`` or ``"solid"``, recorded per sample (default ``solid`` for masks, else ``fine``).
        source: recorded per sample as ``<source>/<image file name>`` (default: the images folder's name).
        overwrite: replace shards of this name that other folders were packed into.

    Returns:
        The shards written and what was left out.

    Raises:
        ValueError: a bad option, no pair to pack, or ``out`` holds shards of this name packed from other
            folders (without ``overwrite``).
        FileNotFoundError: a folder does not exist.
    """
    images, labels, out = Path(images), Path(labels), Path(out)
    kind = kind or ("solid" if masks else "fine")
    name = name or ("seg" if masks else "matting")
    _check_options(out=out, name=name, kind=kind, shard_size=shard_size)
    source = source or images.name
    image_files, label_files = _files(images, IMAGE_SUFFIXES), _files(labels, LABEL_SUFFIXES)
    stems = sorted(set(image_files) & set(label_files))
    if not stems:
        raise ValueError(
            f"no image in {str(images)!r} has an {'mask' if masks else 'alpha'} of the same file stem in "
            f"{str(labels)!r} ({len(image_files)} images, {len(label_files)} label files)"
        )
    inputs = {"images": str(images.resolve()), "labels": str(labels.resolve()), "masks": masks}
    if not overwrite:
        _check_out(out, name, inputs)
    for leftover in _shards_named(out, name, partial=True):  # a killed run's (an interrupted one's go)
        leftover.unlink()
    taken: set[str] = set()
    keys = {stem: _key(stem, taken) for stem in stems}
    from rich.progress import track

    # Shards fill with good pairs only (a bad pair leaves no gap), and are written as they fill, so the
    # dataset never has to fit in memory; a set with no good pair writes nothing.
    shards: list[Path] = []
    skipped: list[str] = []
    pending: list[tuple[str, bytes]] = []
    count = 0

    def flush() -> None:
        out.mkdir(parents=True, exist_ok=True)
        if not shards:  # before the first shard, so that an interrupted run is recognised as this one's
            _write_record(out, name, {**inputs, "complete": False})
        path = out / f"{name}-{len(shards):06d}.tar"
        write_tar(path, pending, compress=False)
        shards.append(path)
        pending.clear()

    for stem in track(stems, description=f"packing {len(stems)} pairs", disable=len(stems) < 2 * shard_size):
        try:
            pending += _sample(
                image_files[stem],
                label_files[stem],
                key=keys[stem],
                mask=masks,
                kind=kind,
                source=f"{source}/{image_files[stem].name}",
            )
            count += 1
        except (CorruptSample, OSError) as error:
            log.warning("skipped %s: %s", image_files[stem].name, error)
            skipped.append(f"{image_files[stem].name} ({error})")
            continue
        if count % shard_size == 0:
            flush()
    if pending:
        flush()
    if not shards:
        raise ValueError(f"none of the {len(stems)} pairs could be packed: {'; '.join(skipped[:3])}")
    # a rerun with fewer shards (another --shard-size) must not leave the earlier run's tail behind
    for stale in _shards_named(out, name):
        if stale not in shards:
            stale.unlink()
            log.info("removed %s, left by an earlier run", stale)
    _write_record(out, name, {**inputs, "complete": True, "shards": len(shards), "samples": count})
    return PackSummary(
        shards=shards,
        samples=count,
        skipped=skipped,
        unmatched_images=sorted(image_files[s].name for s in set(image_files) - set(label_files)),
        unmatched_labels=sorted(label_files[s].name for s in set(label_files) - set(image_files)),
    )


def _check_options(*, out: Path, name: str, kind: str, shard_size: int) -> None:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    problem = out_folder_problem(out)
    if problem is not None:
        raise ValueError(f"out {problem}")
    if not NAME.fullmatch(name):
        raise ValueError(
            f"name must start with a letter or digit and hold only letters, digits, '.', '_' and '-' (it "
            f"names the shard files and goes into brace patterns such as {{000000..000009}}), got {name!r}"
        )


def _inputs_path(out: Path, name: str) -> Path:
    return out / f"{name}.pack.json"


def _write_record(out: Path, name: str, record: dict) -> None:
    write_atomic(_inputs_path(out, name), json.dumps(record, indent=1).encode())


def _shards_named(out: Path, name: str, *, partial: bool = False) -> list[Path]:
    """The shards of ``name`` in ``out``; with ``partial``, :func:`write_tar`'s temporary files of them."""
    shard = rf"{re.escape(name)}-\d{{6}}\.tar"
    pattern = re.compile(rf"\.{shard}{re.escape(PARTIAL_SUFFIX)}" if partial else shard)
    return sorted(p for p in out.iterdir() if pattern.fullmatch(p.name)) if out.is_dir() else []


def _check_out(out: Path, name: str, inputs: dict) -> None:
    """Refuse to replace shards of ``name`` in ``out`` that other folders (or an unknown run) were packed into."""
    existing = _shards_named(out, name)
    if not existing:
        return
    try:
        earlier = json.loads(_inputs_path(out, name).read_text())
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and {key: earlier.get(key) for key in inputs} == inputs:
        return  # a rerun of the same folders (finished or not): its shards replace theirs
    packed_from = (
        f"packed from {earlier['images']} and {earlier['labels']}"
        if isinstance(earlier, dict) and {"images", "labels"} <= set(earlier)
        else f"with no {_inputs_path(out, name).name} saying what they hold"
    )
    raise ValueError(
        f"{str(out)!r} already holds {len(existing)} shards named {name}-*.tar, {packed_from}; this run "
        f"would replace them with {inputs['images']} and {inputs['labels']}: give another --name or --out, "
        "or --overwrite to replace them"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zim-lightning pack-shards",
        description="Pack a folder of images and a folder of alphas (or masks) sharing file stems into "
        "matting (or segmentation) shards for the label converter.",
    )
    p.add_argument("--images", required=True, type=Path, help="folder of images (jpg, png)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--alphas", type=Path, help="folder of alpha mattes: matting shards")
    labels.add_argument("--masks", type=Path, help="folder of segmentation masks: STL shards")
    p.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    p.add_argument(
        "--name",
        default=None,
        help="shard name prefix: letters, digits, ._- (default matting, or seg with --masks)",
    )
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (256)")
    p.add_argument(
        "--kind", choices=KINDS, default=None, help="sample kind (default fine, solid with --masks)"
    )
    p.add_argument(
        "--source",
        default=None,
        help="recorded per sample as SOURCE/<image file name> (default: the images folder's name)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards of this --name in --out that other folders were packed into",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """``zim-lightning pack-shards``; returns 0, or 2 on bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = pack(
            images=args.images,
            labels=args.masks if args.masks is not None else args.alphas,
            out=args.out,
            masks=args.masks is not None,
            name=args.name,
            shard_size=args.shard_size,
            kind=args.kind,
            source=args.source,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {len(summary.shards)} shards, {summary.samples} samples, to {args.out}")
    for what, names in (
        ("skipped", summary.skipped),
        ("images without a label", summary.unmatched_images),
        ("labels without an image", summary.unmatched_labels),
    ):
        if names:
            print(f"{what}: {len(names)}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
