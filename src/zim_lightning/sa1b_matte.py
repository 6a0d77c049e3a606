"""The SA1B-Matte builder: SA-1B segmentation masks -> alpha mattes (ZIM paper, Sec. 3.1, "SA1B-Matte").

ZIM trains on SA1B-Matte, SA-1B whose masks the label converter (Sec. 3.1) has turned into alpha mattes,
one converter prediction per mask. ``zim-lightning build-sa1b-matte`` writes it:

    zim-lightning build-sa1b-matte --sa1b data/sa1b --checkpoint converter.ckpt --out data/sa1b_matte

Input: SA-1B shards (``sa_NNNNNN.tar``, gzip or plain) given as a directory, a brace pattern
(``sa_{000000..000009}.tar``) or a list. Each input shard gives one output shard of the same name in
OUT, a plain (uncompressed) tar in the SA1B-Matte format (docs/architecture.md, "File formats"):

    sa_<id>.jpg                   the original JPEG bytes, unchanged
    sa_<id>.json                  the original annotation json, where every converted annotation gains
                                  "matte": {"member": "matte_<ann_id>.png", "box": [x, y, w, h]}
    sa_<id>.matte_<ann_id>.png    8-bit grayscale alpha (0..255) of the w x h region at (x, y) of the
                                  image, (X, Y) pixels; the matte is zero outside that box

Members come in input order, per image jpg, json, then the mattes in annotation order; every member has
mtime 0, uid/gid 0, empty owner names and mode 0644 (GNU tar format), so a shard's bytes depend only on
its input, the converter and the options. Annotations that could not be converted (malformed RLE,
empty mask, unusable id) stay in the json without a ``matte`` entry. Images whose JPEG or json is
corrupt are left out.

Per mask (``--mode``):

- ``crop`` (default): a square around the mask's box, grown by ``--context`` of the box's longer side
  on every side (at least ``--min-crop`` pixels, shifted to stay inside the image where it fits), is
  resized to the converter's ``--crop-size``. Small masks get the converter's full resolution.
- ``whole``: the image (longest side, zero padding bottom-right, as SAM) is resized once to
  ``--crop-size`` and every mask of the image is predicted in that frame.

The matte box is the mask's box grown by ``--margin`` of its longer side (at least 2 px) and clipped to
the image. With ``--clamp`` (default) the matte is also zeroed farther than that margin from the mask
(a dilated band): the converter refines boundaries, and alpha it puts far from the mask is spurious
(docs/benchmarks.md has the measurement). Solid objects are not post-processed: that is the converter's
job (STL).

Crash safety and resuming: a shard is written to ``OUT/sa_NNNNNN.tar.partial``; once complete its
manifest ``OUT/manifest/sa_NNNNNN.json`` is written (temporary file + ``os.replace``) and then the shard
is renamed to ``OUT/sa_NNNNNN.tar``. A shard exists under its final name only when complete; a rerun
skips it (its bytes are untouched) and rebuilds the others, removing their stale temporary files.
The manifest records the input and output shard, samples, images, annotations and mattes written and the
skips per kind (:data:`zim_lightning.data.skips.SKIP_REASONS`).

Distribution: the job runs in Lightning's predict loop (:class:`~zim_lightning.lit.build_module.MatteBuildModule`),
bf16-mixed on GPU; with several devices or nodes (DDP; torchrun and SLURM are picked up by Lightning)
the ranks share the unfinished shards first come, first served: every DataLoader worker of every rank
claims the next unclaimed shard of the sorted list (:class:`ShardClaims`, a file created with
``O_EXCL`` in ``OUT/claims/<run>/``, so OUT must be on a file system every rank sees, e.g. NFS or
Lustre), reads, decodes and crops it whole, and its rank writes the output shard; predictions never
travel through the trainer. A rank whose shards go fast, or whose share was finished by an earlier run,
takes more: the ranks end within about one shard's time of each other. Batches never span two shards, so
a shard's bytes do not depend on which rank or worker built it, nor on what it built before (checked by
the tests: 2 CPU ranks give the bytes of 1). Claims belong to one run; the next run ignores and removes
them. A second build started into an OUT that a running build holds (:class:`OutputLock`) is refused.
Bytes repeat for the same weights, options, software and hardware; another device or kernel may move a
few alpha values by a level.

    torchrun --nnodes 2 --nproc-per-node 8 -m zim_lightning.sa1b_matte --sa1b ... --out ... \
        --checkpoint converter.ckpt --devices 8 --num-nodes 2
    srun --nodes 2 --ntasks-per-node 8 zim-lightning build-sa1b-matte ... --devices 8 --num-nodes 2
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tarfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.utils.data
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pycocotools import mask as mask_utils

from zim_lightning.data.sa1b import CorruptSample, decode_mask, iter_tar, sa1b_record
from zim_lightning.data.shards import expand_shards
from zim_lightning.data.skips import SKIP_REASONS, SkipTally
from zim_lightning.data.tar_writer import PARTIAL_SUFFIX, fsync_dir, member_info, write_atomic

# by name: the module also runs as __main__ (torchrun -m) and in spawned workers as __mp_main__
log = logging.getLogger("zim_lightning.sa1b_matte")

MODES = ("crop", "whole")
MANIFEST_DIR = "manifest"
#: Where the processes of a run claim the shards they build (see :class:`ShardClaims`).
CLAIMS_DIR = "claims"
RUN_NOTE = "run.json"
#: The lock one build holds on OUT for its whole run (see :class:`OutputLock`).
LOCK_NAME = ".build.lock"
RANKS_LOCK_NAME = ".build.ranks"
# Bilinear resampling spreads an edge over about a pixel, so the matte box keeps at least this margin.
MIN_MARGIN_PX = 2
#: How long a rank that finished its shards waits at the final barrier for the others.
BARRIER_TIMEOUT = timedelta(days=7)
# PNG: zlib level 1 and the "sub" filter alone. Mattes are mostly flat 0 / 255 runs that level 1 already
# packs well; trying every filter per row (OpenCV's default) triples the encode time for a 5% smaller file.
PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1) + (
    (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB) if hasattr(cv2, "IMWRITE_PNG_FILTER") else ()
)
# Threads projecting and PNG-encoding mattes in the main process (OpenCV releases the GIL).
WRITER_THREADS = 4
# Side of the coarse grid the clamp band is measured on (see mask_band).
BAND_GRID = 256
RANDOM_WEIGHTS_SEED = 0
#: What the converter's input masks are (recorded in every manifest): "binary", :func:`converter_mask`.
CONVERTER_INPUT = "binary"
#: Run-info values of builds whose manifests did not record the key yet (compared on resume): before
#: CONVERTER_INPUT was recorded, the converter got the resampled coverage.
RUN_INFO_BEFORE_RECORDED: dict[str, Any] = {"converter_input": "coverage"}
DEFAULT_CONVERTER = "converter_hiera_b_plus"


# ----------------------------------------------------------------------------- options and geometry


@dataclass(frozen=True)
class CropConfig:
    """How masks are cut out for the converter and how its mattes are stored.

    Attributes:
        crop_size: side S of the converter's square input (a multiple of 32).
        mode: ``"crop"`` (a square around each mask) or ``"whole"`` (the whole image once).
        context: in crop mode, the square grows by this fraction of the box's longer side on each side.
        min_crop: in crop mode, the smallest square side in image pixels (context for tiny masks).
        margin: the matte box grows by this fraction of the mask box's longer side on each side.
        clamp: zero the matte farther than the margin from the mask.
    """

    crop_size: int = 1024
    mode: str = "crop"
    context: float = 0.5
    min_crop: int = 128
    margin: float = 0.1
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.crop_size < 32 or self.crop_size % 32:
            raise ValueError(f"crop_size must be a positive multiple of 32, got {self.crop_size}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.margin < 0 or self.context < self.margin:
            raise ValueError(
                f"expected 0 <= margin <= context (the matte box must lie inside the converter's crop), "
                f"got margin={self.margin}, context={self.context}"
            )
        if self.min_crop < 1:
            raise ValueError(f"min_crop must be >= 1 pixel, got {self.min_crop}")


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a mask's non-zero pixels; the mask is HxW uint8 and not empty."""
    x, y, w, h = cv2.boundingRect(mask)
    return int(x), int(y), int(w), int(h)


def rle_box(annotation: dict) -> tuple[int, int, int, int]:
    """(x, y, w, h) of an annotation's decoded RLE, from its runs (no pass over the pixels).

    The json's own ``bbox`` is not trusted: the matte box must hold the mask the RLE decodes to.
    """
    segmentation = annotation["segmentation"]
    counts = segmentation["counts"]
    rle = {
        "size": segmentation["size"],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    return x, y, w, h


def margin_px(box: tuple[int, int, int, int], margin: float) -> int:
    """The matte box's margin in pixels around a mask box (x, y, w, h): ``margin`` of its longer side."""
    return max(MIN_MARGIN_PX, math.ceil(margin * max(box[2], box[3])))


def matte_box(box: tuple[int, int, int, int], image_hw: tuple[int, int], margin: float) -> tuple[int, ...]:
    """The stored matte's region: ``box`` grown by ``margin`` and clipped to the image.

    Returns:
        (x, y, w, h, m): the region in (X, Y) pixels and the margin m in pixels.
    """
    x, y, w, h = box
    height, width = image_hw
    m = margin_px(box, margin)
    x0, y0 = max(x - m, 0), max(y - m, 0)
    x1, y1 = min(x + w + m, width), min(y + h + m, height)
    return x0, y0, x1 - x0, y1 - y0, m


def crop_square(
    box: tuple[int, int, int, int], image_hw: tuple[int, int], config: CropConfig
) -> tuple[int, int, int]:
    """The square of the image the converter sees for one mask.

    Returns:
        (x0, y0, side) in (X, Y) pixels; the square may extend past the image (zero padding).
    """
    height, width = image_hw
    if config.mode == "whole":
        return 0, 0, max(height, width)
    x, y, w, h = box
    longer = max(w, h)
    # at least the matte box's extent (plus a pixel for centring on a whole pixel): the matte box must
    # lie inside the square whatever the rounding of the context, the margin and the placement
    needed = longer + 2 * margin_px(box, config.margin) + 1
    side = max(math.ceil(longer * (1.0 + 2.0 * config.context)), config.min_crop, needed)
    side = min(side, max(height, width))

    def place(start: float, extent: int) -> int:
        # inside the image where it fits (more context, no padding); centred on the image where not
        if side >= extent:
            return (extent - side) // 2
        return int(min(max(round(start), 0), extent - side))

    return place(x + w / 2 - side / 2, width), place(y + h / 2 - side / 2, height), side


def resample_square(
    array: np.ndarray, x0: int, y0: int, side: int, size: int, *, gain: int = 1
) -> np.ndarray:
    """Cut the square (x0, y0, side) out of ``array`` (zero outside it) and resize it to size x size.

    Args:
        array: HxW or HxWxC uint8.
        gain: multiplies the cut-out values first (255 turns a {0, 1} mask into 0 / 255, so that area
            resampling keeps the coverage of edge pixels).

    Returns:
        size x size (x C) uint8; area averaging when shrinking, bilinear when enlarging.
    """
    height, width = array.shape[:2]
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + side, width), min(y0 + side, height)
    part = array[iy0:iy1, ix0:ix1]
    if gain != 1:
        part = part * np.uint8(gain)
    if (ix0, iy0, ix1, iy1) != (x0, y0, x0 + side, y0 + side):
        part = cv2.copyMakeBorder(
            np.ascontiguousarray(part),
            iy0 - y0,
            y0 + side - iy1,
            ix0 - x0,
            x0 + side - ix1,
            cv2.BORDER_CONSTANT,
            value=0,
        )
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(part, (size, size), interpolation=interpolation)


def converter_mask(mask: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """The converter's input mask for the square (x0, y0, side) of a {0, 1} mask: size x size uint8 0 / 255.

    The square is resampled as coverage (:func:`resample_square`) and cut at half coverage, because the
    converter trains on binary masks only (coarsened from mattes, or segmentation masks): the ramps
    that bilinear enlarging puts on every edge (8 pixels wide for a 128-pixel square at 1024) would be
    input it never saw. A mask thinner than half a pixel of the output everywhere (a pole shrunk with
    the whole image) keeps every pixel it covers at all instead of vanishing.
    """
    coverage = resample_square(mask, x0, y0, side, size, gain=255)
    binary = coverage > 127
    if not binary.any():
        binary = coverage > 0
    return np.where(binary, np.uint8(255), np.uint8(0))


def project_matte(
    alpha: np.ndarray, square: tuple[int, int, int], box: tuple[int, int, int, int]
) -> np.ndarray:
    """Map the converter's matte of a square back to image pixels, over the matte box only.

    Args:
        alpha: SxS uint8, the converter's output for the square.
        square: (x0, y0, side) the square in image pixels.
        box: (x, y, w, h) the matte box in image pixels; it lies inside the square.

    Returns:
        h x w uint8 alpha.

    Raises:
        ValueError: if the box is not inside the square.
    """
    size = alpha.shape[0]
    x0, y0, side = square
    bx, by, bw, bh = box
    if bx < x0 or by < y0 or bx + bw > x0 + side or by + bh > y0 + side:
        raise ValueError(f"matte box {box} is not inside the converter's square {square}")
    if side < size:
        # the square was enlarged for the converter: average back down, then cut the box out
        small = cv2.resize(alpha, (side, side), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(small[by - y0 : by - y0 + bh, bx - x0 : bx - x0 + bw])
    # the square was shrunk: interpolate the box's pixels only (cheap for a small box in a large image)
    s = size / side
    matrix = np.array(
        [[s, 0.0, (bx + 0.5 - x0) * s - 0.5], [0.0, s, (by + 0.5 - y0) * s - 0.5]], dtype=np.float64
    )
    return cv2.warpAffine(
        alpha,
        matrix,
        (bw, bh),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def mask_band(mask_region: np.ndarray, radius: int) -> np.ndarray:
    """1 within about ``radius`` pixels (Euclidean) of the mask, else 0; HxW uint8 in, HxW uint8 out.

    Large regions are measured on a grid of at most :data:`BAND_GRID` cells a side (a distance transform
    at full resolution costs as much as the converter's share of a mask): the band is a loose clamp
    whose edge may move by one grid cell, which stays within the margin's rounding.
    """
    height, width = mask_region.shape
    step = max(1, math.ceil(max(height, width) / BAND_GRID))
    small = mask_region
    if step > 1:
        grid = (math.ceil(width / step), math.ceil(height / step))
        # any mask pixel in a cell marks the cell (max over the cell, via area average > 0)
        small = cv2.resize(mask_region, grid, interpolation=cv2.INTER_AREA)
    outside = (small == 0).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    band = (distance <= radius / step).astype(np.uint8)
    if step > 1:
        band = cv2.resize(band, (width, height), interpolation=cv2.INTER_NEAREST)
    return band


# ----------------------------------------------------------------------------- shards and resuming


def resolve_shards(specs: Sequence[str]) -> list[Path]:
    """Input shards from directories, brace patterns and paths, sorted by name, without duplicates.

    Raises:
        ValueError: if a spec names nothing, a named shard is not a file, or two shards share a name
            (their outputs would collide).
    """
    paths: list[Path] = []
    for spec in specs:
        if Path(spec).is_dir():
            found = sorted(p for p in Path(spec).iterdir() if p.name.endswith(".tar") and p.is_file())
            if not found:
                raise ValueError(f"--sa1b directory {spec!r} holds no .tar shards")
            paths += found
            continue
        for url in expand_shards(spec):
            if not Path(url).is_file():
                raise ValueError(f"--sa1b shard {url!r} does not exist or is not a file (from {spec!r})")
            paths.append(Path(url))
    unique = sorted(set(paths), key=lambda p: (p.name, str(p)))
    names = [p.name for p in unique]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"--sa1b names several shards called {clashes}; each output shard takes its input's name"
        )
    if not unique:
        raise ValueError(f"--sa1b {list(specs)!r} names no shards")
    return unique


def output_path(out: Path, shard: Path) -> Path:
    return out / shard.name


def manifest_path(out: Path, shard: Path) -> Path:
    return out / MANIFEST_DIR / (Path(shard.name).stem + ".json")


def failure_path(out: Path, shard: Path) -> Path:
    """Where a shard whose input was damaged records why it was not finished."""
    return out / MANIFEST_DIR / (Path(shard.name).stem + ".failed.json")


def is_done(out: Path, shard: Path) -> bool:
    """A shard is done when its output exists under the final name (the rename comes last, after the
    manifest's) and so does its manifest: a shard without one (deleted, or copied in alone) has no
    recorded settings to check a resume against, and is built again."""
    return output_path(out, shard).is_file() and manifest_path(out, shard).is_file()


def remove_stale(out: Path, shard: Path) -> list[Path]:
    """Delete the temporary files a killed run left for ``shard``; returns what was removed."""
    removed = []
    for final in (output_path(out, shard), manifest_path(out, shard)):
        stale = final.with_name(final.name + PARTIAL_SUFFIX)
        if stale.exists():
            stale.unlink()
            removed.append(stale)
    return removed


def _holder_note() -> bytes:
    """Who holds a claim, a lock or a run: host, pid and start time, one json line."""
    note = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return (json.dumps(note) + "\n").encode()


def new_run_id() -> str:
    """A name for one run's claims: its start time (readable) and a random part (unique)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ShardClaims:
    """Which process builds each shard in one run: the first to create its claim file.

    A claim is ``OUT/claims/<run_id>/<shard>.claim``, created with ``O_CREAT | O_EXCL``, which is atomic
    on local file systems and on NFS (v3 and later) and Lustre; it holds the claimant's host and pid.
    Every process of a run uses the same ``run_id`` (rank 0's, broadcast), so a claim left by a killed
    run blocks nothing: the next run has its own directory, made by :meth:`begin`, which removes the
    others. Every process checks that it sees that directory (:meth:`visible`): on a per-node OUT each
    node would otherwise build every shard. Picklable: DataLoader workers claim shards themselves.

    Args:
        out: the output directory.
        run_id: this run's name (:func:`new_run_id`).
    """

    out: Path
    run_id: str

    @property
    def directory(self) -> Path:
        return self.out / CLAIMS_DIR / self.run_id

    def begin(self) -> None:
        """Start the run's claims (in one process, before any claim): remove earlier runs' claims and
        create this run's directory, with a note of who made it."""
        root = self.out / CLAIMS_DIR
        for run in root.iterdir() if root.is_dir() else ():
            if run.name != self.run_id:
                shutil.rmtree(run, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / RUN_NOTE).write_bytes(_holder_note())

    def visible(self, timeout_s: float = 60.0) -> bool:
        """Whether this process sees the directory :meth:`begin` made (polling up to ``timeout_s``: a
        network file system may show another node's new directory a little later)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if (self.directory / RUN_NOTE).is_file():
                    return True
            except OSError as error:  # e.g. a stale NFS handle: not visible, decided with the others
                log.warning("cannot look for %s (%s)", self.directory, error)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def claim(self, shard: Path) -> bool:
        """Claim ``shard`` for the calling process; False when another process of this run has it or it
        is finished. A claimed shard's temporary files left by a killed run are removed."""
        if is_done(self.out, shard):
            return False
        try:
            fd = os.open(
                self.directory / (shard.name + ".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644
            )
        except FileExistsError:
            return False
        except FileNotFoundError:  # the run's claims are gone (another build removed them): claim nothing
            log.error(
                "%s is gone: %s and the shards after it are left for a rerun", self.directory, shard.name
            )
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(_holder_note())
        for stale in remove_stale(self.out, shard):
            log.info("removed %s left by an interrupted run", stale)
        return True

    def remove(self) -> None:
        """Delete this run's claims and, when no other run's remain, the claims directory itself."""
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            (self.out / CLAIMS_DIR).rmdir()
        except OSError:  # another run's claims (or a file system that lags) keep it
            pass


class OutputLock:
    """One build at a time per OUT, with two ``flock`` locks the operating system drops when their holder
    dies (so a killed build leaves nothing that blocks the next one):

    - ``OUT/.build.lock``, exclusive, held by rank 0; it names its holder during a run (empty between runs);
    - ``OUT/.build.ranks``, shared, held by every rank: a new build needs it exclusively for a moment, so
      ranks of an earlier build still running after their rank 0 died also refuse it.

    Two builds into one OUT would write the same temporary shards over each other. File systems without
    locks get a warning and no check; some (NFS mounted ``nolock``, Lustre ``localflock``) lock per node
    only, which does not protect against a build on another node.

    Args:
        out: the output directory.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / LOCK_NAME
        self.ranks_path = out / RANKS_LOCK_NAME
        self.fd: int | None = None
        self.ranks_fd: int | None = None

    def acquire(self) -> str | None:
        """Rank 0: take both locks, the ranks' one shared in the end; returns None, or why not (a running
        build, named, or an error of the file system)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as error:
            return f"cannot open {self.path} ({error})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that wrote no note"
            os.close(fd)
            return (
                f"another build is writing into {self.out} (holder: {holder}); wait for it to end, or build "
                "into another --out"
            )
        except OSError as error:
            os.close(fd)
            log.warning("cannot lock %s (%s): make sure no other build writes into it", self.path, error)
            return None
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _holder_note())
            self.ranks_fd = os.open(self.ranks_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_SH)
        except BlockingIOError:
            self.release()
            return (
                f"ranks of an earlier build are still writing into {self.out} (its rank 0 has ended); stop "
                "them first, or build into another --out"
            )
        except OSError as error:
            self.release()
            return f"cannot lock {self.out} for this build ({error})"
        return None

    def join(self) -> None:
        """Every other rank, once rank 0 holds the locks: hold the ranks' lock, shared, for the run."""
        try:
            self.ranks_fd = os.open(self.ranks_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.ranks_fd, fcntl.LOCK_SH)
        except OSError as error:  # a file system without locks: rank 0 warned
            log.debug("cannot lock %s (%s)", self.ranks_path, error)

    def release(self) -> None:
        """Drop what this process holds (closing drops a flock); rank 0 also empties the note."""
        if self.ranks_fd is not None:
            os.close(self.ranks_fd)
            self.ranks_fd = None
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- reading side (workers)


@dataclass
class ImageItem:
    """An image that goes to the output: its key, original JPEG bytes and parsed json."""

    key: str
    jpg: bytes
    record: dict


@dataclass
class MaskItem:
    """One mask of the last :class:`ImageItem`: row ``row`` of the batch tensors is its converter input.

    ``square`` is (x0, y0, side), ``box`` (x, y, w, h), both in image pixels; ``band`` is the h x w
    uint8 clamp region or None.
    """

    ann_index: int
    row: int
    square: tuple[int, int, int]
    box: tuple[int, int, int, int]
    band: np.ndarray | None


@dataclass
class ShardEnd:
    """The end of an input shard, with what the reading side counted."""

    samples: int
    skipped: dict[str, int]


def _annotation_id(annotation: dict) -> str | None:
    """The id as it appears in member names, or None if it cannot name a tar member."""
    ann_id = annotation.get("id")
    if isinstance(ann_id, bool) or not isinstance(ann_id, int | str):
        return None
    text = str(ann_id)
    return text if text and all(c.isalnum() or c in "_-" for c in text) else None


def _shard_batches(shard: Path, config: CropConfig, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of converter inputs for one shard, with the bookkeeping the writer needs, in order.

    Each batch is ``{"image": uint8 Bx3xSxS, "mask": uint8 Bx1xSxS, "shard": name, "items": [...]}``
    with B <= batch_size; ``items`` holds :class:`ImageItem`, :class:`MaskItem` (pointing at rows) and,
    in the last batch, a :class:`ShardEnd`. A batch never holds two shards.
    """
    size = config.crop_size
    skips = SkipTally()
    samples = 0
    items: list[Any] = []
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []

    def flush(final: bool) -> dict[str, Any]:
        nonlocal items, images, masks
        if final:
            items.append(ShardEnd(samples=samples, skipped=dict(skips.counts)))
        batch = {
            "image": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            if images
            else torch.zeros((0, 3, size, size), dtype=torch.uint8),
            "mask": torch.from_numpy(np.stack(masks))[:, None]
            if masks
            else torch.zeros((0, 1, size, size), dtype=torch.uint8),
            "shard": shard.name,
            "items": items,
        }
        items, images, masks = [], [], []
        return batch

    for sample in iter_tar(str(shard), counter=skips):
        samples += 1
        key = sample["__key__"]
        try:
            image, record = sa1b_record(sample)
            height, width = record["image"]["height"], record["image"]["width"]
            if image.shape[:2] != (height, width):
                raise CorruptSample(
                    f"image is {image.shape[1]}x{image.shape[0]}, its json says {width}x{height}",
                    key=key,
                    reason="corrupt_image",
                )
        except CorruptSample as error:
            skips.skip(error.reason, error.key, error)
            continue
        items.append(ImageItem(key=key, jpg=sample["jpg"], record=record))
        whole = None
        if config.mode == "whole":
            # one resize per image, shared by all its masks
            whole = resample_square(image, *crop_square((0, 0, width, height), (height, width), config), size)
        seen: set[str] = set()
        for index, annotation in enumerate(record["annotations"]):
            ann_id = _annotation_id(annotation)
            if ann_id is None or ann_id in seen:
                skips.skip(
                    "bad_json", f"{key} annotation {annotation.get('id')!r}", "unusable or repeated id"
                )
                continue
            seen.add(ann_id)
            try:
                mask = decode_mask(annotation, key=key, image_size=(height, width))
            except CorruptSample as error:
                skips.skip(error.reason, error.key, error)
                continue
            box = rle_box(annotation)
            bx, by, bw, bh, margin = matte_box(box, (height, width), config.margin)
            square = crop_square(box, (height, width), config)
            band = None
            if config.clamp:
                band = mask_band(mask[by : by + bh, bx : bx + bw], margin)
            x0, y0, side = square
            masks.append(converter_mask(mask, x0, y0, side, size))
            images.append(whole if whole is not None else resample_square(image, x0, y0, side, size))
            items.append(
                MaskItem(ann_index=index, row=len(images) - 1, square=square, box=(bx, by, bw, bh), band=band)
            )
            if len(images) == batch_size:
                yield flush(final=False)
    yield flush(final=True)


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches of converter inputs for a list of shards; DataLoader workers take whole shards each.

    Args:
        shards: the shards to build, in order.
        config: cropping options.
        batch_size: masks per batch (the last batch of a shard may hold fewer).
        claims: the run's claims: every worker (of every rank sharing them) builds the shards it claims
            first, in order.
    """

    def __init__(
        self,
        *,
        shards: Sequence[Path],
        config: CropConfig,
        batch_size: int,
        claims: ShardClaims,
    ) -> None:
        super().__init__()
        self.shards = list(shards)
        self.config = config
        self.batch_size = batch_size
        self.claims = claims

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            if self.claims.claim(shard):
                yield from _shard_batches(shard, self.config, self.batch_size)


def _worker_init(_: int, *, log_level: int = logging.WARNING) -> None:
    # one OpenCV thread per worker: the workers are the parallelism
    cv2.setNumThreads(1)
    # spawned workers start with no logging set up; they report what they clean up and skip
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s (worker {os.getpid()}): %(message)s")


# ----------------------------------------------------------------------------- writing side (main process)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(member_info(name, len(data)), _BytesReader(data))


class _BytesReader:
    """A minimal file object over bytes for ``TarFile.addfile`` (avoids a BytesIO copy per member)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else min(self._pos + size, len(self._view))
        chunk = self._view[self._pos : end].tobytes()
        self._pos = end
        return chunk


def _encode_matte(alpha: np.ndarray, square: tuple, box: tuple, band: np.ndarray | None) -> bytes:
    matte = project_matte(alpha, square, box)
    if band is not None:
        matte *= band
    ok, png = cv2.imencode(".png", matte, list(PNG_PARAMS))
    if not ok:
        raise RuntimeError(f"OpenCV could not PNG-encode a {matte.shape} matte")
    return png.tobytes()


@dataclass
class _OpenShard:
    shard: str
    tmp: Path
    handle: Any
    tar: tarfile.TarFile
    image: ImageItem | None = None
    mattes: list[tuple[int, Future, tuple[int, int, int, int]]] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    masks: int = 0


def _run_info(config: CropConfig, model: str, checkpoint: str | None, precision: str) -> dict[str, Any]:
    """What a build's mattes depend on besides its input: recorded in every manifest, compared on resume."""
    return {
        "model": model,
        "precision": str(precision),  # bf16 and float32 mattes differ by a few levels
        "checkpoint": None if checkpoint is None else Path(checkpoint).name,
        # the name alone cannot tell two runs' last.ckpt apart
        "checkpoint_sha256": None if checkpoint is None else _sha256(Path(checkpoint)),
        "mode": config.mode,
        "crop_size": config.crop_size,
        "context": config.context,
        "min_crop": config.min_crop,
        "margin": config.margin,
        "clamp": config.clamp,
        "converter_input": CONVERTER_INPUT,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"manifest {path} cannot be read ({error}); delete it and its shard to build that shard again"
        ) from error
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest {path} is not a JSON object; delete it and its shard to build it again")
    return manifest


def check_resumable(out: Path, shards: Sequence[Path], run_info: dict[str, Any]) -> None:
    """Refuse to resume into ``out`` when its finished shards were built differently.

    A finished shard is skipped on resume, so one built with another converter, other crop options or
    from an input that has changed since (its size differs) would silently stay in the dataset.

    Raises:
        ValueError: naming the first few such shards and what differs.
    """
    problems = []
    for shard in shards:
        path = manifest_path(out, shard)
        if not (is_done(out, shard) and path.is_file()):
            continue
        manifest = _read_manifest(path)
        built = manifest.get("build", {})
        # the same weights under another name or path resume (the hash decides, when both have one)
        ignored = (
            {"checkpoint"} if built.get("checkpoint_sha256") and run_info["checkpoint_sha256"] else set()
        )
        # a key that manifests lacked had its earlier value then; other missing keys are not compared
        recorded = {**RUN_INFO_BEFORE_RECORDED, **built}
        differ = [
            f"{key} {recorded[key]!r} (now {value!r})"
            for key, value in run_info.items()
            if key in recorded and key not in ignored and recorded[key] != value
        ]
        size = shard.stat().st_size
        if manifest.get("input_bytes", size) != size:
            differ.append(f"input of {manifest['input_bytes']} bytes (now {size}: the input has changed)")
        if differ:
            problems.append(f"{shard.name}: {', '.join(differ)}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(
            f"{out} holds {len(problems)} finished shards built differently from this run, which a resume "
            f"would keep: {shown}. Build into a new --out, or delete those shards and their manifests"
        )


class SA1BMatteWriter(BasePredictionWriter):
    """Writes each rank's output shards from its predictions, batch by batch (nothing is gathered).

    An input shard whose tar stream is damaged (a truncated or failed download) is not finished: its
    output is dropped and ``manifest/<name>.failed.json`` says why, so that a rerun builds it again once
    the input is fetched anew, instead of skipping a shard that silently lacks its tail. With
    ``accept_truncated`` such a shard is finished with what could be read (the manifest counts it).

    Args:
        out: the output directory.
        inputs: input shard paths by name, for the manifest.
        run_info: the options recorded in every manifest.
        accept_truncated: finish shards whose input stream is damaged.
    """

    def __init__(
        self, *, out: Path, inputs: dict[str, Path], run_info: dict[str, Any], accept_truncated: bool = False
    ) -> None:
        super().__init__(write_interval="batch")
        self.out = out
        self.inputs = inputs
        self.run_info = run_info
        self.accept_truncated = accept_truncated
        self.open: dict[str, _OpenShard] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.completed: list[str] = []
        self.failed: list[str] = []
        self.masks = 0
        self.start: float | None = None

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="matte-png")
        self.start = time.perf_counter()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self.open:
            raise RuntimeError(
                f"the predict loop ended inside shards {sorted(self.open)}; they stay unfinished"
            )
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: torch.Tensor,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.received_sigterm:  # Lightning's predict loop never stops for it (a preemption)
            raise SIGTERMException
        alphas = prediction[:, 0].cpu().numpy()  # BxSxS uint8
        state = self.open.get(batch["shard"]) or self._open(batch["shard"])
        for item in batch["items"]:
            if isinstance(item, ImageItem):
                self._finish_image(state)
                state.image = item
            elif isinstance(item, MaskItem):
                future = self.pool.submit(_encode_matte, alphas[item.row], item.square, item.box, item.band)
                state.mattes.append((item.ann_index, future, item.box))
            else:
                self._finish_image(state)
                self._close(state, item)

    def _open(self, shard: str) -> _OpenShard:
        tmp = self.out / (shard + PARTIAL_SUFFIX)
        handle = open(tmp, "wb")  # truncates a stale file a killed run left
        tar = tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT)
        state = _OpenShard(shard=shard, tmp=tmp, handle=handle, tar=tar)
        self.open[shard] = state
        return state

    def _finish_image(self, state: _OpenShard) -> None:
        image = state.image
        if image is None:
            return
        annotations = image.record["annotations"]
        members = []
        for ann_index, future, box in state.mattes:
            annotation = annotations[ann_index]
            member = f"matte_{annotation['id']}.png"
            annotation["matte"] = {"member": member, "box": [int(v) for v in box]}
            members.append((f"{image.key}.{member}", future.result()))
        _tar_add(state.tar, f"{image.key}.jpg", image.jpg)
        _tar_add(state.tar, f"{image.key}.json", json.dumps(image.record).encode())
        for name, data in members:
            _tar_add(state.tar, name, data)
        state.images += 1
        state.annotations += len(annotations)
        state.masks += len(members)
        self.masks += len(members)
        state.image, state.mattes = None, []

    def _close(self, state: _OpenShard, end: ShardEnd) -> None:
        state.tar.close()
        state.handle.flush()
        os.fsync(state.handle.fileno())
        state.handle.close()
        final = self.out / state.shard
        if end.skipped.get("truncated_tar", 0) and not self.accept_truncated:
            reason = (
                f"the input {self.inputs[state.shard]} is damaged (truncated tar or gzip stream, or a "
                f"failed read) after {end.samples} samples; fetch it again and rerun, or pass "
                "--accept-truncated to keep what can be read"
            )
            note = {"input": str(self.inputs[state.shard]), "output": state.shard, "reason": reason}
            write_atomic(failure_path(self.out, final), (json.dumps(note, indent=1) + "\n").encode())
            state.tmp.unlink()
            del self.open[state.shard]
            self.failed.append(state.shard)
            log.error("%s: not finished: %s", state.shard, reason)
            return
        manifest = {
            "input": str(self.inputs[state.shard]),
            "input_bytes": self.inputs[state.shard].stat().st_size,
            "output": state.shard,
            "samples": end.samples,
            "images": state.images,
            "annotations": state.annotations,
            "masks": state.masks,
            "skipped": end.skipped,
            "skipped_total": sum(end.skipped.values()),
            "build": self.run_info,
        }
        # manifest first: a shard under its final name always has its manifest
        write_atomic(manifest_path(self.out, final), (json.dumps(manifest, indent=1) + "\n").encode())
        os.replace(state.tmp, final)
        failure_path(self.out, final).unlink(missing_ok=True)  # an earlier run's note on this shard
        fsync_dir(self.out)
        del self.open[state.shard]
        self.completed.append(state.shard)
        log.info(
            "%s: %d images, %d mattes, %d skipped",
            state.shard,
            state.images,
            state.masks,
            manifest["skipped_total"],
        )


# ----------------------------------------------------------------------------- the job


class BuildData(LightningDataModule):
    """The unfinished shards, claimed by the workers of every rank as they free up.

    The run's claims are named once the trainer has launched every rank (rank 0's name, broadcast);
    rank 0 takes the output lock and checks again that the shards can resume, and every rank learns of
    a problem together (one rank raising alone would leave the others waiting at a barrier).
    """

    def __init__(
        self,
        *,
        shards: Sequence[Path],
        out: Path,
        config: CropConfig,
        batch_size: int,
        num_workers: int,
        pin: bool,
        run_info: dict[str, Any],
    ) -> None:
        super().__init__()
        self.shards, self.out, self.config, self.run_info = list(shards), out, config, run_info
        self.batch_size, self.num_workers, self.pin = batch_size, num_workers, pin
        self.lock = OutputLock(out)
        self.claims: ShardClaims | None = None

    def _start_run(self) -> ShardClaims:
        strategy, rank = self.trainer.strategy, self.trainer.global_rank
        claims = ShardClaims(out=self.out, run_id=strategy.broadcast(new_run_id(), src=0))
        problem = None
        if rank == 0:  # an error here must reach every rank, or the others wait in the broadcast
            problem = self.lock.acquire()
            if problem is None:
                try:
                    # again, now that no other build can finish shards here: one that held the lock at
                    # the first check may have finished some with other settings since
                    check_resumable(self.out, self.shards, self.run_info)
                    claims.begin()
                except ValueError as error:
                    problem = str(error)
                except OSError as error:
                    problem = f"cannot start the run's claims in {self.out} ({error})"
        problem = strategy.broadcast(problem, src=0)  # every rank raises it, none waits at a barrier
        if problem is not None:
            raise ValueError(problem)
        if rank != 0:
            self.lock.join()
        # every rank decides together: one rank raising alone would leave the others at a barrier
        if not strategy.reduce_boolean_decision(claims.visible(), all=True):
            raise ValueError(
                f"some ranks do not see {claims.directory}, which rank 0 made: --out {self.out} must be one "
                f"directory that every node shares (NFS, Lustre), or each node would build every shard "
                f"(this is rank {rank} on {socket.gethostname()})"
            )
        return claims

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        self.claims = self._start_run()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        todo = [s for s in self.shards if not is_done(self.out, s)]
        log.info(
            "rank %d/%d: %d of %d shards unfinished, shared over the ranks",
            rank,
            world,
            len(todo),
            len(self.shards),
        )
        dataset = ShardDataset(
            shards=todo, config=self.config, batch_size=self.batch_size, claims=self.claims
        )
        # every rank lists every unfinished shard, but builds about its share of them
        workers = min(self.num_workers, math.ceil(len(todo) / world))
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin,
            worker_init_fn=(
                functools.partial(_worker_init, log_level=logging.getLogger().getEffectiveLevel())
                if workers
                else None
            ),
            # spawn, not fork: a worker forked after OpenCV's or OpenMP's thread pools ran in this process
            # (data generation, model init, a forward) can deadlock in its first cv2 call
            multiprocessing_context="spawn" if workers else None,
            prefetch_factor=2 if workers else None,  # a batch of 16 masks at 1024 is 64 MB
        )


def build(
    *,
    sa1b: Sequence[str],
    out: str | Path,
    model: str | None = None,
    checkpoint: str | None = None,
    net: torch.nn.Module | None = None,
    config: CropConfig | None = None,
    batch_size: int = 16,
    num_workers: int = 4,
    accelerator: str = "auto",
    devices: str | int = "auto",
    num_nodes: int = 1,
    precision: str | None = None,
    channels_last: bool = False,
    compile: str | None = None,
    accept_truncated: bool = False,
) -> dict[str, Any]:
    """Build SA1B-Matte shards for ``sa1b`` in ``out``, skipping finished ones.

    Args:
        sa1b: directories, brace patterns or paths of SA-1B shards.
        out: output directory (created).
        model: converter name in ``converter_model_registry``; None: the network a ``zim-lightning fit``
            checkpoint carries, else ``converter_hiera_b_plus``.
        checkpoint: converter weights (plain state dict or Lightning checkpoint); None: random weights.
        net: an already built converter, used instead of ``model`` / ``checkpoint`` (benchmarks).
        config: cropping options.
        batch_size: masks per converter forward.
        num_workers: DataLoader workers per rank (each reads whole shards).
        accelerator, devices, num_nodes: passed to the Lightning Trainer (DDP when several).
        precision: Trainer precision; None: ``"bf16-mixed"`` on GPU, ``"32-true"`` elsewhere.
        channels_last: NHWC convolution weights (``zim_lightning.speed.to_channels_last``; same mattes).
        compile: ``torch.compile`` mode for the whole converter (``zim_lightning.speed.COMPILE_MODES``),
            or None for eager. Every batch has the same shape, so it compiles once per rank.
        accept_truncated: finish shards whose input tar stream is damaged with what can be read;
            default: leave them unfinished with a note (see :class:`SA1BMatteWriter`).

    Returns:
        A summary over all input shards (rank 0's view after every rank finished): see :func:`summarize`.
    """
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from zim_lightning import speed
    from zim_lightning.lit.build_module import MatteBuildModule

    config = config or CropConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards = resolve_shards(sa1b)
    out = Path(out)
    inputs_in_out = [str(s) for s in shards if output_path(out, s).resolve() == s.resolve()]
    if inputs_in_out:
        raise ValueError(
            f"--out {str(out)!r} is where the SA-1B input shards lie ({inputs_in_out[:3]}...): each output "
            "shard takes its input's name and would replace it; give another --out"
        )
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    if net is None:
        net, model = _converter(model, checkpoint)
    model = model or type(net).__name__
    net.eval()
    if channels_last:
        speed.to_channels_last(net)
    if compile is not None:
        speed.compile_model(net, mode=compile, parts=None)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    precision = precision or ("bf16-mixed" if gpu else "32-true")
    several = _several_processes(devices, num_nodes=num_nodes, gpu=gpu)
    run_info = _run_info(config, model, checkpoint, precision)
    check_resumable(out, shards, run_info)  # here, to fail fast; again under the output lock
    writer = SA1BMatteWriter(
        out=out,
        inputs={s.name: s for s in shards},
        run_info=run_info,
        accept_truncated=accept_truncated,
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        # Ranks wait at the final barrier for the slowest one (a shard takes hours), far past the
        # 30-minute default timeout of a collective, after which NCCL would abort the finished ranks.
        strategy=DDPStrategy(timeout=BARRIER_TIMEOUT) if several else "auto",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[writer],
    )
    data = BuildData(
        shards=shards,
        out=out,
        config=config,
        batch_size=batch_size,
        num_workers=num_workers,
        pin=gpu,
        run_info=run_info,
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # both are expected here: the module moves only the tensors of its batches (its own
            # transfer_batch_to_device is the one meant to run), and the writer needs no batch indices
            warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
            warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
            try:
                trainer.predict(MatteBuildModule(net=net), datamodule=data, return_predictions=False)
            except RuntimeError:
                if trainer.received_sigterm:  # the signal reached the DataLoader workers first
                    raise SIGTERMException from None
                raise
        seconds = time.perf_counter() - start
        log.info(
            "rank %d: %d shards, %d mattes in %.1f s (%.1f masks/s)",
            trainer.global_rank,
            len(writer.completed),
            writer.masks,
            seconds,
            writer.masks / max(seconds, 1e-9),
        )
        trainer.strategy.barrier()
        if trainer.global_rank == 0 and data.claims is not None:
            data.claims.remove()  # every rank is past its last claim
    finally:
        data.lock.release()
    summary = summarize(out, shards)
    summary.update(
        built=len(writer.completed),
        failed_this_rank=writer.failed,
        masks_this_rank=writer.masks,
        seconds=seconds,
    )
    summary["rank"] = trainer.global_rank
    return summary


def _several_processes(devices: str | int, *, num_nodes: int, gpu: bool) -> bool:
    """Whether the Trainer will launch several processes (DDP), as Lightning resolves ``devices``."""
    if num_nodes > 1:
        return True
    if devices in ("auto", -1, "-1"):  # every visible device (one CPU process)
        return gpu and torch.cuda.device_count() > 1
    if isinstance(devices, int) or str(devices).isdigit():
        return int(devices) > 1
    return len([d for d in str(devices).split(",") if d.strip()]) > 1  # device ids, "0,1"


def _converter(model: str | None, checkpoint: str | None) -> tuple[torch.nn.Module, str]:
    """The converter to build with, and its registry name: ``model`` from the registry, or, without it,
    the network a ``zim-lightning fit`` checkpoint carries (its class_path when it is no registry entry)."""
    from zim_lightning.models.build import network_from_checkpoint
    from zim_lightning.models.checkpoint import weights_loaded_later
    from zim_lightning.models.converter import MattingConverter, converter_model_registry

    carried = None
    if model is None and checkpoint is not None:
        carried = network_from_checkpoint(checkpoint, expected=MattingConverter)
    if carried is not None:
        net, spec = carried
        # the registry name when the run used a registry builder, so manifests name the model alike
        names = {f"{fn.__module__}.{fn.__name__}": name for name, fn in converter_model_registry.items()}
        return net, names.get(str(spec.get("class_path")), str(spec.get("class_path")))
    model = model or DEFAULT_CONVERTER
    if model not in converter_model_registry:
        raise ValueError(f"unknown converter {model!r}; expected one of {sorted(converter_model_registry)}")
    if checkpoint is None:
        log.warning("no --checkpoint: %s runs with random weights (tests and smoke runs only)", model)
        # random weights drawn from a fixed seed, so reruns of a smoke build stay byte-identical
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
    with weights_loaded_later():  # the checkpoint's, or random as warned above
        return converter_model_registry[model](checkpoint=checkpoint), model


def summarize(out: Path, shards: Sequence[Path]) -> dict[str, Any]:
    """Totals over the manifests of ``shards`` in ``out``.

    Returns:
        ``{"shards": n, "done": finished, "missing": [names], "failed": {name: why} (unfinished shards
        whose input was damaged), "samples", "images", "annotations", "masks", "skipped": {kind: n},
        "skipped_total", "per_shard": [manifest, ...]}``.
    """
    totals: dict[str, Any] = {"shards": len(shards), "done": 0, "missing": [], "failed": {}, "per_shard": []}
    for name in ("samples", "images", "annotations", "masks", "skipped_total"):
        totals[name] = 0
    totals["skipped"] = dict.fromkeys(SKIP_REASONS, 0)
    for shard in shards:
        path = manifest_path(out, shard)
        if not (is_done(out, shard) and path.is_file()):
            totals["missing"].append(shard.name)
            if failure_path(out, shard).is_file():
                totals["failed"][shard.name] = json.loads(failure_path(out, shard).read_text())["reason"]
            continue
        manifest = _read_manifest(path)
        totals["done"] += 1
        totals["per_shard"].append(manifest)
        for name in ("samples", "images", "annotations", "masks", "skipped_total"):
            totals[name] += manifest[name]
        for kind, count in manifest["skipped"].items():
            totals["skipped"][kind] = totals["skipped"].get(kind, 0) + count
    return totals


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A rich table: per shard (up to 20) and totals, skips by kind."""
    from rich.console import Console
    from rich.table import Table

    kinds = [k for k, v in summary["skipped"].items() if v]
    table = Table(title=f"SA1B-Matte in {out}: {summary['done']}/{summary['shards']} shards complete")
    for column in ("shard", "images", "mattes", "skipped", *kinds):
        table.add_column(column, justify="left" if column == "shard" else "right")
    rows = summary["per_shard"]
    for manifest in rows if len(rows) <= 20 else []:
        table.add_row(
            manifest["output"],
            str(manifest["images"]),
            str(manifest["masks"]),
            str(manifest["skipped_total"]),
            *(str(manifest["skipped"].get(k, 0)) for k in kinds),
        )
    table.add_row(
        "total",
        str(summary["images"]),
        str(summary["masks"]),
        str(summary["skipped_total"]),
        *(str(summary["skipped"][k]) for k in kinds),
        style="bold",
    )
    console = Console()
    console.print(table)
    if summary["missing"]:
        console.print(f"[red]unfinished shards[/red]: {', '.join(summary['missing'][:20])}")
    for name, reason in list(summary["failed"].items())[:20]:
        console.print(f"[red]{name}[/red]: {reason}")
    console.print(f"skipped samples and masks: {summary['skipped_total']}")


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
    p.add_argument(
        "--checkpoint",
        "--converter",
        dest="converter",
        metavar="CKPT",
        default=None,
        help="converter checkpoint (state dict or Lightning .ckpt); --converter is the older name",
    )
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
    from zim_lightning.speed import COMPILE_MODES  # here: the DataLoader workers import this module

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
    except SIGTERMException:
        print("zim-lightning build-sa1b-matte: stopped by SIGTERM; a rerun resumes", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
