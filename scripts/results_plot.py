"""docs/images/loss_curves.png: the training loss curves recorded by results_converter.py and results_zim.py.

    python scripts/results_plot.py docs/results/converter.json docs/results/zim.json \
        --out docs/images/loss_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"converter": "tab:purple", "zim": "tab:blue", "sam_arch": "tab:orange"}
LABELS = {"converter": "tiny converter", "zim": "tiny ZIM", "sam_arch": "tiny SAM architecture"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converter", type=Path)
    p.add_argument("zim", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/images/loss_curves.png"))
    args = p.parse_args()
    converter = json.loads(args.converter.read_text())
    zim = json.loads(args.zim.read_text())

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in converter["runs"]:
        steps, losses = zip(*run["loss_curve"], strict=True)
        axes[0].plot(steps, losses, color=COLOURS["converter"], alpha=0.8, lw=1, label=f"seed {run['seed']}")
    axes[0].set_title(f"label converter (crop {converter['crop']}), L1 + 10 * grad")
    seen = set()
    for run in zim["runs"]:
        steps, losses = zip(*run["loss_curve"], strict=True)
        label = None if run["variant"] in seen else LABELS[run["variant"]]
        seen.add(run["variant"])
        axes[1].plot(steps, losses, color=COLOURS[run["variant"]], alpha=0.8, lw=1, label=label)
    axes[1].set_title(f"ZIM vs SAM architecture (frame {zim['frame']}), {len(zim['runs']) // 2} seeds each")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("train loss (per step)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Tiny networks on the synthetic sample, CPU (scripts/results_*.py)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
