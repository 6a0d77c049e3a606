"""Throughput (and quality) of the SA1B-Matte build (ZIM paper, Sec. 3.1); prints JSON.

Three measurements over the same SA-1B shards (synthetic ones at SA-1B's image size unless ``--data``):

- ``cpu``: the CPU side, one thread, stage by stage: tar read (gzip + tar), JPEG decode, json parse, RLE
  decode, crop / resize (+ the clamp band), matte projection + PNG encode, tar write. It gives the masks/s
  one core sustains, at the data's masks per image and at SA-1B's (about 100): the DataLoader workers
  (read .. crop) and the writer threads (project, encode, write) must each stay above the GPU's rate.
- ``forward``: the converter alone, one batch of ``--batch-size`` masks at ``--crop-size`` on ``--device``
  with ``--precision`` (bf16 autocast on GPU).
- ``end_to_end``: the real build (:func:`zim_lightning.sa1b_matte.build`, Lightning's predict loop,
  DataLoader workers, writer): masks/s over the predict loop.

With synthetic data, ``--quality`` also scores the built mattes against the exact alpha of each object
(``sa1b_alpha/``): SAD = sum|p - g| / 1000 and MSE = mean((p - g)^2) * 1e3 over the whole image (paper
protocol, alpha in [0, 1]), and the same for the input mask itself (what SA1B-Matte improves on).
``--model identity`` passes the mask through the whole pipeline instead of a converter, which isolates
what the crop / resize / projection of each ``--mode`` costs.

    python benchmarks/build_throughput.py --model converter_tiny --device cpu --crop-size 256
    python benchmarks/build_throughput.py --model converter_hiera_b_plus --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import platform
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from zim_lightning import benchmarking, speed
from zim_lightning.data.sa1b import decode_image, decode_mask, iter_tar, parse_annotations
from zim_lightning.data.synthetic import generate
from zim_lightning.sa1b_matte import (
    PNG_PARAMS,
    WRITER_THREADS,
    CropConfig,
    add_converter_checkpoint_argument,
    add_crop_arguments,
    build,
    converter_mask,
    crop_config,
    crop_square,
    mask_band,
    matte_box,
    project_matte,
    resample_square,
    resolve_shards,
    rle_box,
)

#: SA-1B's average number of masks per image, to scale per-image costs.
SA1B_MASKS_PER_IMAGE = 100


class MaskPassthrough(nn.Module):
    """A stand-in "converter" that returns its input mask: isolates the pipeline's resampling error."""

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"alpha": masks.float()}


def _net(name: str, checkpoint: str | None) -> nn.Module:
    if name == "identity":
        return MaskPassthrough()
    from zim_lightning.models.converter import converter_model_registry

    torch.manual_seed(0)
    return converter_model_registry[name](checkpoint=checkpoint).eval()


def cpu_breakdown(shards: list[Path], config: CropConfig) -> dict:
    """CPU seconds per stage over all samples, one thread; see the module docstring.

    Process CPU time rather than wall time: on a shared machine it still measures what one core
    costs, not how busy the neighbours are.
    """
    cv2.setNumThreads(1)
    times = dict.fromkeys(("read", "jpeg", "json", "rle", "crop", "png", "tar"), 0.0)
    images = masks = 0
    size = config.crop_size
    for shard in shards:
        start = time.process_time()
        samples = list(iter_tar(str(shard)))
        times["read"] += time.process_time() - start
        members: list[tuple[str, bytes]] = []
        for sample in samples:
            key = sample["__key__"]
            t0 = time.process_time()
            image = decode_image(sample["jpg"], key=key)
            t1 = time.process_time()
            record = parse_annotations(sample["json"], key=key)
            times["jpeg"] += t1 - t0
            times["json"] += time.process_time() - t1
            height, width = image.shape[:2]
            images += 1
            members += [(f"{key}.jpg", sample["jpg"]), (f"{key}.json", sample["json"])]
            whole = None
            if config.mode == "whole":
                t0 = time.process_time()
                whole = resample_square(
                    image, *crop_square((0, 0, width, height), (height, width), config), size
                )
                times["crop"] += time.process_time() - t0
            for annotation in record["annotations"]:
                t0 = time.process_time()
                mask = decode_mask(annotation, key=key, image_size=(height, width))
                t1 = time.process_time()
                box = rle_box(annotation)
                bx, by, bw, bh, margin = matte_box(box, (height, width), config.margin)
                square = crop_square(box, (height, width), config)
                band = mask_band(mask[by : by + bh, bx : bx + bw], margin) if config.clamp else None
                x0, y0, side = square
                alpha = converter_mask(mask, x0, y0, side, size)
                if whole is None:
                    resample_square(image, x0, y0, side, size)
                t2 = time.process_time()
                # the resampled mask stands in for the converter's output (same size, similar content)
                matte = project_matte(alpha, square, (bx, by, bw, bh))
                if band is not None:
                    matte *= band
                ok, png = cv2.imencode(".png", matte, list(PNG_PARAMS))
                t3 = time.process_time()
                members.append((f"{key}.matte_{annotation['id']}.png", png.tobytes()))
                times["rle"] += t1 - t0
                times["crop"] += t2 - t1
                times["png"] += t3 - t2
                masks += 1
        start = time.process_time()
        with tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        times["tar"] += time.process_time() - start
    per_image = {k: times[k] / images * 1e3 for k in ("read", "jpeg", "json")}
    per_mask = {k: times[k] / masks * 1e3 for k in ("rle", "crop", "png", "tar")}

    def ceiling(masks_per_image: float) -> dict:
        image_ms = sum(per_image.values()) / masks_per_image
        worker_ms = image_ms + per_mask["rle"] + per_mask["crop"]
        writer_ms = per_mask["png"] + per_mask["tar"]
        return {
            "masks_per_image": masks_per_image,
            "worker_masks_per_s_per_core": 1e3 / worker_ms,
            "writer_masks_per_s_per_thread": 1e3 / writer_ms,
            "one_core_all_stages_masks_per_s": 1e3 / (worker_ms + writer_ms),
        }

    return {
        "images": images,
        "masks": masks,
        "ms_per_image": per_image,
        "ms_per_mask": per_mask,
        "ceiling_this_data": ceiling(masks / images),
        "ceiling_sa1b_100_masks_per_image": ceiling(SA1B_MASKS_PER_IMAGE),
        "writer_threads": WRITER_THREADS,
    }


def forward_speed(
    net: nn.Module, *, device: str, precision: str, batch: int, size: int, repeats: int
) -> dict:
    """Masks/s of the converter alone on random inputs."""
    net = net.to(device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device).float()
    masks = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None),
        ):
            net(images, masks)

    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return {"ms_per_batch": seconds * 1e3, "masks_per_s": batch / seconds}


#: Upper edges of the zoom buckets of ``quality``: the converter's crop side over the image square's.
ZOOM_BUCKETS = (1.0, 2.0, 4.0, float("inf"))


def quality(out: Path, shards: list[Path], alpha_dir: Path, config: CropConfig) -> dict:
    """Mean SAD / MSE (paper protocol) of the built mattes and of the input masks vs the exact alpha.

    Also per zoom (``crop_size`` over the side of the image square the converter saw, > 1 where a small
    mask is enlarged): the matte's SAD per bucket of :data:`ZOOM_BUCKETS`.
    """
    rows = {"matte": [], "mask": [], "mass_outside_box": [], "mass_outside_band": [], "zoom": []}
    for shard in shards:
        with tarfile.open(out / shard.name) as tar:
            data = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, blob in data.items():
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            record = json.loads(blob)
            height, width = record["image"]["height"], record["image"]["width"]
            for annotation in record["annotations"]:
                truth_path = alpha_dir / key / f"{annotation['id']}.png"
                if "matte" not in annotation or not truth_path.is_file():
                    continue  # background "stuff" regions have no exact alpha
                truth = cv2.imread(str(truth_path), cv2.IMREAD_GRAYSCALE).astype(np.float64) / 255
                x, y, w, h = annotation["matte"]["box"]
                png = data[f"{key}.{annotation['matte']['member']}"]
                pred = np.zeros((height, width))
                pred[y : y + h, x : x + w] = (
                    cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE) / 255
                )
                mask = decode_mask(annotation, key=key).astype(np.float64)
                for kind, p in (("matte", pred), ("mask", mask)):
                    rows[kind].append((np.abs(p - truth).sum() / 1e3, ((p - truth) ** 2).mean() * 1e3))
                total = max(truth.sum(), 1e-9)
                rows["mass_outside_box"].append(1 - truth[y : y + h, x : x + w].sum() / total)
                # what the clamp would cut from a perfect matte: true alpha beyond the margin band
                box = rle_box(annotation)
                _, _, _, _, margin = matte_box(box, (height, width), config.margin)
                band = mask_band(mask[y : y + h, x : x + w].astype(np.uint8), margin)
                rows["mass_outside_band"].append(1 - (truth[y : y + h, x : x + w] * band).sum() / total)
                rows["zoom"].append(config.crop_size / crop_square(box, (height, width), config)[2])
    summary = {
        kind: {
            "sad": float(np.mean([r[0] for r in rows[kind]])),
            "mse": float(np.mean([r[1] for r in rows[kind]])),
        }
        for kind in ("matte", "mask")
    }
    summary["instances"] = len(rows["matte"])
    summary["truth_mass_outside_matte_box"] = float(np.mean(rows["mass_outside_box"]))
    summary["truth_mass_outside_clamp_band"] = float(np.mean(rows["mass_outside_band"]))
    zoom, sad = np.array(rows["zoom"]), np.array([r[0] for r in rows["matte"]])
    summary["matte_sad_by_zoom"] = {}
    low = 0.0
    for high in ZOOM_BUCKETS:
        inside = (zoom > low) & (zoom <= high)
        if inside.any():
            summary["matte_sad_by_zoom"][f"({low:g}, {high:g}]"] = {
                "instances": int(inside.sum()),
                "sad": float(sad[inside].mean()),
            }
        low = high
    return summary


def _hw(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="converter_tiny", help="converter_tiny, converter_hiera_b_plus or identity"
    )
    add_converter_checkpoint_argument(p)  # the builder's own
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("32", "bf16"), default=None, help="default bf16 on cuda, else 32")
    add_crop_arguments(p)  # the builder's own crop options
    p.add_argument("--channels-last", action="store_true", help="NHWC convolution weights")
    p.add_argument(
        "--compile", default=None, choices=speed.COMPILE_MODES, help="torch.compile mode (default: eager)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed forward batches")
    p.add_argument(
        "--data", default=None, help="SA-1B shards (default: synthetic ones, written to a temp dir)"
    )
    p.add_argument("--image-size", type=_hw, default=(1500, 2250), help="synthetic image HxW (SA-1B's)")
    p.add_argument("--images", type=int, default=4, help="synthetic images per shard")
    p.add_argument("--shards", type=int, default=2, help="synthetic shards")
    p.add_argument("--quality", action="store_true", help="score mattes against the synthetic exact alpha")
    p.add_argument(
        "--alpha", type=Path, default=None, help="with --data: its exact alphas (synthetic sa1b_alpha/)"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=("cpu", "forward", "end_to_end"))
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "32")
    config = crop_config(args)
    report: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "model": args.model,
        "precision": precision,
        **dataclasses.asdict(config),
        "batch_size": args.batch_size,
        "channels_last": args.channels_last,
        "compile": args.compile,
    }
    needs_data = "cpu" not in args.skip or "end_to_end" not in args.skip or args.quality
    with tempfile.TemporaryDirectory() as tmp:
        if not needs_data:  # the forward alone runs on random batches
            shards, alpha_dir = [], None
        elif args.data is None:
            root = Path(tmp) / "synthetic"
            generate(
                root,
                seed=0,
                num_shards=args.shards,
                num_images=args.images,
                sa1b_size=args.image_size,
                matting_train=1,
                matting_val=1,
                seg=1,
                shard_size=1,
                micromat=1,
                eval_images=1,
            )
            shards, alpha_dir = resolve_shards([str(root / "sa1b")]), root / "sa1b_alpha"
            report["data"] = (
                f"synthetic {args.shards}x{args.images} images of {args.image_size[0]}x{args.image_size[1]}"
            )
        else:
            shards, alpha_dir = resolve_shards([args.data]), args.alpha
            report["data"] = f"{len(shards)} shards"
        if "cpu" not in args.skip:
            report["cpu"] = cpu_breakdown(shards, config)
        net = _net(args.model, args.converter)
        if args.channels_last and args.model != "identity":
            speed.to_channels_last(net)
        if args.compile is not None and args.model != "identity":
            speed.compile_model(net, mode=args.compile, parts=None)  # compiles at the first (untimed) batch
        if "forward" not in args.skip and args.model != "identity":
            report["forward"] = forward_speed(
                net,
                device=args.device,
                precision=precision,
                batch=args.batch_size,
                size=args.crop_size,
                repeats=args.repeats,
            )
        if "end_to_end" not in args.skip or args.quality:
            out = Path(tmp) / "out"
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON report only
                summary = build(
                    sa1b=[str(s) for s in shards],
                    out=out,
                    net=net.cpu(),
                    model=args.model,
                    config=config,
                    batch_size=args.batch_size,
                    num_workers=args.num_workers,
                    accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                    devices=1,
                    precision="bf16-mixed" if precision == "bf16" else "32-true",
                )
            report["end_to_end"] = {
                "masks": summary["masks"],
                "seconds": summary["seconds"],
                "masks_per_s": summary["masks"] / summary["seconds"],
                "num_workers": args.num_workers,
            }
            if args.quality and alpha_dir is not None:
                report["quality"] = quality(out, shards, alpha_dir, config)
    benchmarking.emit_report(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
