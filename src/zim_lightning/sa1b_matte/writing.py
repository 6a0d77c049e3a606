"""The writing side (main process): the converter's mattes projected, encoded and written shard by shard, with
its manifest, by a Lightning prediction writer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.utils.data
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zim_lightning.data.tar_writer import PARTIAL_SUFFIX, fsync_dir, member_info, write_atomic
from zim_lightning.sa1b_matte.geometry import CropConfig, project_matte
from zim_lightning.sa1b_matte.reading import ImageItem, MaskItem, ShardEnd
from zim_lightning.sa1b_matte.resume import failure_path, is_done, manifest_path

log = logging.getLogger(__name__)

# PNG: zlib level 1 and the "sub" filter alone. Mattes are mostly flat 0 / 255 runs that level 1 already
# packs well; trying every filter per row (OpenCV's default) triples the encode time for a 5% smaller file.
PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1) + (
    (cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB) if hasattr(cv2, "IMWRITE_PNG_FILTER") else ()
)
# Threads projecting and PNG-encoding mattes in the main process (OpenCV releases the GIL).
WRITER_THREADS = 4
#: What the converter's input masks are (recorded in every manifest): "binary", :func:`converter_mask`.
CONVERTER_INPUT = "binary"
#: Run-info values of builds whose manifests did not record the key yet (compared on resume): before
#: CONVERTER_INPUT was recorded, the converter got the resampled coverage.
RUN_INFO_BEFORE_RECORDED: dict[str, Any] = {"converter_input": "coverage"}


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


def describe_run(config: CropConfig, model: str, checkpoint: str | None, precision: str) -> dict[str, Any]:
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


def read_manifest(path: Path) -> dict[str, Any]:
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
        manifest = read_manifest(path)
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
