"""Model registries and weight loading (ZIM paper, Sec. 4.1: ZIM is fine-tuned from a pretrained SAM).

``zim_model_registry[name](checkpoint=..., sam_checkpoint=..., masked_attention=..., pixel_decoder=...,
attention=..., activation_checkpointing=..., image_size=...)``
builds a :class:`~zim_lightning.models.zim.Zim` of SAM's sizes (``vit_b``, ``vit_l``, ``vit_h``) or the
``tiny`` test size (same 1024 input and 64x64 embedding, narrow and shallow), then loads either

- ``checkpoint``: our own weights (a plain state dict or a Lightning checkpoint), loaded exactly; or
- ``sam_checkpoint``: a segment-anything checkpoint (``sam_vit_b_01ec64.pth``), loaded into the parts
  ZIM shares with SAM, every SAM key landing on a parameter of the same shape (see
  :func:`load_sam_weights`).

:func:`zim_from_run_config` builds the network of a training run instead, exactly as ``zim-lightning fit``
did, from the ``config.yaml`` LightningCLI saved in the run's log directory, and loads the run's
Lightning checkpoint into it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zim_lightning.models.checkpoint import (
    NET_SPEC_KEY,
    CheckpointError,
    load_checkpoint,
    load_exactly,
    mark_random_start,
    net_spec_of,
    read_state_dict,
    state_dict_of,
    warn_random_start,
    weights_loaded_later,
)
from zim_lightning.models.zim import Zim

log = logging.getLogger(__name__)

#: Sizes of each variant, as Zim keyword arguments. vit_b/l/h are SAM's.
ZIM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": (2, 5, 8, 11),
    },
    "vit_l": {
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (5, 11, 17, 23),
    },
    "vit_h": {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (7, 15, 23, 31),
    },
    # Every interface of the real sizes (1024 input, 16-px patches, 64x64 embedding, 4 mask tokens,
    # strides 2/4/8 features), narrow and shallow so a CPU forward takes well under a second.
    "tiny": {
        "encoder_embed_dim": 64,
        "encoder_depth": 2,
        "encoder_num_heads": 2,
        "encoder_global_attn_indexes": (1,),
        "prompt_embed_dim": 64,
        "decoder_depth": 2,
        "decoder_num_heads": 2,
        "decoder_mlp_dim": 128,
        "iou_head_hidden_dim": 64,
        "pyramid_channels": (8, 8, 16),
        "decoder_channels": (16, 8, 8),
    },
}

#: Prefixes of ZIM parameters that SAM does not have (initialised fresh when loading SAM weights).
ZIM_ONLY_PREFIXES: tuple[str, ...] = ("feature_pyramid.", "mask_decoder.pixel_decoder.")
#: Prefixes of SAM parameters ZIM never uses: the mask-prompt branch (ZIM takes no mask input).
SAM_UNUSED_PREFIXES: tuple[str, ...] = ("prompt_encoder.mask_downscaling.",)
#: SAM's pixel decoder, unused when ZIM's hierarchical one replaces it.
SAM_PIXEL_DECODER_PREFIX = "mask_decoder.output_upscaling."


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_sam_weights` did.

    Attributes:
        loaded: our parameter/buffer names filled from the SAM checkpoint.
        unused: SAM keys intentionally left out (mask-prompt branch; SAM's pixel decoder under the
            hierarchical one).
        initialised: our names not in SAM, kept at their fresh initialisation.
    """

    loaded: list[str]
    unused: list[str]
    initialised: list[str]


def load_sam_weights(model: Zim, sam_checkpoint: str | Path | Mapping[str, torch.Tensor]) -> LoadReport:
    """Load a segment-anything checkpoint into the parts ZIM shares with SAM.

    Matching is strict: every SAM key must land on one of our parameters with the same shape, or be one
    of the intentionally unused ones; every one of our keys must come from SAM or belong to a ZIM-only
    part. Anything else (another ViT size, a ZIM or converter checkpoint) raises.

    Args:
        model: the network to fill.
        sam_checkpoint: path of a segment-anything state dict (read with ``weights_only=True``), or the
            state dict itself.

    Returns:
        The report; the newly initialised names are also logged.

    Raises:
        CheckpointError: when the checkpoint is not a SAM checkpoint of the model's size.
    """
    source = "<state dict>" if isinstance(sam_checkpoint, Mapping) else str(sam_checkpoint)
    if isinstance(sam_checkpoint, Mapping):
        sam_state = dict(sam_checkpoint)
    else:
        loaded = load_checkpoint(sam_checkpoint)
        if isinstance(loaded, Mapping) and ("state_dict" in loaded or NET_SPEC_KEY in loaded):
            # segment-anything releases plain state dicts; a Lightning checkpoint is a trained network's
            raise CheckpointError(
                f"SAM checkpoint {source!r} is a Lightning checkpoint (of `zim-lightning fit`); give it as "
                "checkpoint= (--model.init_args.net.init_args.checkpoint), sam_checkpoint takes "
                "segment-anything weights"
            )
        sam_state = state_dict_of(loaded, source=sam_checkpoint)
    own = model.state_dict()
    unused_prefixes = SAM_UNUSED_PREFIXES
    if model.pixel_decoder != "sam":
        unused_prefixes = (*unused_prefixes, SAM_PIXEL_DECODER_PREFIX)

    zim_parts = sorted(k for k in sam_state if k.startswith(ZIM_ONLY_PREFIXES))
    if zim_parts:
        raise CheckpointError(
            f"SAM checkpoint {source!r} holds parts SAM does not have ({', '.join(zim_parts[:3])}, ...): it "
            "is a ZIM checkpoint; give it as checkpoint= (--model.init_args.net.init_args.checkpoint), "
            "sam_checkpoint takes segment-anything weights"
        )
    unused = sorted(k for k in sam_state if k.startswith(unused_prefixes))
    candidates = {k: v for k, v in sam_state.items() if not k.startswith(unused_prefixes)}
    unexpected = sorted(set(candidates) - set(own))
    missing = sorted(k for k in set(own) - set(candidates) if not k.startswith(ZIM_ONLY_PREFIXES))
    mis_shaped = sorted(
        f"{k} {tuple(candidates[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(candidates) & set(own)
        if candidates[k].shape != own[k].shape
    )
    if unexpected or missing or mis_shaped:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        problems = [
            f"{len(keys)} {what}: {show(keys)}"
            for what, keys in (
                ("SAM keys with no ZIM parameter", unexpected),
                ("ZIM parameters SAM lacks", missing),
                ("with another shape", mis_shaped),
            )
            if keys
        ]
        raise CheckpointError(
            f"SAM checkpoint {source!r} does not match this ZIM's SAM parts; expected a segment-anything "
            f"checkpoint of the same ViT size ({'; '.join(problems)})"
        )
    initialised = sorted(set(own) - set(candidates))
    merged = {**own, **candidates}
    model.load_state_dict(merged, strict=True)
    log.info(
        "Loaded %d SAM tensors from %s; %d SAM tensors unused (%s); %d ZIM tensors newly initialised: %s",
        len(candidates),
        source,
        len(unused),
        ", ".join(sorted({k.rsplit(".", 2)[0] for k in unused})) or "none",
        len(initialised),
        ", ".join(initialised) or "none",
    )
    return LoadReport(loaded=sorted(candidates), unused=unused, initialised=initialised)


def build_zim(
    *,
    variant: str = "vit_b",
    checkpoint: str | None = None,
    sam_checkpoint: str | None = None,
    masked_attention: bool = True,
    pixel_decoder: str = "hierarchical",
    attention: str | None = None,
    activation_checkpointing: bool = False,
    image_size: int = 1024,
) -> Zim:
    """Build a ZIM of a registered size and load its weights.

    Args:
        variant: ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny``.
        checkpoint: our weights: a plain state dict or a Lightning checkpoint (keys under ``net.``).
        sam_checkpoint: a segment-anything checkpoint for the shared parts (for fine-tuning from SAM).
        masked_attention: prompt-aware masked attention on (ZIM) or off (SAM's attention).
        pixel_decoder: ``"hierarchical"`` (ZIM) or ``"sam"``.
        attention: ViT attention backend (``"eager"``, ``"sdpa"``, ``"sdpa_fold"``, ``"flex"``,
            ``"triton_relpos"``; same weights and function), or None for :class:`Zim`'s default.
        activation_checkpointing: recompute the ViT blocks' activations in the backward pass.
        image_size: the frame, the side of the square padded input (SAM's 1024; smaller frames make CPU
            runs fast, e.g. 256 in ``configs/zim/tiny.yaml``; SAM weights do not fit them).

    Returns:
        The network, in train mode as ``nn.Module`` leaves it; random weights when no checkpoint is given.

    Raises:
        ValueError: unknown variant, or both checkpoints given.
        CheckpointError: a checkpoint of another model or variant.
    """
    if variant not in ZIM_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(ZIM_VARIANTS)}, got {variant!r}")
    if checkpoint is not None and sam_checkpoint is not None:
        raise ValueError(
            "give either checkpoint (our ZIM weights) or sam_checkpoint (SAM weights to start from), not both"
        )
    speed_switches: dict[str, Any] = {"encoder_activation_checkpointing": activation_checkpointing}
    if attention is not None:
        speed_switches["encoder_attention"] = attention
    model = Zim(
        **ZIM_VARIANTS[variant],
        masked_attention=masked_attention,
        pixel_decoder=pixel_decoder,
        image_size=image_size,
        **speed_switches,
    )
    if sam_checkpoint is not None:
        load_sam_weights(model, sam_checkpoint)
    elif checkpoint is None:
        remedy = (
            f"the paper fine-tunes from SAM: sam_checkpoint=.../sam_{variant}_<id>.pth (or checkpoint= for "
            "ZIM weights)"
        )
        mark_random_start(model, remedy)
        if variant != "tiny":
            warn_random_start(f"ZIM {variant} (no checkpoint or sam_checkpoint)", remedy)
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint)
        try:
            load_exactly(
                model,
                state_dict_of(loaded, source=checkpoint),
                source=f"{checkpoint} (as ZIM {variant}, masked_attention={masked_attention}, "
                f"pixel_decoder={pixel_decoder!r})",
            )
        except CheckpointError as err:
            if net_spec_of(loaded) is None:
                raise
            raise CheckpointError(
                f"{err}; this checkpoint of `zim-lightning fit` carries the network it trained (its size "
                "and frame): build it with zim_lightning.models.build.zim_from_checkpoint(path), or on the "
                "command line leave out --model and its switches"
            ) from err
    return model


class RunConfigError(ValueError):
    """A training run's config.yaml is missing, unreadable, or not the config of a ZIM training run."""


#: Network arguments that name weights to start training from; a run's own checkpoint replaces them.
STARTING_WEIGHTS_ARGUMENTS: tuple[str, ...] = ("checkpoint", "sam_checkpoint", "backbone_checkpoint")


def network_from_spec(
    spec: Mapping[str, Any], *, source: str, model_class_path: str = "?", expected: type[nn.Module] = Zim
) -> nn.Module:
    """Build a network from its config ``{"class_path": ..., "init_args": {...}}`` as jsonargparse does.

    Starting weights named in it (:data:`STARTING_WEIGHTS_ARGUMENTS`) are not loaded (a run's own
    checkpoint replaces them).

    Args:
        spec: the config (``model.init_args.net`` of a run's config.yaml, or what a checkpoint carries).
        source: what to call it in errors.
        model_class_path: the LightningModule the config belongs to, for errors.
        expected: the class the network must be (:class:`Zim`; the label converter's class for the
            SA1B-Matte builder).

    Raises:
        RunConfigError: the config does not build an ``expected`` (``source`` names it).
    """
    from jsonargparse import ArgumentParser

    spec = {**spec, "init_args": dict(spec.get("init_args") or {})}
    for name in STARTING_WEIGHTS_ARGUMENTS:
        if spec["init_args"].get(name) is not None:
            log.info(
                "%s: ignoring net %s=%s (the weights come from the checkpoint)",
                source,
                name,
                spec["init_args"][name],
            )
            spec["init_args"][name] = None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=expected)
    what = "ZIM" if expected is Zim else expected.__name__
    try:
        parsed = parser.parse_object({"net": spec})
    except argparse.ArgumentError as err:
        raise RunConfigError(
            f"{source} is not a {what} training config: its model {model_class_path!r} has the network "
            f"{spec.get('class_path')!r}, expected one that builds {expected.__module__}.{expected.__qualname__} "
            f"({' '.join(str(err).split())})"
        ) from err
    try:
        with weights_loaded_later():
            return parser.instantiate(parsed).net
    except (TypeError, ValueError) as err:
        raise RunConfigError(
            f"{source}: its network {spec.get('class_path')!r} could not be built: {err}"
        ) from err


def network_from_checkpoint(
    checkpoint: str | Path, *, expected: type[nn.Module] = Zim
) -> tuple[nn.Module, dict] | None:
    """The network a ``zim-lightning fit`` checkpoint carries, built and with its weights, and its config;
    None when the checkpoint carries no config (a plain state dict). The file is read once.

    Raises:
        RunConfigError: the config does not build an ``expected`` network.
        CheckpointError: the file is missing or unreadable, or its weights do not fit the network.
    """
    loaded = load_checkpoint(checkpoint)
    spec = net_spec_of(loaded)
    if spec is None:
        return None
    network = network_from_spec(spec, source=f"checkpoint {str(checkpoint)!r}", expected=expected)
    load_exactly(
        network,
        state_dict_of(loaded, source=checkpoint),
        source=f"{checkpoint} (as the network it carries: {spec.get('class_path')})",
    )
    return network, spec


def zim_from_checkpoint(checkpoint: str | Path) -> Zim:
    """Build the ZIM of a ``zim-lightning fit`` checkpoint from the network config it carries, with its weights.

    Checkpoints written by ``zim-lightning fit`` hold their network's config
    (:data:`~zim_lightning.models.checkpoint.NET_SPEC_KEY`), so no config.yaml or ``--model`` is needed.

    Raises:
        RunConfigError: the checkpoint carries no network config (a plain state dict, or one written
            before checkpoints carried it): give the model (``zim_model_registry``) or the run config.
        CheckpointError: the file is missing or unreadable, or its weights do not fit the network.
    """
    carried = network_from_checkpoint(checkpoint)
    if carried is None:
        raise RunConfigError(
            f"checkpoint {str(checkpoint)!r} does not carry its network's config (a plain state dict, one "
            "saved outside `zim-lightning fit`, or by an older version); name the network: --model, or "
            "--run-config with the run's config.yaml"
        )
    return carried[0]


def zim_from_run_config(config: str | Path, checkpoint: str | Path | None = None) -> Zim:
    """Build the ZIM of a training run from its saved LightningCLI config and load the run's weights.

    The network is ``model.init_args.net`` of the config (``class_path`` and ``init_args``: the
    :class:`Zim` class itself, or a builder such as :func:`build_zim`, as the configs give it),
    instantiated by jsonargparse as LightningCLI did, so its sizes, frame
    (``image_size``), architecture switches and attention backend are the run's. Starting weights named
    in the config (:data:`STARTING_WEIGHTS_ARGUMENTS`) are not loaded: the weights come from
    ``checkpoint``. The module's speed switches (``compile``, ``channels_last``) do not change parameter
    names (``nn.Module.compile`` keeps them), so they need no handling here.

    Args:
        config: the ``config.yaml`` that ``zim-lightning fit`` saved in the run's log directory.
        checkpoint: a Lightning checkpoint of that run (keys under ``net.``), or a plain state dict of the
            same network; loaded with ``weights_only=True`` and exact key and shape matching. None leaves
            the random initialisation.

    Returns:
        The network, in train mode as ``nn.Module`` leaves it.

    Raises:
        RunConfigError: the config is missing, not YAML, or its ``model.init_args.net`` does not build a
            :class:`Zim` (e.g. a label converter run's config).
        CheckpointError: the checkpoint is missing, unreadable, or holds another network's weights.
    """
    import yaml

    path = Path(config)
    expected = "expected the config.yaml that `zim-lightning fit` saved in a ZIM training run's log directory"
    if not path.is_file():
        raise RunConfigError(f"run config {str(path)!r} does not exist or is not a file; {expected}")
    try:
        document = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RunConfigError(f"run config {str(path)!r} is not YAML ({err}); {expected}") from err
    model = document.get("model") if isinstance(document, dict) else None
    init_args = model.get("init_args") if isinstance(model, dict) else None
    spec = init_args.get("net") if isinstance(init_args, dict) else None
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise RunConfigError(f"run config {str(path)!r} has no model.init_args.net.class_path; {expected}")
    network = network_from_spec(
        spec, source=f"run config {str(path)!r}", model_class_path=str(model.get("class_path"))
    )
    if checkpoint is not None:
        load_exactly(
            network,
            read_state_dict(checkpoint),
            source=f"{checkpoint} (as the network of run config {path}: {spec['class_path']})",
        )
    return network


def build_zim_vit_b(**options: Any) -> Zim:
    """ZIM at SAM ViT-B's sizes; ``options`` as :func:`build_zim`'s (``checkpoint``, ``sam_checkpoint``, ...)."""
    return build_zim(variant="vit_b", **options)


def build_zim_vit_l(**options: Any) -> Zim:
    """ZIM at SAM ViT-L's sizes; ``options`` as :func:`build_zim`'s."""
    return build_zim(variant="vit_l", **options)


def build_zim_vit_h(**options: Any) -> Zim:
    """ZIM at SAM ViT-H's sizes; ``options`` as :func:`build_zim`'s."""
    return build_zim(variant="vit_h", **options)


def build_zim_tiny(**options: Any) -> Zim:
    """The tiny test ZIM (SAM's interfaces and 1024 frame, narrow and shallow); ``options`` as
    :func:`build_zim`'s."""
    return build_zim(variant="tiny", **options)


#: name -> builder (segment-anything's ``sam_model_registry`` style). In a LightningCLI config, name
#: ``zim_lightning.models.build.build_zim`` with ``variant``: its arguments are typed for validation.
zim_model_registry: dict[str, Callable[..., Zim]] = {
    "vit_b": build_zim_vit_b,
    "vit_l": build_zim_vit_l,
    "vit_h": build_zim_vit_h,
    "tiny": build_zim_tiny,
}


def variant_of(model: Zim) -> str | None:
    """The registered size (``vit_b``, ..., ``tiny``) whose image encoder ``model`` has, or None."""
    width = model.image_encoder.patch_embed.proj.out_channels
    depth = len(model.image_encoder.blocks)
    for name, sizes in ZIM_VARIANTS.items():
        if (sizes["encoder_embed_dim"], sizes["encoder_depth"]) == (width, depth):
            return name
    return None
