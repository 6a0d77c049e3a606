"""Host-side cost of ``ZimPredictor.set_image``'s preprocessing, per ``resize`` mode; prints JSON.

``set_image`` first brings a NumPy image to the model's 1024 frame (``ZimPredictor.to_frame``): with
``resize="pil"`` through segment-anything's ``ResizeLongestSide`` (Pillow on the host, exactly the
official predictor), with ``resize="tensor"`` through torchvision's antialiased bilinear resize on the
model's device; either skips an image already at the frame's size. This script times ``to_frame`` alone
(the encoder is the same either way) for a few image sizes, beside segment-anything's own
preprocessing (``ResizeLongestSide.apply_image`` then the upload, which always goes through Pillow),
and reports how many pixels of the two modes' outputs differ and by how much.

    python benchmarks/preprocess_latency.py                     # CPU
    python benchmarks/preprocess_latency.py --device cuda       # tensor mode resizes on the GPU

The network is a tiny ZIM at the 1024 frame (preprocessing does not depend on its size).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import data

from zim_lightning.benchmarking import image_sizes
from zim_lightning.models.build import zim_model_registry
from zim_lightning.predictor import RESIZE_MODES, ZimPredictor

#: (H, W): the frame itself (no resize), a small photo (enlarged), an SA-1B image, a 12-megapixel photo.
DEFAULT_SIZES = ("1024x1024", "480x640", "1500x2250", "3000x4000")


def photo(height: int, width: int) -> np.ndarray:
    """scikit-image's astronaut tiled to the size: real image content for the resampling filters."""
    tile = data.astronaut()
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    return np.ascontiguousarray(np.tile(tile, reps)[:height, :width])


def time_ms(call, *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``call`` in ms, the device synchronised after each call."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="preprocess_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", type=image_sizes, default=",".join(DEFAULT_SIZES), help="comma-separated HxW sizes"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    net = zim_model_registry["tiny"]().eval().to(device)
    report: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": [],
    }
    transform = ResizeLongestSide(net.image_size)
    for height, width in args.sizes:
        image = photo(height, width)
        entry: dict = {"size": [height, width]}
        timing = {"device": device, "warmup": args.warmup, "repeats": args.repeats}

        def official(image: np.ndarray = image) -> torch.Tensor:
            # segment-anything's and the official predictor's preprocessing: always through Pillow
            return torch.as_tensor(transform.apply_image(image), device=device).permute(2, 0, 1)[None]

        entry["segment_anything_ms"] = round(time_ms(official, **timing), 3)
        frames = {}
        for mode in RESIZE_MODES:
            predictor = ZimPredictor(net, resize=mode)
            frames[mode] = predictor.to_frame(image).cpu()
            entry[f"{mode}_ms"] = round(time_ms(lambda p=predictor, i=image: p.to_frame(i), **timing), 3)
        assert torch.equal(frames["pil"], official().cpu())  # "pil" is the official preprocessing
        difference = (frames["pil"].int() - frames["tensor"].int()).abs()
        entry["frame"] = list(frames["pil"].shape[-2:])
        entry["pixels_differing"] = float((difference > 0).float().mean())
        entry["max_level_difference"] = int(difference.max())
        entry["tensor_speedup_over_segment_anything"] = round(
            entry["segment_anything_ms"] / entry["tensor_ms"], 1
        )
        report["sizes"].append(entry)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
