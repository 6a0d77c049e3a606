"""docs/results.md, converter lines: the tiny label converter vs the identity baseline, over seeds.

Trains the tiny converter (configs/converter/tiny.yaml, CPU) on the synthetic matting + segmentation
shards once per seed, then converts the held-out synthetic MicroMat-3K segmentation masks (``seg/``
column of data_list.txt) into mattes and scores them against the true mattes with the paper protocol.
The identity baseline takes the segmentation mask itself as the matte, which is what a converter that
learned nothing useful would leave. Prints JSON (and writes it with --json).

    python scripts/results_converter.py --work runs/results --json docs/results/converter.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_common import fit, loss_curve, machine, spread, write_report

from zim_lightning.data.synthetic import generate
from zim_lightning.metrics import METRIC_NAMES, matting_errors


def synthetic(work: Path, *, micromat: int) -> Path:
    """The shared synthetic dataset (seed 0), written once."""
    data = work / "data"
    if not (data / "micromat" / "data_list.txt").is_file():
        generate(data, seed=0, micromat=micromat)
    return data


def train(data: Path, work: Path, *, seed: int, steps: int, crop: int) -> tuple[torch.nn.Module, Path, float]:
    cli, cpu = fit(
        "converter/tiny.yaml",
        data,
        work / f"converter_seed{seed}",
        seed=seed,
        steps=steps,
        extra=[
            f"--data.init_args.seg_shards={data}/seg/seg-000000.tar",
            f"--data.init_args.crop_size={crop}",
        ],
    )
    return cli.model.net.eval(), Path(cli.trainer.log_dir), cpu


def instances(micromat: Path, subset: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image HxWx3 uint8, seg HxW {0,1}, matte HxW [0,1]) of a subset, from data_list.txt."""
    out = []
    for line in (micromat / "data_list.txt").read_text().splitlines():
        image, matte, _prompt, seg = line.split()
        if f"/{subset}/" not in matte:
            continue
        out.append(
            (
                np.asarray(Image.open(micromat / image).convert("RGB")),
                (np.asarray(Image.open(micromat / seg).convert("L")) > 127).astype(np.float32),
                np.asarray(Image.open(micromat / matte).convert("L")).astype(np.float64) / 255.0,
            )
        )
    return out


@torch.no_grad()
def score(net: torch.nn.Module, items: list) -> dict[str, dict[str, float]]:
    """Mean paper-protocol errors of the converter and of the identity baseline."""
    rows: dict[str, list[dict[str, float]]] = {"converter": [], "identity": []}
    for image, seg, matte in items:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        m = torch.from_numpy(seg)[None, None]
        alpha = net(x, m)["alpha"][0, 0].double()
        gt = torch.from_numpy(matte)
        rows["converter"].append(matting_errors(alpha, gt))
        rows["identity"].append(matting_errors(torch.from_numpy(seg).double(), gt))
    return {k: {n: statistics.fmean(r[n] for r in v) for n in METRIC_NAMES} for k, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--micromat", type=int, default=40, help="synthetic MicroMat-3K instances")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    data = synthetic(args.work, micromat=args.micromat)
    subsets = {s: instances(data / "micromat", s) for s in ("fine", "coarse")}
    runs = []
    for seed in args.seeds:
        net, log_dir, cpu = train(data, args.work, seed=seed, steps=args.steps, crop=args.crop)
        runs.append(
            {
                "seed": seed,
                "cpu_seconds": round(cpu, 1),
                "errors": {s: score(net, items) for s, items in subsets.items()},
                "loss_curve": loss_curve(log_dir),
            }
        )
    summary = {}
    for subset in subsets:
        for method in ("converter", "identity"):
            sads = [r["errors"][subset][method]["sad"] for r in runs]
            summary[f"{subset}/{method}/sad"] = spread(sads)
    doc = {
        "what": "tiny converter vs identity (mask as matte) on synthetic MicroMat-3K seg -> matte, paper protocol",
        "machine": machine(),
        "steps": args.steps,
        "crop": args.crop,
        "instances": {s: len(v) for s, v in subsets.items()},
        "summary": summary,
        "runs": runs,
    }
    write_report(doc, args.json)


if __name__ == "__main__":
    main()
