"""The whole ZIM pipeline end to end on the synthetic sample, on a CPU in minutes (`make demo`).

The stages of the paper (Sec. 3.1 converter, SA1B-Matte; Sec. 3.2-3.3 ZIM; Sec. 5 evaluation), each at
toy scale and each through the project's own entry points, in-process:

1. ``zim-lightning synth``: the synthetic SA-1B, matting, segmentation and MicroMat-3K folders;
2. ``zim-lightning fit`` with ``configs/converter/tiny.yaml``: a tiny label converter;
3. ``zim-lightning build-sa1b-matte``: SA1B-Matte from the synthetic SA-1B with that converter
   (``--zim-data matting`` skips it and trains ZIM on the synthetic matting shards instead);
4. ``zim-lightning fit`` with ``configs/zim/tiny.yaml``: a tiny ZIM on those mattes;
5. ``zim-lightning eval --run-config RUN/config.yaml --checkpoint RUN/checkpoints/last.ckpt`` on the
   synthetic MicroMat-3K (point and box prompts, the binary baseline): the ZIM rebuilt from its run's
   saved config, in its 256-pixel frame, with the weights of its last checkpoint.

Writes ``OUT/metrics.json``, ``OUT/report.md``, ``OUT/grids/*.png`` (prompts and predicted mattes),
``OUT/instances.csv`` and the runs (``OUT/runs``: configs, CSV logs, training grids, checkpoints). The
numbers of a tiny model trained for a few hundred steps show that the pipeline works, not what ZIM can do.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Where the configs live in a checkout (src/zim_lightning/demo.py -> repository root / configs).
DEFAULT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ZIM_DATA = ("sa1b-matte", "matting")
#: ``synthetic.generate`` sizes of ``--small-data``: every part present, a few samples each.
SMALL_DATA: dict[str, Any] = {
    "num_shards": 1,
    "num_images": 2,
    "image_size": (128, 160),
    "matting_train": 8,
    "matting_val": 4,
    "seg": 4,
    "shard_size": 8,
    "micromat": 2,
    "eval_images": 1,
}


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zim_lightning.demo",
        description="Synthetic data -> converter -> SA1B-Matte -> ZIM -> MicroMat-3K evaluation, on CPU.",
    )
    p.add_argument("--out", type=Path, default=Path("reports/demo"), help="output folder (reports/demo)")
    p.add_argument("--seed", type=_non_negative, default=0, help="seed of the data and of training (0)")
    p.add_argument("--configs", type=Path, default=DEFAULT_CONFIGS, help="the repository's configs/ folder")
    p.add_argument(
        "--zim-data",
        choices=ZIM_DATA,
        default="sa1b-matte",
        help="train ZIM on SA1B-Matte built by the converter (paper) or on the synthetic matting shards",
    )
    p.add_argument("--converter-steps", type=int, default=600, help="converter optimiser steps (600)")
    p.add_argument("--zim-steps", type=int, default=400, help="ZIM optimiser steps (400)")
    p.add_argument("--frame", type=int, default=256, help="ZIM frame side in pixels (256)")
    p.add_argument("--crop-size", type=int, default=128, help="converter crop side, multiple of 32 (128)")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (1)")
    p.add_argument(
        "--small-data", action="store_true", help="a much smaller synthetic dataset (smoke tests of the demo)"
    )
    return p


def _fit(configs: Path, stage_config: str, run_dir: Path, overrides: list[str], paths: dict[str, Any]) -> Any:
    """``zim-lightning fit -c configs/trainer/cpu.yaml -c STAGE_CONFIG -c PATHS OVERRIDES`` in-process.

    ``paths`` (dotted keys -> paths or lists of them) go in through a YAML file in ``run_dir``: the CLI
    parses command-line values as YAML, so a path holding a comma or ": " would become a list or a
    mapping there, and quoting it keeps the quotes in a ``str`` argument.
    """
    import yaml

    from zim_lightning.lit.cli import cli_main

    run_dir.mkdir(parents=True, exist_ok=True)
    nested: dict[str, Any] = {}
    for key, value in {
        "trainer.default_root_dir": run_dir,
        "trainer.logger.init_args.save_dir": run_dir,
        **paths,
    }.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = [str(v) for v in value] if isinstance(value, list) else str(value)
    paths_config = run_dir / "demo_paths.yaml"
    paths_config.write_text(yaml.safe_dump(nested))
    args = [
        "fit",
        "-c",
        str(configs / "trainer" / "cpu.yaml"),
        "-c",
        str(configs / stage_config),
        "-c",
        str(paths_config),
        *overrides,
    ]
    return cli_main(args)


def _last_checkpoint(cli: Any) -> Path:
    path = Path(cli.trainer.checkpoint_callback.last_model_path or "")
    if not path.is_file():
        raise RuntimeError(f"training wrote no last checkpoint under {cli.trainer.log_dir}")
    return path


def evaluate_network(
    net: Any,
    data: Path,
    out: Path,
    *,
    seed: int,
    num_workers: int,
    checkpoint: str | None = None,
    model_name: str = "tiny ZIM (configs/zim/tiny.yaml)",
) -> dict[str, Any]:
    """Score a built ZIM on a MicroMat-3K folder as ``zim-lightning eval`` does; write its outputs.

    The Python API of the evaluation for a network held in memory (scripts/results_zim.py); the demo
    itself evaluates its saved run through the command (``--run-config``).

    Args:
        net: a built ZIM holding its weights (any frame size).
        data: the MicroMat-3K folder.
        out: where ``instances.csv``, ``eval_report.md`` and ``grids/`` go.
        seed: seed of the derived point prompts.
        num_workers: DataLoader workers.
        checkpoint: where the network's weights are saved, for the report.
        model_name: what the report calls the network.

    Returns:
        The metrics document (the caller writes it, e.g. as ``metrics.json``).
    """
    import lightning as L

    from zim_lightning.data.datamodule import ZimDataModule
    from zim_lightning.data.micromat import build_eval_dataset
    from zim_lightning.evaluate import (
        PREDICTION_BITS,
        metrics_document,
        report_markdown,
        write_grids,
        write_instances_csv,
    )
    from zim_lightning.lit.eval_module import EvalModule

    dataset = build_eval_dataset(str(data), format="micromat", prompt="both", subset=None, seed=seed)
    module = EvalModule(
        net=net.eval(),
        prompts=["point", "box"],
        protocol="paper",
        subsets=dataset.subsets,
        baselines=["binary"],
        quantize_bits=PREDICTION_BITS,
    )
    datamodule = ZimDataModule(
        stage="eval",
        eval_root=str(data),
        eval_format="micromat",
        eval_prompt="both",
        batch_size=1,
        num_workers=num_workers,
        seed=seed,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "model": model_name,
        "checkpoint": checkpoint,
        "format": "micromat",
        "data": str(data),
        "prediction_bits": PREDICTION_BITS,
    }
    doc = metrics_document(module.results, protocol="paper", info=info)
    write_instances_csv(out / "instances.csv", module, dataset)
    grids = write_grids(out, module, dataset, count=4, saved=False)
    (out / "eval_report.md").write_text(report_markdown(doc, grids=grids, out=out))
    return doc


def _val_metrics(cli: Any) -> dict[str, float]:
    return {
        k: round(float(v), 4) for k, v in sorted(cli.trainer.callback_metrics.items()) if k.startswith("val/")
    }


def _report(summary: dict[str, Any], eval_report: str) -> str:
    lines = [
        "# zim-lightning demo",
        "",
        "Synthetic data -> tiny label converter -> SA1B-Matte -> tiny ZIM -> synthetic MicroMat-3K, on CPU.",
        "A tiny network trained for a few hundred steps shows that every stage runs and connects; its",
        "numbers say nothing about ZIM at paper scale.",
        "",
        "| stage | seconds | notes |",
        "|---|---:|---|",
    ]
    for stage in summary["stages"]:
        lines.append(f"| {stage['name']} | {stage['seconds']:.1f} | {stage.get('notes', '')} |")
    lines += ["", f"Total: {summary['seconds']:.1f} s. ZIM trained on: {summary['zim_data']}.", ""]
    lines.append(eval_report)
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; returns the summary written to ``metrics.json`` (beside the evaluation)."""
    from rich.console import Console

    from zim_lightning.data.synthetic import generate
    from zim_lightning.evaluate import main as evaluate
    from zim_lightning.sa1b_matte import main as build_sa1b_matte

    console = Console()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data, runs = out / "data", out / "runs"
    stages: list[dict[str, Any]] = []
    start = time.perf_counter()

    def stage(name: str) -> float:
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    t = stage("1/5 synthetic data")
    sizes = SMALL_DATA if args.small_data else {}
    layout = generate(data, seed=args.seed, **sizes)
    stages.append({"name": "synthetic data", "seconds": time.perf_counter() - t})

    t = stage("2/5 label converter")
    converter = _fit(
        args.configs,
        "converter/tiny.yaml",
        runs / "converter",
        [
            f"--seed_everything={args.seed}",
            f"--data.init_args.crop_size={args.crop_size}",
            f"--data.init_args.num_workers={args.num_workers}",
            f"--trainer.max_steps={args.converter_steps}",
            f"--trainer.val_check_interval={args.converter_steps}",
        ],
        {
            "data.init_args.train_shards": [str(p) for p in layout.matting_train],
            "data.init_args.val_shards": layout.matting_val[0],
            "data.init_args.seg_shards": layout.seg[0],
        },
    )
    converter_ckpt = _last_checkpoint(converter)
    conv_val = _val_metrics(converter)
    stages.append(
        {
            "name": "converter training",
            "seconds": time.perf_counter() - t,
            "notes": f"{args.converter_steps} steps; val SAD {conv_val.get('val/sad', float('nan')):.3f} "
            f"vs coarse input {conv_val.get('val/sad_input', float('nan')):.3f}",
            "val": conv_val,
        }
    )

    if args.zim_data == "sa1b-matte":
        t = stage("3/5 SA1B-Matte")
        matte_dir = out / "sa1b_matte"
        # a fresh build: shards an earlier demo built (another converter, other data) must not be resumed
        shutil.rmtree(matte_dir, ignore_errors=True)
        code = build_sa1b_matte(
            [
                "--sa1b",
                str(data / "sa1b"),
                "--out",
                str(matte_dir),
                "--checkpoint",
                str(converter_ckpt),
                "--model",
                "converter_tiny",
                "--crop-size",
                str(args.crop_size),
                "--batch-size",
                "16",
                "--num-workers",
                "0",
                "--accelerator",
                "cpu",
                "--devices",
                "1",
            ]
        )
        if code != 0:
            raise RuntimeError(f"build-sa1b-matte exited with {code}")
        zim_train = sorted(str(p) for p in matte_dir.glob("sa_*.tar"))
        stages.append(
            {"name": "SA1B-Matte", "seconds": time.perf_counter() - t, "notes": f"{len(zim_train)} shards"}
        )
    else:
        zim_train = [str(p) for p in layout.matting_train]
        stages.append({"name": "SA1B-Matte", "seconds": 0.0, "notes": "skipped (--zim-data matting)"})

    t = stage("4/5 ZIM")
    zim = _fit(
        args.configs,
        "zim/tiny.yaml",
        runs / "zim",
        [
            f"--seed_everything={args.seed}",
            f"--data.init_args.image_size={args.frame}",
            f"--model.init_args.net.init_args.image_size={args.frame}",
            f"--data.init_args.num_workers={args.num_workers}",
            f"--trainer.max_steps={args.zim_steps}",
            f"--trainer.val_check_interval={args.zim_steps}",
        ],
        {"data.init_args.train_shards": zim_train, "data.init_args.val_shards": layout.matting_val[0]},
    )
    zim_val = _val_metrics(zim)
    stages.append(
        {
            "name": "ZIM training",
            "seconds": time.perf_counter() - t,
            "notes": f"{args.zim_steps} steps, frame {args.frame}; val SAD {zim_val.get('val/sad', float('nan')):.3f}",
            "val": zim_val,
        }
    )

    t = stage("5/5 evaluation on MicroMat-3K (synthetic)")
    zim_ckpt = _last_checkpoint(zim)
    code = evaluate(
        [
            "--run-config",
            str(Path(zim.trainer.log_dir) / "config.yaml"),
            "--checkpoint",
            str(zim_ckpt),
            "--data",
            str(layout.micromat),
            "--format",
            "micromat",
            "--out",
            str(out),
            "--baselines",
            "binary",
            "--seed",
            str(args.seed),
            "--accelerator",
            "cpu",
            "--devices",
            "1",
            "--num-workers",
            "0",
        ]
    )
    if code != 0:
        raise RuntimeError(f"eval exited with {code}")
    doc = json.loads((out / "metrics.json").read_text())
    # report.md becomes the demo's report below; the evaluation's own stays beside it
    eval_report = (out / "report.md").read_text()
    (out / "eval_report.md").write_text(eval_report)
    stages.append(
        {"name": "evaluation", "seconds": time.perf_counter() - t, "notes": "point and box prompts"}
    )

    summary = {
        "seconds": time.perf_counter() - start,
        "seed": args.seed,
        "zim_data": args.zim_data,
        "stages": stages,
        "checkpoints": {"converter": str(converter_ckpt), "zim": str(zim_ckpt)},
    }
    doc["demo"] = summary
    (out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "report.md").write_text(_report(summary, eval_report))
    console.rule(f"[bold green]done in {summary['seconds']:.0f} s: {out / 'report.md'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m zim_lightning.demo --out reports/demo`; returns 0, or 2 on bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not (args.configs / "trainer" / "cpu.yaml").is_file():
        parser.error(f"--configs {str(args.configs)!r} is not the repository's configs/ folder")
    for name in ("converter_steps", "zim_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.frame < 16 or args.frame % 16 or args.crop_size < 32 or args.crop_size % 32:
        parser.error("--frame must be a positive multiple of 16 and --crop-size a positive multiple of 32")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
