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

The benchmarks' measuring tools (timing, profiles, stock SAM, reports) are in
:mod:`zim_lightning.benchmarking`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from zim_lightning.models.image_encoder import ImageEncoder
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
