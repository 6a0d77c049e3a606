"""What the docs/results.md scripts share: the loss curve of a run, the spread over seeds, the report."""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from zim_lightning.lit.cli import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fit(
    config: str, data: Path, run_dir: Path, *, seed: int, steps: int, extra: list[str]
) -> tuple[Any, float]:
    """``zim-lightning fit`` of ``configs/CONFIG`` on the CPU with the synthetic matting shards.

    Returns:
        The LightningCLI after training, and the process CPU seconds it took.
    """
    start = time.process_time()
    cli = cli_main(
        [
            "fit",
            "-c",
            str(CONFIGS / "trainer" / "cpu.yaml"),
            "-c",
            str(CONFIGS / config),
            f"--seed_everything={seed}",
            f"--data.init_args.train_shards={data}/matting/train/matting-{{000000..000001}}.tar",
            f"--data.init_args.val_shards={data}/matting/val/matting-000000.tar",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            "--trainer.log_every_n_steps=5",
            f"--trainer.default_root_dir={run_dir}",
            f"--trainer.logger.init_args.save_dir={run_dir}",
            *extra,
        ]
    )
    return cli, time.process_time() - start


def loss_curve(log_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss_step) pairs from a CSV logger run."""
    with open(log_dir / "metrics.csv") as f:
        return [
            (int(row["step"]), float(row["train/loss_step"]))
            for row in csv.DictReader(f)
            if row.get("train/loss_step")
        ]


def spread(values: list[float]) -> dict[str, object]:
    """Mean, sample standard deviation (0 for one value) and the values, one per seed."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def machine() -> str:
    """The machine line of a report."""
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_report(doc: dict, path: Path | None) -> None:
    """Print the report as JSON, and write it to ``path`` too when given."""
    text = json.dumps(doc, indent=1)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)
