"""Cost of scoring one instance with the matting metrics (``zim-lightning eval``'s per-instance work
besides the prediction); prints JSON.

``eval`` scores every prediction at the image's original resolution, in float64: SAD, MSE, MAE, the
gradient error (3x3 Sobel for the paper protocol, Gaussian derivatives for dim) and the connectivity
error (connected components at ten thresholds, on the CPU). This script times
:func:`~zim_lightning.metrics.matting_errors` for both protocols and, apart, its two costly parts, on
a soft disc matte and a noisy prediction of it (the noise spreads the connectivity error's work over
the whole object) for a few image sizes.

    python benchmarks/eval_scoring.py                      # CPU
    python benchmarks/eval_scoring.py --device cuda        # the filters on the GPU (Conn stays on the CPU)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from zim_lightning import metrics
from zim_lightning.benchmarking import describe_environment, emit_report, image_sizes, measure_ms

#: (H, W): the model's frame, an SA-1B-sized image, a 12-megapixel photo.
DEFAULT_SIZES = ("1024x1024", "1500x2250", "3000x4000")


def disc_pair(height: int, width: int, *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A soft-edged disc over a third of the short side (ground truth) and a noisy copy (prediction)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(height, dtype=torch.float64)[:, None] - height / 2
    cols = torch.arange(width, dtype=torch.float64)[None, :] - width / 2
    radius = min(height, width) / 3
    gt = ((rows.square() + cols.square()) <= radius**2).double()
    gt = F.avg_pool2d(gt[None, None], 9, stride=1, padding=4, count_include_pad=False)[0, 0]
    noise = 0.05 * torch.randn(height, width, generator=generator, dtype=torch.float64)
    pred = (gt + noise).clamp(0, 1)
    return pred.to(device), gt.to(device)


def time_size(height: int, width: int, *, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median times (ms) of both protocols and of their costly parts for one image size."""
    pred, gt = disc_pair(height, width, device=device)
    both = torch.stack([pred, gt])
    timing = {"device": device, "warmup": warmup, "repeats": repeats}
    calls = {
        **{
            f"{protocol}_ms": lambda protocol=protocol: metrics.matting_errors(pred, gt, protocol)
            for protocol in metrics.PROTOCOLS
        },
        "sobel_ms": lambda: metrics.sobel_magnitude(both),
        "gaussian_gradient_ms": lambda: metrics.gaussian_gradient_magnitude(both),
        "conn_ms": lambda: metrics.connectivity_error(pred, gt),
    }
    entry: dict = {"size": [height, width], "megapixels": round(height * width / 1e6, 2)}
    entry.update({name: measure_ms(call, **timing)["median"] for name, call in calls.items()})
    entry["paper_errors"] = metrics.matting_errors(pred, gt, "paper")  # what was scored
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="eval_scoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", type=image_sizes, default=",".join(DEFAULT_SIZES), help="comma-separated HxW sizes"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report: dict = {"environment": describe_environment(device), "sizes": []}
    for height, width in args.sizes:
        report["sizes"].append(
            time_size(height, width, device=device, warmup=args.warmup, repeats=args.repeats)
        )
    emit_report(report, args.json_out)
    return report


if __name__ == "__main__":
    main()
