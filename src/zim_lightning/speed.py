"""Speed switches for the ZIM networks that leave their function unchanged (ZIM paper, Sec. 3.3 network,
run faster; see the "GPU speed" section of docs/benchmarks.md).

Each helper works on a built network, in place, and returns it, so a predictor, a benchmark or a
LightningModule can apply exactly the switches it wants:

- :func:`set_attention`: the ViT attention backend (``"eager"``, ``"sdpa"``, ``"sdpa_fold"``, ``"flex"``,
  ``"triton_relpos"``; :mod:`zim_lightning.models.vit_attention`).
- :func:`set_activation_checkpointing`: recompute ViT block activations in the backward pass.
- :func:`to_channels_last`: NHWC weights for the convolutional parts (patch embedding, neck, image
  feature pyramid, pixel decoder, the converter's convolutions), so cuDNN picks its NHWC kernels.
- :func:`compile_model`: ``torch.compile`` of the heavy parts in place (state-dict keys unchanged).
- :func:`autocast`: bf16 autocast. It is safe for the whole network: the prompt attention map and the
  decoder's key mask are built in float32 from the prompts (``KeyMask.from_attention_map`` casts to
  float) and only cast to the compute dtype at the attention call, where ``-inf`` and the [0, 1] key
  scale are exact or within bf16 rounding; softmax inside SDPA/flex kernels accumulates in float32;
  the matting loss casts to float32. Consumers should ``.float()`` the logits before upsampling and
  sigmoid (the benchmarks and tests do).

Fused AdamW is an optimiser argument, not a model switch: ``torch.optim.AdamW(..., fused=True)``.

For the benchmarks (``benchmarks/``), :func:`measure_ms` times a call properly on CUDA,
:func:`profile_top_ops` says which operators and kernels that time goes to, and :func:`build_stock_sam` builds segment-anything's own ``Sam`` at the sizes of a ZIM variant, to measure
the two side by side.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from zim_lightning.models.build import ZIM_VARIANTS
from zim_lightning.models.image_encoder import LAYER_NORM_EPS, MLP_RATIO, WINDOW_SIZE, ImageEncoder
from zim_lightning.models.vit_attention import ViTAttention, check_backend
from zim_lightning.models.zim import Zim

log = logging.getLogger(__name__)

#: Precisions of :func:`autocast`, as command-line names.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
#: Submodules of a :class:`~zim_lightning.models.zim.Zim` that :func:`compile_model` compiles by default.
ZIM_COMPILED_PARTS: tuple[str, ...] = ("image_encoder", "feature_pyramid", "prompt_encoder", "mask_decoder")
#: ``torch.compile`` modes accepted by :func:`compile_model`.
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes that replay CUDA graphs (inductor's cudagraph trees).
CUDAGRAPH_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune")


def set_attention(model: nn.Module, backend: str) -> nn.Module:
    """Switch every ViT attention in ``model`` to ``backend``.

    Args:
        model: a network holding :class:`~zim_lightning.models.vit_attention.ViTAttention` modules.
        backend: ``"eager"``, ``"sdpa"``, ``"sdpa_fold"``, ``"flex"`` or ``"triton_relpos"``.

    Returns:
        ``model``.

    Raises:
        ValueError: unknown backend, or a model without ViT attention (nothing would change).
    """
    check_backend(backend)
    modules = [m for m in model.modules() if isinstance(m, ViTAttention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no ViTAttention module whose backend could be set")
    for module in modules:
        module.backend = backend
    return model


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn activation checkpointing of the ViT blocks on or off in every image encoder of ``model``.

    Args:
        model: a network holding :class:`~zim_lightning.models.image_encoder.ImageEncoder` modules.
        enabled: recompute block activations in the backward pass (training only).

    Returns:
        ``model``.

    Raises:
        ValueError: a model without an :class:`ImageEncoder`.
    """
    encoders = [m for m in model.modules() if isinstance(m, ImageEncoder)]
    if not encoders:
        raise ValueError(f"{type(model).__name__} has no ImageEncoder to checkpoint")
    for encoder in encoders:
        encoder.activation_checkpointing = enabled
    return model


def set_float32_heads(model: nn.Module, enabled: bool) -> nn.Module:
    """Under autocast, keep ZIM's feature pyramid and decoder in float32, only the ViT in bf16.

    The ViT encoder holds nearly all of ``set_image``'s work and its bf16 rounding barely moves the alpha;
    the pyramid's and the decoder's (with the logits spread to 0 and 1) move it by about 1e-4 in MSE, the
    issue's limit (docs/benchmarks.md). Without autocast this changes nothing.

    Args:
        model: a :class:`~zim_lightning.models.zim.Zim`.
        enabled: float32 heads on or off.

    Returns:
        ``model``.

    Raises:
        ValueError: a model that is not a Zim.
    """
    if not hasattr(model, "float32_heads"):
        raise ValueError(f"{type(model).__name__} has no float32_heads switch (a Zim has)")
    model.float32_heads = enabled
    return model


@contextlib.contextmanager
def float32_heads(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`set_float32_heads` on for the calls inside, then back to what it was (the model may also
    train, where it stays off). A model without the switch is left alone."""
    if not hasattr(model, "float32_heads"):
        yield model
        return
    before = model.float32_heads
    model.float32_heads = True
    try:
        yield model
    finally:
        model.float32_heads = before


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 2-D convolution weight of ``model`` channels-last (NHWC).

    Only convolution weights move: other 4-D tensors (SAM's ``pos_embed`` is BxHxWxC already) keep their
    layout. A convolution with an NHWC weight returns NHWC outputs, so the layout propagates through
    the convolutional stacks; the values are unchanged.

    Args:
        model: any network.

    Returns:
        ``model``.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def check_compile_options(mode: str, backend: str) -> None:
    """Raise ValueError for an unknown ``torch.compile`` mode or backend, or an inductor mode elsewhere."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {list(COMPILE_MODES)}, got {mode!r}")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(f"compile backend must be one of {backends}, got {backend!r}")
    if backend != "inductor" and mode != "default":
        raise ValueError(
            f"compile mode {mode!r} is an inductor mode; backend {backend!r} takes only 'default'"
        )


def compile_model(
    model: nn.Module,
    *,
    mode: str = "default",
    parts: Sequence[str] | None = ZIM_COMPILED_PARTS,
    dynamic: bool | None = None,
    backend: str = "inductor",
) -> nn.Module:
    """``torch.compile`` the named submodules of ``model`` in place.

    ``nn.Module.compile`` keeps the module objects and their state-dict keys (no ``_orig_mod.``
    prefix), so checkpoints save and load as before. Compilation happens at the first call of each
    part (tens of seconds for ViT-B on a GPU).

    Args:
        model: e.g. a :class:`~zim_lightning.models.zim.Zim`.
        mode: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``, ...).
        parts: attribute names of the submodules to compile; absent or None ones (the feature pyramid of
            a ``sam`` pixel decoder) are skipped. None: compile ``model`` as a whole (the converter).
        dynamic: ``torch.compile``'s ``dynamic`` (None: specialise, then generalise on a shape change;
            the decoder sees a varying number of prompts).
        backend: ``torch.compile``'s backend: ``"inductor"`` (generated kernels, the fast one), or e.g.
            ``"aot_eager"`` (graph capture and autograd tracing only, no code generation: a quick check
            that a model compiles, and how the tests run the compiled path on a CPU).

    Returns:
        ``model``.

    Raises:
        ValueError: unknown mode, or none of ``parts`` is a submodule of ``model``.
    """
    check_compile_options(mode, backend)
    options = {"mode": mode} if backend == "inductor" else {}
    if parts is None:
        model.compile(backend=backend, dynamic=dynamic, **options)
        log.info("torch.compile (%s, mode=%s) of the whole %s", backend, mode, type(model).__name__)
        return model
    compiled = []
    for name in parts:
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            part.compile(backend=backend, dynamic=dynamic, **options)
            compiled.append(name)
    if not compiled:
        raise ValueError(f"none of {list(parts)} is a submodule of {type(model).__name__}")
    log.info("torch.compile (%s, mode=%s) of %s", backend, mode, ", ".join(compiled))
    return model


def compile_inference(
    model: Zim, *, mode: str = "default", dynamic: bool | None = None, backend: str = "inductor"
) -> Zim:
    """``torch.compile`` a ZIM's two inference calls whole: :meth:`Zim.encode_image` and :meth:`Zim.decode`.

    Unlike :func:`compile_model` (one graph per submodule), each call becomes one graph: normalisation
    and padding with the encoder and feature pyramid; the attention map, prompt encoder and mask decoder
    together. With a CUDA-graph mode (:data:`CUDAGRAPH_MODES`) each call is then one graph replay, which
    is what a launch-bound one-box decode needs. Every call then starts a new cudagraph-trees step and
    returns copies, since the next replay overwrites a graph's outputs, and the image embedding must
    outlive many decodes. The compiled functions are instance attributes, so ``forward`` and
    :class:`~zim_lightning.predictor.ZimPredictor` use them and the state dict is unchanged. Meant for
    serving; export ONNX from an uncompiled model.

    Args:
        model: the network.
        mode, dynamic, backend: as in :func:`compile_model`.

    Returns:
        ``model``.
    """
    check_compile_options(mode, backend)
    options = {"mode": mode} if backend == "inductor" else {}
    for name in ("encode_image", "decode"):
        compiled = torch.compile(
            getattr(type(model), name).__get__(model), backend=backend, dynamic=dynamic, **options
        )
        setattr(model, name, _step_and_copy(compiled) if mode in CUDAGRAPH_MODES else compiled)
    log.info("torch.compile (%s, mode=%s) of Zim.encode_image and Zim.decode", backend, mode)
    return model


def _step_and_copy(fn: Callable[..., object]) -> Callable[..., object]:
    # A compiled call under CUDA graphs: a new cudagraph-trees step, and outputs the next replay cannot
    # overwrite.
    @functools.wraps(fn)
    def call(*args: object, **kwargs: object) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, fn(*args, **kwargs))

    return call


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """Autocast context for ``precision`` on ``device`` (no-op for ``"fp32"``).

    Args:
        device: where the model runs (``"cuda"``, ``"cpu"``, a ``torch.device``).
        precision: ``"fp32"`` or ``"bf16"``.

    Raises:
        ValueError: unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


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
