"""Measuring tools of the benchmarks (``benchmarks/``; the "GPU speed" section of docs/benchmarks.md).

:func:`measure_ms` times a call properly on CUDA, :func:`profile_top_ops` says which operators and
kernels that time goes to, :func:`build_stock_sam` builds segment-anything's own ``Sam`` at the sizes of
a ZIM variant, to measure the two side by side, and :func:`emit_report` writes a benchmark's JSON (also
while it runs, so a run cut off keeps what it measured). The speed switches themselves are in
:mod:`zim_lightning.speed`.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from zim_lightning.models.build import ZIM_VARIANTS
from zim_lightning.models.image_encoder import LAYER_NORM_EPS, MLP_RATIO, WINDOW_SIZE
from zim_lightning.models.zim import Zim
from zim_lightning.prompt_labels import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT

log = logging.getLogger(__name__)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (CUDA kernels run asynchronously; CPU needs nothing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(
    fn: Callable[[], object], *, device: torch.device | str, warmup: int, repeats: int
) -> dict[str, float]:
    """Time ``fn()`` in milliseconds: ``warmup`` untimed calls, then ``repeats`` synchronised ones.

    Each timed call is bracketed by device synchronisation, so the time is the call's full latency
    (what a user waiting for the result sees), not the time to enqueue its kernels.

    Args:
        fn: the call to time.
        device: where its work runs.
        warmup: untimed calls first (compilation, cuDNN autotuning, allocator warm-up).
        repeats: timed calls (>= 1).

    Returns:
        ``median``, ``min`` and ``max`` in milliseconds, and ``repeats``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def profile_top_ops(
    fn: Callable[[], object], *, device: torch.device | str, steps: int, top: int = 15
) -> list[dict[str, object]]:
    """Where the time of ``fn()`` goes: the ``top`` operators and kernels by self time, per call.

    ``fn`` runs ``steps`` times under ``torch.profiler``. On CUDA the ranking is by self *device* time
    (the kernels; what a GPU-bound step is made of), elsewhere by self CPU time. Call it after warm-up, so
    compilation and autotuning are not in the profile.

    Args:
        fn: the call to profile (e.g. one training step).
        device: where its work runs.
        steps: profiled calls (>= 1); times are divided by it.
        top: how many entries to return.

    Returns:
        Entries ``{"name", "ms_per_step", "share", "calls_per_step"}``, largest first; ``share`` is the
        entry's part of the summed self time: of the kernels on CUDA (an operator's self device time
        repeats its kernels' time, so summing every event would count it twice), of every event elsewhere.
    """
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    attribute = "self_device_time_total" if on_cuda else "self_cpu_time_total"  # microseconds
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)
    if on_cuda:
        from torch.autograd import DeviceType

        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        total = sum(getattr(e, attribute) for e in kernels) or 1.0
    else:
        total = sum(getattr(e, attribute) for e in events) or 1.0
    return [
        {
            "name": event.key,
            "ms_per_step": getattr(event, attribute) / 1e3 / steps,
            "share": getattr(event, attribute) / total,
            "calls_per_step": event.count / steps,
        }
        for event in events[:top]
    ]


def box_prompts(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes Bx4 ``(x1, y1, x2, y2)`` -> ZIM's point prompts: coords Bx2x2 (the corners) and labels Bx2
    (top-left, bottom-right), on the boxes' device."""
    labels = torch.tensor([float(LABEL_BOX_TOP_LEFT), float(LABEL_BOX_BOTTOM_RIGHT)], device=boxes.device)
    return boxes.view(-1, 2, 2), labels.expand(boxes.shape[0], -1)


def build_stock_sam(variant: str, *, image_size: int = 1024):
    """segment-anything's ``Sam`` (its own classes and code) at the sizes of a ZIM variant, random weights.

    For ``vit_b``/``vit_l``/``vit_h`` this is ``sam_model_registry[variant]`` without a checkpoint; for
    ``tiny`` the same classes at the tiny sizes.

    Args:
        variant: a key of :data:`~zim_lightning.models.build.ZIM_VARIANTS`.
        image_size: input side (1024).

    Returns:
        ``segment_anything.modeling.Sam``.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if variant not in ZIM_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(ZIM_VARIANTS)}, got {variant!r}")
    # The variant's sizes over Zim's defaults (the SAM sizes the variants do not override).
    defaults = {name: p.default for name, p in inspect.signature(Zim.__init__).parameters.items()}
    cfg = {**defaults, **ZIM_VARIANTS[variant]}
    dim = cfg["prompt_embed_dim"]
    grid = image_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=16,
            embed_dim=cfg["encoder_embed_dim"],
            depth=cfg["encoder_depth"],
            num_heads=cfg["encoder_num_heads"],
            mlp_ratio=MLP_RATIO,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=LAYER_NORM_EPS),
            use_rel_pos=True,
            window_size=WINDOW_SIZE,
            global_attn_indexes=tuple(cfg["encoder_global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
    )


def image_sizes(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,1500x2250"`` -> ``[(1024, 1024), (1500, 2250)]`` (H, W): a ``--sizes`` option's type."""
    sizes = []
    for size in text.split(","):
        parts = size.strip().lower().split("x")
        if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated HxW sizes such as 1024x1024, got {size!r}"
            )
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def describe_environment(device: torch.device | str) -> dict[str, object]:
    """Machine, library versions and git commit, recorded with benchmark results so they can be told apart.

    Args:
        device: the device the benchmark ran on.

    Returns:
        JSON-ready dictionary (``gpu`` and ``cuda`` only on CUDA; ``commit`` from git, else from the
        ``ZIM_COMMIT`` environment variable, for a copy of the tree without ``.git``; else None).
    """
    device = torch.device(device)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or os.environ.get("ZIM_COMMIT", "")
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": str(device),
        "commit": commit or None,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def emit_report(report: dict[str, object], json_out: Path | None, *, complete: bool = True) -> None:
    """Print a benchmark's JSON report on stdout (its result), and also write it to ``json_out`` if given.

    With ``complete=False`` the report is only written to ``json_out`` (marked ``"complete": false``):
    call it after each measured configuration, so a run killed by its time limit keeps what it measured.
    """
    report["complete"] = complete
    text = json.dumps(report, indent=2)
    if complete:
        print(text)
    if json_out is not None:
        tmp = json_out.with_name(json_out.name + ".partial")
        tmp.write_text(text + "\n")
        tmp.replace(json_out)


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message`` (just the type for an empty message), for a report."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def release_memory(device: torch.device | str) -> None:
    """Collect garbage and return cached CUDA memory between configurations of a benchmark.

    A sticky CUDA error (an illegal address in a kernel) also fails ``empty_cache``; it is logged, not
    raised, so the figures already measured are still reported.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError as error:
            log.error("cannot release CUDA memory: %s", describe_error(error))
