"""``zim-lightning eval``: zero-shot matting evaluation on MicroMat-3K, AM-2K or AIM-500 (ZIM paper, Sec. 5,
Tables 1-3), or any matting set of image and alpha folders.

``zim-lightning eval [--model NAME | --run-config RUN/config.yaml] [--checkpoint PATH | --sam-checkpoint PATH] --data DIR
--format micromat|am2k|aim500|folders [--layout IMAGES ALPHAS [TRIMAPS]] --prompt point|box|both
--out DIR [--save-predictions] [--protocol paper|dim] [--baselines binary,closed_form]
[--devices N --accelerator ...]`` runs
:class:`~zim_lightning.lit.eval_module.EvalModule` in Lightning's test loop (each rank a disjoint slice,
metrics gathered once) and writes, on rank 0, the files below.

``--run-config RUN/config.yaml --checkpoint RUN/checkpoints/last.ckpt`` in place of ``--model`` evaluates
a ``zim-lightning fit`` run directly: the network is built exactly as the run built it, from the
``config.yaml`` LightningCLI saved in its log directory
(:func:`~zim_lightning.models.build.zim_from_run_config`), so any size or frame trained (the 256-pixel
frame of ``configs/zim/tiny.yaml``) is evaluated as trained. The frame reaches the evaluation through the
network: each image is resized to the network's ``image_size`` by the predictor, as in serving.

``--onnx DIR`` (no other model option) evaluates an ONNX checkpoint in the official layout, the released
``zim_vit_b_2043`` or an ``export-onnx`` folder, run with onnxruntime
(:class:`~zim_lightning.onnx_zim.OnnxZim`) through the same predictor, prompts and metrics.

``--model vit_b --sam-checkpoint sam_vit_b_01ec64.pth`` evaluates SAM itself (the paper's SAM rows: its
masks, as ``SamPredictor`` returns them, are the ``binary`` baseline's; the ``zim`` rows are then SAM's
sigmoid of the same logits).

- ``OUT/metrics.json``: ``{"protocol", "model", "run_config", "checkpoint", "sam_checkpoint", "onnx", "image_size", "format",
  "layout", "data", "results": {SUBSET:
  {PROMPT: {"sad", "mse", "mae", "grad", "conn", "n"}}}, "buckets": {SUBSET: {PROMPT: {"S"|"M"|"L":
  {...}}}}, "baselines": {METHOD: {SUBSET: {PROMPT: {...}}}}, "baseline_buckets": {METHOD: ...}}``;
  SUBSET is fine / coarse for MicroMat-3K and "all" for the others; a mean over no instance is null;
- ``OUT/instances.csv``: one row per method x prompt x instance with its errors;
- ``OUT/report.md``: the paper's tables (rows method x prompt, columns metrics per subset), the size
  buckets, and links to the picture grids;
- ``OUT/grids/<method>_<prompt>_{best,worst}.png``: the instances with the lowest / highest SAD (image
  with the prompt drawn, prediction, ground truth);
- with ``--save-predictions``: each ZIM alpha as a 16-bit PNG at ``OUT/predictions/PROMPT/<matte path>``
  (the path data_list.txt gives; ``mask/<stem>.png`` for AM-2K / AIM-500, ``ALPHAS/<stem>.png`` for
  folders) and each baseline's at
  ``OUT/baselines/METHOD/predictions/PROMPT/<matte path>``. The metrics are computed on exactly these
  16-bit values, so they can be recomputed from the files.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from zim_lightning.data.micromat import FORMATS, PROMPTS, read_alpha
from zim_lightning.metrics import BUCKETS, METRIC_NAMES, PROTOCOLS

if TYPE_CHECKING:  # (imported lazily below: `zim-lightning eval --help` stays quick)
    import lightning as L

    from zim_lightning.data.datamodule import ZimDataModule
    from zim_lightning.data.micromat import EvalDataset
    from zim_lightning.lit.eval_module import EvalModule

log = logging.getLogger(__name__)

#: Bits of saved predictions (and of the values the metrics see).
PREDICTION_BITS = 16
#: Column titles of the report's tables.
METRIC_TITLES: dict[str, str] = {"sad": "SAD", "mse": "MSE", "mae": "MAE", "grad": "Grad", "conn": "Conn"}
#: The ZIM paper's MicroMat-3K figures for ViT-B (Table 1, paper protocol), in METRIC_NAMES order, shown
#: under a MicroMat-3K report for comparison: {(model, prompt): {subset: (sad, mse, mae, grad, conn)}}.
#: Of SAM's, only the fine subset's box row is recorded here.
PAPER_MICROMAT_VIT_B: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {
    ("ZIM", "point"): {
        "fine": (31.286, 8.213, 10.740, 5.324, 31.009),
        "coarse": (6.645, 1.788, 2.320, 1.469, 6.472),
    },
    ("ZIM", "box"): {
        "fine": (9.961, 1.893, 3.426, 4.813, 9.655),
        "coarse": (1.860, 0.448, 0.659, 1.281, 1.807),
    },
    ("SAM", "box"): {"fine": (36.086, 11.057, 12.714, 14.867, 35.834)},
}
#: Height in pixels of each panel of the picture grids.
GRID_PANEL_HEIGHT = 192
#: Colours (RGB) of the prompts drawn on grid images.
POSITIVE_COLOUR, NEGATIVE_COLOUR, BOX_COLOUR = (0, 220, 0), (230, 0, 0), (255, 200, 0)


# ---------------------------------------------------------------------------------------------- saving


def prediction_path(out: Path, method: str, prompt: str, matte_relpath: str) -> Path:
    """Where a prediction is saved: ``OUT/predictions/PROMPT/<matte path>`` for ZIM, under
    ``OUT/baselines/METHOD/`` for a baseline (the matte path's suffix becomes .png)."""
    base = out if method == "zim" else out / "baselines" / method
    return (base / "predictions" / prompt / matte_relpath).with_suffix(".png")


def write_alpha16(path: Path, alpha: torch.Tensor) -> None:
    """Write HxW alpha in [0, 1] (already on 16-bit levels) as a 16-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = torch.round(alpha.double().clamp(0, 1) * (2**PREDICTION_BITS - 1)).to(torch.int32).numpy()
    if not cv2.imwrite(str(path), levels.astype(np.uint16)):
        raise OSError(f"could not write {path}")


def _prediction_writer(out: Path) -> Any:
    from lightning.pytorch.callbacks import Callback

    from zim_lightning.data.datamodule import owner_rank

    class PredictionWriter(Callback):
        """Saves every prediction of the test loop as a 16-bit PNG (each rank its own instances; a rank
        that repeats another's instance, when there are more ranks than instances, saves nothing)."""

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            for instance in outputs:
                if owner_rank(int(instance["index"]), trainer.world_size) != trainer.global_rank:
                    continue
                for method, by_prompt in instance["alphas"].items():
                    for prompt, alpha in by_prompt.items():
                        write_alpha16(prediction_path(out, method, prompt, instance["matte_relpath"]), alpha)

    return PredictionWriter()


def _out_folder_claim(out: Path) -> Any:
    from lightning.pytorch.callbacks import Callback

    from zim_lightning.output_lock import OutputLock

    class OutFolderClaim(Callback):
        """Rank 0 locks ``out`` for this run (:class:`~zim_lightning.output_lock.OutputLock`), then removes
        an earlier run's results, before any rank predicts; a run already writing there stops every rank
        with :class:`~zim_lightning.output_lock.RunRefused`. ``release`` drops the lock (the system does
        when the process ends)."""

        def __init__(self) -> None:
            self.lock = OutputLock(out, job="eval")

        def setup(self, trainer, pl_module, stage: str) -> None:
            def start() -> str | None:
                try:
                    _remove_earlier_results(out)
                except OSError as error:
                    return f"cannot remove an earlier run's results from {out} ({error})"
                return None

            self.lock.take(trainer.strategy, rank_zero=trainer.is_global_zero, then=start)

        def release(self) -> None:
            self.lock.release()

    return OutFolderClaim()


# ---------------------------------------------------------------------------------------------- results


def _clean(value: Any) -> Any:
    """NaN (a mean over no instance) becomes None, which JSON writes as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def metrics_document(
    results: dict[str, dict[str, dict[str, dict[str, Any]]]], *, protocol: str, info: dict[str, Any]
) -> dict[str, Any]:
    """Turn ``EvalModule.results`` ({method: {prompt: {subset: ...}}}) into the metrics.json layout."""

    def by_subset(method: str, part: str) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for prompt, subsets in results[method].items():
            for subset, res in subsets.items():
                entry = (
                    {name: res[name] for name in (*METRIC_NAMES, "n")}
                    if part == "results"
                    else res["buckets"]
                )
                table.setdefault(subset, {})[prompt] = entry
        return table

    doc: dict[str, Any] = {"protocol": protocol, **info}
    doc["results"] = by_subset("zim", "results")
    doc["buckets"] = by_subset("zim", "buckets")
    baselines = [m for m in results if m != "zim"]
    if baselines:
        doc["baselines"] = {m: by_subset(m, "results") for m in baselines}
        doc["baseline_buckets"] = {m: by_subset(m, "buckets") for m in baselines}
    return _clean(doc)


def _weights_line(doc: dict[str, Any]) -> str:
    if doc.get("onnx"):
        return f"ONNX checkpoint `{doc['onnx']}` (run with onnxruntime)"
    if doc.get("sam_checkpoint"):  # SAM itself: its rows are named zim, but the network is SAM
        return f"SAM checkpoint `{doc['sam_checkpoint']}` (SAM itself: the `zim` rows are SAM's)"
    return f"checkpoint `{doc['checkpoint']}`"


def _paper_rows(subsets: list[str], prompts: list[str]) -> list[str]:
    """The paper's MicroMat-3K figures as rows of the results table (the subsets and prompts evaluated)."""
    lines = [
        "The paper's figures on the full MicroMat-3K (ViT-B; ZIM paper, Table 1), in the same columns:",
        "",
        "| Paper | Prompt | "
        + " | ".join(f"{s} {METRIC_TITLES[m]}" for s in subsets for m in METRIC_NAMES)
        + " |",
        "|---|---|" + "---:|" * (len(subsets) * len(METRIC_NAMES)),
    ]
    for (model, prompt), figures in PAPER_MICROMAT_VIT_B.items():
        if prompt in prompts:
            cells = [_fmt(v) for s in subsets for v in figures.get(s, (None,) * len(METRIC_NAMES))]
            lines.append(f"| {model} ViT-B | {prompt} | " + " | ".join(cells) + " |")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_markdown(doc: dict[str, Any], *, grids: list[Path], out: Path) -> str:
    """The report: the paper's tables, the size buckets and the picture grids."""
    methods = {"zim": (doc["results"], doc["buckets"])}
    for method, table in doc.get("baselines", {}).items():
        methods[method] = (table, doc["baseline_buckets"][method])
    subsets = list(doc["results"])
    prompts = list(next(iter(doc["results"].values())))
    names = [METRIC_TITLES[m] for m in METRIC_NAMES]
    lines = [
        f"# Matting evaluation: {doc['format']}",
        "",
        f"Model `{doc['model']}`, {_weights_line(doc)}, protocol `{doc['protocol']}` "
        f"({'paper: SAD/1000, MSE, MAE and Grad x1000, Conn/1000' if doc['protocol'] == 'paper' else 'dim: Composition-1k'}).",
        "Instances: " + ", ".join(f"{s} {doc['results'][s][prompts[0]]['n']}" for s in subsets) + ".",
        "",
        "## Results",
        "",
        "| Method | Prompt | " + " | ".join(f"{s} {n}" for s in subsets for n in names) + " |",
        "|---|---|" + "---:|" * (len(subsets) * len(names)),
    ]
    for method, (table, _) in methods.items():
        for prompt in prompts:
            cells = [_fmt(table[s][prompt][m]) for s in subsets for m in METRIC_NAMES]
            lines.append(f"| {method} | {prompt} | " + " | ".join(cells) + " |")
    if doc["format"] == "micromat" and doc["protocol"] == "paper":
        lines += ["", *_paper_rows(subsets, prompts)]
    lines += [
        "",
        "## Size buckets",
        "",
        "Fraction of ground-truth pixels with alpha > 0.3: S < 0.01, M < 0.1, L otherwise.",
        "",
        "| Method | Prompt | Subset | Bucket | n | " + " | ".join(names) + " |",
        "|---|---|---|---|---:|" + "---:|" * len(names),
    ]
    for method, (_, buckets) in methods.items():
        for prompt in prompts:
            for subset in subsets:
                for bucket in BUCKETS:
                    res = buckets[subset][prompt][bucket]
                    cells = [_fmt(res[m]) for m in METRIC_NAMES]
                    lines.append(
                        f"| {method} | {prompt} | {subset} | {bucket} | {res['n']} | "
                        + " | ".join(cells)
                        + " |"
                    )
    if grids:
        lines += ["", "## Best and worst instances (by SAD)", ""]
        lines += [
            "Each row: image with the prompt (box, positive / negative points), prediction, ground truth.",
            "",
        ]
        for grid in grids:
            rel = grid.relative_to(out).as_posix()
            lines += [f"### {grid.stem}", "", f"![{grid.stem}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_instances_csv(path: Path, module: Any, dataset: Any) -> None:
    """One row per method x prompt x subset x instance: key, bucket inputs and errors."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "prompt", "subset", "key", "matte_relpath", *METRIC_NAMES, "fg_fraction"])
        for method, by_prompt in module.instance_rows.items():
            for prompt, by_subset in by_prompt.items():
                for subset, rows in by_subset.items():
                    for row in rows.tolist():
                        record = dataset.records[int(row[0])]
                        writer.writerow(
                            [
                                method,
                                prompt,
                                subset,
                                record.key,
                                record.matte_relpath,
                                *(f"{v:.9g}" for v in row[1:]),
                            ]
                        )


# ---------------------------------------------------------------------------------------------- grids


def _panel(array: np.ndarray, height: int) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    h, w = array.shape[:2]
    width = max(1, round(w * height / h))
    return cv2.resize(
        array, (width, height), interpolation=cv2.INTER_AREA if h > height else cv2.INTER_LINEAR
    )


def draw_prompt(image: np.ndarray, prompt: dict[str, np.ndarray], mode: str) -> np.ndarray:
    """The image (RGB uint8) with the prompt of ``mode`` drawn in original pixels."""
    canvas = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 300))
    if mode == "box":
        x1, y1, x2, y2 = (round(float(v)) for v in prompt["box"])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX_COLOUR, thickness)
    else:
        for x, y, label in np.asarray(prompt["points"]):
            colour = POSITIVE_COLOUR if label == 1 else NEGATIVE_COLOUR
            cv2.circle(canvas, (round(float(x)), round(float(y))), 3 * thickness, colour, -1)
    return canvas


def write_grids(
    out: Path,
    module: Any,
    dataset: Any,
    *,
    count: int,
    saved: bool,
    method: str = "zim",
    rank_by: str = "sad",
) -> list[Path]:
    """Picture grids of the ``count`` best and worst instances per prompt (all subsets together).

    Args:
        count: instances in each grid; 0 writes no grid.
        saved: the predictions were saved under ``out`` (read them back); otherwise the chosen instances
            are predicted again by ``method`` alone (the same deterministic forward pass: call it where
            and in the precision the test loop ran, see :func:`main`).
        rank_by: the metric (a name of ``METRIC_NAMES``) that orders the instances and labels each row.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if rank_by not in METRIC_NAMES:
        raise ValueError(f"rank_by must be one of {METRIC_NAMES}, got {rank_by!r}")
    paths: list[Path] = []
    if count == 0:
        return paths
    column = 1 + METRIC_NAMES.index(rank_by)
    predicted: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def prediction(item: dict[str, Any], prompt: str) -> np.ndarray:
        if saved:
            return read_alpha(prediction_path(out, method, prompt, item["matte_relpath"]), truth=False)
        if item["index"] not in predicted:
            predicted[item["index"]] = module.predict_instance(item, methods=[method])
        return predicted[item["index"]][method][prompt].numpy()

    for prompt, by_subset in module.instance_rows[method].items():
        rows = torch.cat(list(by_subset.values()))
        if not len(rows):
            continue
        order = torch.argsort(rows[:, column], stable=True).tolist()
        for name, chosen in (("best", order[:count]), ("worst", order[::-1][:count])):
            strips = []
            for r in chosen:
                item = dataset[int(rows[r, 0])]
                alpha = prediction(item, prompt)
                panels = [
                    draw_prompt(item["image"], item["prompt"], prompt),
                    np.round(alpha * 255).astype(np.uint8),
                    np.round(np.asarray(item["alpha"]) * 255).astype(np.uint8),
                ]
                strip = np.concatenate([_panel(p, GRID_PANEL_HEIGHT) for p in panels], axis=1)
                label = f"{item['key']}  {METRIC_TITLES[rank_by]} {rows[r, column].item():.3f}"
                cv2.putText(
                    strip, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA
                )
                strips.append(strip)
            width = max(s.shape[1] for s in strips)
            grid = np.concatenate([np.pad(s, ((0, 4), (0, width - s.shape[1]), (0, 0))) for s in strips])
            path = out / "grids" / f"{method}_{prompt}_{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write {path}")
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- main


def _baselines(text: str) -> list[str]:
    from zim_lightning.lit.eval_module import BASELINES

    names = [t for t in (s.strip() for s in text.split(",")) if t]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    return names


def _parser() -> argparse.ArgumentParser:
    from zim_lightning.model_options import add_zim_arguments

    p = argparse.ArgumentParser(
        prog="zim-lightning eval",
        description="Evaluate ZIM on MicroMat-3K, AM-2K, AIM-500 or any matting folders (metrics.json, "
        "report.md, grids).",
    )
    add_zim_arguments(p)
    p.add_argument(
        "--data", required=True, type=Path, help="dataset folder (MicroMat-3K: holds data_list.txt)"
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="dataset layout")
    p.add_argument(
        "--layout",
        nargs="+",
        metavar="FOLDER",
        default=None,
        help="--format folders: the images' folder, the alphas' and optionally the trimaps', under --data "
        "(e.g. P3M-500: original_image mask trimap)",
    )
    p.add_argument(
        "--onnx",
        default=None,
        help="an ONNX checkpoint folder in the official layout (encoder.onnx + decoder.onnx, e.g. the "
        "released zim_vit_b_2043), run with onnxruntime, instead of --model / --checkpoint",
    )
    p.add_argument("--prompt", default="both", choices=PROMPTS, help="prompt mode(s) to evaluate")
    p.add_argument("--subset", default=None, help="MicroMat-3K fine or coarse only (default: both)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--save-predictions", action="store_true", help="write every alpha as a 16-bit PNG")
    p.add_argument("--protocol", default="paper", choices=PROTOCOLS, help="metric definitions")
    p.add_argument("--baselines", type=_baselines, default=[], help="comma list: binary,closed_form")
    p.add_argument(
        "--closed-form-max-side",
        type=int,
        default=512,
        help="closed_form runs at most this size (0: full size)",
    )
    p.add_argument(
        "--grid-count", type=int, default=4, help="instances in each best / worst grid (0: no grids)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and derived point prompts")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    p.add_argument("--devices", default="1", help="devices per node (a number, or 'auto')")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--precision", default="32-true", help="Lightning precision of the forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``zim-lightning eval``."""
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from zim_lightning.command_checks import check_out_folder
    from zim_lightning.lit.eval_module import EvalModule
    from zim_lightning.lit.preemption import stop_or_raise
    from zim_lightning.model_options import check_checkpoint_argument, zim_for_command
    from zim_lightning.output_lock import RunRefused

    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.onnx is None:
        check_checkpoint_argument(parser, args)
    else:
        _check_onnx_argument(parser, args)
    check_out_folder(parser, args.out)
    if args.grid_count < 0 or args.closed_form_max_side < 0:
        parser.error("--grid-count and --closed-form-max-side must be >= 0")
    if not (args.devices in ("auto", "-1") or (args.devices.isdigit() and int(args.devices) > 0)):
        parser.error(f"--devices: expected a positive number, 'auto' or -1, got {args.devices!r}")
    # Same seed on every rank: random weights (smoke tests) must be the same network everywhere.
    L.seed_everything(args.seed, verbose=False)
    net = (zim_for_command(parser, args) if args.onnx is None else _onnx_network(parser, args)).eval()
    claim = _out_folder_claim(args.out)  # removes an earlier run's results once this run holds --out
    callbacks: list[Any] = [RichProgressBar(), claim]
    if args.save_predictions:
        callbacks.append(_prediction_writer(args.out))
    # the options the datamodule and the Trainer check, before anything of an earlier run goes
    data, trainer = _datamodule_and_trainer(parser, args, callbacks)
    dataset = _checked_dataset(parser, args, data)
    module = EvalModule(
        net=net,
        prompts=["point", "box"] if args.prompt == "both" else [args.prompt],
        protocol=args.protocol,
        subsets=dataset.subsets,
        baselines=args.baselines,
        closed_form_max_side=args.closed_form_max_side or None,
        quantize_bits=PREDICTION_BITS,
    )
    try:
        with warnings.catch_warnings():
            # Instances are lists of dicts of different sizes; Lightning cannot infer a batch size from them.
            warnings.filterwarnings("ignore", message=".*Trying to infer the `batch_size`.*")
            try:
                trainer.test(module, datamodule=data, verbose=False)
            except RunRefused as error:
                parser.error(f"--out: {error}")
            except (SIGTERMException, Exception) as error:
                # not 0, and no figures: `eval && ...` must not go on as if the evaluation had finished
                return stop_or_raise(
                    error, trainer, "no metrics written (before the last instance); run it again"
                )
        if trainer.is_global_zero:
            _write_results(args, module, dataset, trainer)
    finally:
        claim.release()
    return 0


def _check_onnx_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--onnx`` names the whole network: no other model option may come with it."""
    given = [
        option
        for option, value in (
            ("--model", args.model),
            ("--run-config", args.run_config),
            ("--checkpoint", args.checkpoint),
            ("--sam-checkpoint", args.sam_checkpoint),
            ("--pixel-decoder", args.pixel_decoder),
            ("--no-masked-attention", args.no_masked_attention or None),
        )
        if value is not None
    ]
    if given:
        parser.error(f"--onnx runs the folder's own graphs; leave out {', '.join(given)}")


def _onnx_network(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.nn.Module:
    """The ``--onnx`` folder as a network; a folder onnxruntime cannot run is a usage error."""
    from zim_lightning.onnx_zim import OnnxZim

    try:
        return OnnxZim(args.onnx)
    except (FileNotFoundError, ValueError, ImportError) as error:
        parser.error(str(error))


def _checked_dataset(
    parser: argparse.ArgumentParser, args: argparse.Namespace, data: ZimDataModule
) -> EvalDataset:
    """The datamodule's evaluation set; with ``--protocol dim``, its trimaps checked before any
    prediction (not mid-run in a worker). A folder that does not hold it is a usage error."""
    from zim_lightning.data.micromat import EvalDataError, check_trimaps

    try:
        dataset = data.eval_dataset()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.protocol == "dim":
        without = [record.key for record in dataset.records if record.trimap is None]
        if 0 < len(without) < len(dataset.records):
            # One mean over some instances scored in the unknown region and others over the whole image
            parser.error(
                f"--protocol dim: {len(without)} of {len(dataset.records)} instances have no trimap "
                f"(e.g. {', '.join(without[:5])}); give one per instance, or none to score whole images"
            )
        try:
            check_trimaps(dataset.records)
        except EvalDataError as err:
            parser.error(f"--protocol dim: {err}")
    return dataset


def _datamodule_and_trainer(
    parser: argparse.ArgumentParser, args: argparse.Namespace, callbacks: list[Any]
) -> tuple[ZimDataModule, L.Trainer]:
    """The eval datamodule and Trainer of the command's options; a value either refuses is a usage
    error."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from zim_lightning.data.datamodule import ZimDataModule

    devices: int | str = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
    several = args.num_nodes > 1 or devices not in (1, "auto")
    try:
        data = ZimDataModule(
            stage="eval",
            eval_root=str(args.data),
            eval_format=args.format,
            eval_prompt=args.prompt,
            eval_subset=args.subset,
            eval_trimaps=args.protocol == "dim",
            eval_layout=args.layout,
            batch_size=1,
            num_workers=args.num_workers,
            seed=args.seed,
        )
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=devices,
            num_nodes=args.num_nodes,
            strategy="ddp" if several else "auto",
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
    except (ValueError, MisconfigurationException) as err:
        parser.error(str(err))
    return data, trainer


def _remove_earlier_results(out: Path) -> None:
    """Remove what an earlier run into ``out`` wrote.

    Its predictions, baselines and grids (other instances, prompts, baselines) would lie beside this
    run's metrics, which the saved predictions must reproduce; its metrics and report go too, so that a
    run that fails midway leaves no earlier figures beside its partial predictions. Rank 0 removes them
    while the other ranks wait for it (see ``OutFolderClaim``), so none is writing yet.
    """
    for stale in (out / "predictions", out / "baselines", out / "grids"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in ("metrics.json", "instances.csv", "report.md"):
        (out / stale).unlink(missing_ok=True)


def _write_results(
    args: argparse.Namespace, module: EvalModule, dataset: EvalDataset, trainer: L.Trainer
) -> None:
    """Write ``metrics.json``, ``instances.csv``, the grids and ``report.md`` (rank zero, after the test
    loop), and print the report."""
    from zim_lightning.model_options import describe_model

    args.out.mkdir(parents=True, exist_ok=True)
    info = {
        "model": f"ONNX {Path(args.onnx).name}" if args.onnx else args.model or describe_model(args),
        "run_config": args.run_config,
        "checkpoint": args.checkpoint,
        "sam_checkpoint": args.sam_checkpoint,
        "onnx": args.onnx,
        "image_size": module.net.image_size,
        "format": args.format,
        "layout": args.layout,
        "data": str(args.data),
        "prediction_bits": PREDICTION_BITS,
    }
    doc = metrics_document(module.results, protocol=args.protocol, info=info)
    (args.out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_instances_csv(args.out / "instances.csv", module, dataset)
    grids = []
    if args.grid_count:
        if not args.save_predictions:
            # The grids predict their instances again: on the accelerator the test loop used (its
            # teardown moved the network to the CPU) and in its precision, as the scored predictions.
            module.net.to(trainer.strategy.root_device)  # the network only: metric states stay put
        with trainer.precision_plugin.test_step_context():
            grids = write_grids(args.out, module, dataset, count=args.grid_count, saved=args.save_predictions)
    report = report_markdown(doc, grids=grids, out=args.out)
    (args.out / "report.md").write_text(report)
    print(report)
    print(f"wrote {args.out / 'metrics.json'}, {args.out / 'report.md'}")
