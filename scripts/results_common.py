"""What the docs/results.md scripts share: the loss curve of a run, the spread over seeds, the report."""

from __future__ import annotations

import csv
import json
import platform
import statistics
from pathlib import Path

import torch


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
