"""Data pipeline throughput per worker for the converter, ZIM and build stages (ZIM paper, Sec. 3).

Measures samples per second in one process (``num_workers=0``: the main process plays one DataLoader
worker) on SA-1B-sized synthetic shards (about 1500x2250 images, written by ``data.synthetic``), and
prints one JSON object per stage::

    python benchmarks/data_throughput.py                      # generates shards in a temporary folder
    python benchmarks/data_throughput.py --data DIR           # reuse (or write and keep) the shards in DIR

- converter: matting shard -> random resized crop (``--crop``), colour jitter, coarse mask, SGA; STL mix.
- zim: SA1B-Matte shard (built here from the synthetic SA-1B and its exact alphas) -> reduced JPEG
  decode, one matte decoded, resize to the 1024 frame, flip / affine, pad, prompt.
- build: SA-1B shard -> full JPEG decode, json, every annotation's RLE decoded (what the builder needs).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zim_lightning.data.datamodule import ZimDataModule
from zim_lightning.data.sa1b import decode_mask, iter_sa1b, iter_tar, parse_annotations
from zim_lightning.data.synthetic import generate


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_sa1b_matte(sa1b_shard: Path, alpha_root: Path, out: Path) -> Path:
    """An SA1B-Matte shard (docs/architecture.md, "File formats") from a synthetic SA-1B shard and its
    exact alphas, standing in for the builder's output."""
    members: list[tuple[str, bytes]] = []
    for sample in iter_tar(str(sa1b_shard)):
        key = sample["__key__"]
        record = parse_annotations(sample["json"], key=key)
        extra = []
        for annotation in record["annotations"]:
            path = alpha_root / key / f"{annotation['id']}.png"
            if not path.is_file():
                continue
            alpha = np.asarray(Image.open(path).convert("L"))
            ys, xs = np.nonzero(alpha)
            if ys.size == 0:
                continue
            x, y = int(xs.min()), int(ys.min())
            w, h = int(xs.max()) - x + 1, int(ys.max()) - y + 1
            member = f"matte_{annotation['id']}.png"
            annotation["matte"] = {"member": member, "box": [x, y, w, h]}
            extra.append((f"{key}.{member}", _png(alpha[y : y + h, x : x + w])))
        members += [(f"{key}.jpg", sample["jpg"]), (f"{key}.json", json.dumps(record).encode()), *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as archive:  # a plain tar, as the SA1B-Matte builder writes
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out


def prepare(root: Path, *, images: int, size: tuple[int, int], seed: int) -> dict[str, str]:
    """Generate (or reuse) the synthetic shards under ``root``; returns the shard paths per kind."""
    marker = root / "sa1b_matte" / "sa_000000.tar"
    if not marker.is_file():
        generate(
            root,
            seed=seed,
            num_shards=1,
            num_images=images,
            image_size=size,
            sa1b_size=size,
            matting_train=images,
            matting_val=1,
            seg=images,
            shard_size=images,
            micromat=1,
            eval_images=1,
        )
        write_sa1b_matte(root / "sa1b" / "sa_000000.tar", root / "sa1b_alpha", marker)
    return {
        "matting": str(root / "matting" / "train" / "matting-000000.tar"),
        "seg": str(root / "seg" / "seg-000000.tar"),
        "sa1b": str(root / "sa1b" / "sa_000000.tar"),
        "sa1b_matte": str(marker),
    }


def time_stream(batches, *, samples: int, warmup: int) -> tuple[int, float, float, int]:
    """Pull batches until ``samples`` samples after ``warmup`` batches (at least one: the first batch,
    whose size is reported).

    Returns:
        (samples, wall seconds, CPU seconds of this process, bytes of the first batch's tensors: what
        the pin-memory thread copies and what crosses to the GPU).
    """
    iterator = iter(batches)
    first = next(iterator)
    batch_bytes = sum(v.nbytes for v in first.values() if isinstance(v, torch.Tensor))
    for _ in range(warmup - 1):
        next(iterator)
    counted, start, cpu = 0, time.perf_counter(), time.process_time()
    while counted < samples:
        batch = next(iterator)
        counted += len(batch["key"])
    return counted, time.perf_counter() - start, time.process_time() - cpu, batch_bytes


def bench_train_stage(stage: str, shards: dict[str, str], args: argparse.Namespace) -> dict:
    common = dict(
        num_workers=0,
        batch_size=args.batch_size,
        seed=args.seed,
        shuffle_buffer=args.images,
        pin_memory=False,
    )
    if stage == "converter":
        data = ZimDataModule(
            stage="converter",
            train_shards=shards["matting"],
            seg_shards=shards["seg"],
            crop_size=args.crop,
            **common,
        )
    else:
        data = ZimDataModule(stage="zim", train_shards=shards["sa1b_matte"], image_size=args.frame, **common)
    counted, seconds, cpu, batch_bytes = time_stream(
        data.train_dataset(rank=0, world_size=1), samples=args.samples, warmup=1
    )
    return {
        "samples": counted,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "skipped": data.skips.total(),
        "batch_bytes": batch_bytes,
    }


def bench_build(shards: dict[str, str], args: argparse.Namespace) -> dict:
    counted = masks = 0
    start, cpu = time.perf_counter(), time.process_time()
    while counted < args.samples:
        for sample in iter_sa1b(shards["sa1b"]):
            height, width = sample["record"]["image"]["height"], sample["record"]["image"]["width"]
            for annotation in sample["record"]["annotations"]:
                decode_mask(annotation, key=sample["key"], image_size=(height, width))
                masks += 1
            counted += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "samples": counted,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "masks_per_sec_per_worker": round(masks / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/data_throughput.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, default=None, help="shard folder (generated if missing)")
    parser.add_argument("--images", type=int, default=8, help="images per generated shard")
    parser.add_argument("--size", type=int, nargs=2, default=(1500, 2250), metavar=("H", "W"))
    parser.add_argument("--samples", type=int, default=48, help="samples timed per stage")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=1024, help="converter crop side")
    parser.add_argument("--frame", type=int, default=1024, help="ZIM frame side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=["converter", "zim", "build"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # one worker process: no intra-op threads borrowed from other workers

    temporary = None
    if args.data is None:
        temporary = tempfile.TemporaryDirectory(prefix="zim-data-bench-")
        root = Path(temporary.name)
    else:
        root = args.data
    try:
        shards = prepare(root, images=args.images, size=tuple(args.size), seed=args.seed)
        for stage in args.stages:
            result = bench_build(shards, args) if stage == "build" else bench_train_stage(stage, shards, args)
            result = {
                "stage": stage,
                "samples_per_sec_per_worker": round(result["samples"] / result["seconds"], 2),
                # per CPU-second of this process: what a worker with a core to itself would reach
                "samples_per_cpu_sec": round(result["samples"] / result["cpu_seconds"], 2),
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
                "image_size": list(args.size),
                "workers": 1,
                "load_average_1min": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            }
            print(json.dumps(result))
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
