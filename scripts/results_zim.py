"""docs/results.md, ZIM lines: tiny ZIM vs the tiny SAM architecture trained alike, over seeds.

Both networks are configs/zim/tiny.yaml (CPU, 256-pixel frame), trained for the same steps on the same
synthetic matting shards with the same seeds; the SAM architecture switches off the two ZIM changes
(``masked_attention=false``, ``pixel_decoder=sam``). Each is scored on the synthetic MicroMat-3K with its
box and point prompts by ``zim-lightning eval``'s evaluation (paper protocol, via its Python API).
Prints JSON (and writes it with --json).

    python scripts/results_zim.py --work runs/results --json docs/results/zim.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from results_common import fit, loss_curve, machine, spread, write_report

from zim_lightning.demo import evaluate_network

VARIANTS = {
    "zim": [],
    "sam_arch": [
        "--model.init_args.net.init_args.masked_attention=false",
        "--model.init_args.net.init_args.pixel_decoder=sam",
    ],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/results"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--frame", type=int, default=256)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    data = args.work / "data"
    if not (data / "micromat" / "data_list.txt").is_file():
        raise SystemExit(f"{data} holds no synthetic dataset; run scripts/results_converter.py first")

    runs = []
    for seed in args.seeds:
        for variant, overrides in VARIANTS.items():
            run_dir = args.work / f"{variant}_seed{seed}"
            cli, cpu = fit(
                "zim/tiny.yaml",
                data,
                run_dir,
                seed=seed,
                steps=args.steps,
                extra=[
                    f"--data.init_args.image_size={args.frame}",
                    f"--model.init_args.net.init_args.image_size={args.frame}",
                    *overrides,
                ],
            )
            doc = evaluate_network(
                cli.model.net,
                data / "micromat",
                run_dir / "eval",
                seed=seed,
                num_workers=0,
                model_name=f"tiny ZIM (configs/zim/tiny.yaml, {variant} variant)",
            )
            runs.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "cpu_seconds_train": round(cpu, 1),
                    "results": doc["results"],
                    "loss_curve": loss_curve(Path(cli.trainer.log_dir)),
                }
            )

    summary = {}
    for variant in VARIANTS:
        for subset in ("fine", "coarse"):
            for prompt in ("box", "point"):
                sads = [r["results"][subset][prompt]["sad"] for r in runs if r["variant"] == variant]
                summary[f"{variant}/{subset}/{prompt}/sad"] = spread(sads)
    doc = {
        "what": "tiny ZIM vs tiny SAM architecture (masked_attention off, pixel_decoder sam), same data, "
        "steps and seeds; synthetic MicroMat-3K, paper protocol",
        "machine": machine(),
        "steps": args.steps,
        "frame": args.frame,
        "summary": summary,
        "runs": runs,
    }
    write_report(doc, args.json)


if __name__ == "__main__":
    main()
