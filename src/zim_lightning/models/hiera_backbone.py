"""Hiera backbone of the label converter (ZIM paper, Sec. 3.1 "Label Converter").

The paper builds its label converter on a Hiera-base-plus backbone (SAM 2's image encoder trunk) fed with
the image and the coarse segmentation mask as a fourth input channel. This module wraps timm's
``HieraDet`` (``sam2_hiera_*`` models) so that it returns the four stage outputs (strides 4, 8, 16, 32),
and loads SAM 2 or timm Hiera weights from a local file, extending the patch embedding to the extra
input channel.

timm's Hiera interpolates its global position embedding to the input size on every call and tiles the
windowed one, so any input whose sides are multiples of 32 works (the stride-4 grid must hold whole
windows of ``window_spec[0]`` = 8 cells).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.models.hieradet_sam2 import HieraDet
from torch import nn

from zim_lightning.models.checkpoint import CheckpointError, load_exactly

log = logging.getLogger(__name__)

#: Key prefix of the Hiera trunk inside an official SAM 2 checkpoint (``{"model": {...}}``).
SAM2_TRUNK_PREFIX = "image_encoder.trunk."

#: SAM 2 names the two MLP layers ``layers.0`` / ``layers.1``; timm names them ``fc1`` / ``fc2``.
_SAM2_TO_TIMM_RENAMES: tuple[tuple[str, str], ...] = (
    ("mlp.layers.0.", "mlp.fc1."),
    ("mlp.layers.1.", "mlp.fc2."),
)


class HieraBackbone(nn.Module):
    """timm Hiera trunk returning its four stage outputs.

    Args:
        variant: a timm ``HieraDet`` model name, e.g. ``"sam2_hiera_base_plus"`` (the paper's backbone)
            or ``"sam2_hiera_tiny"``. It is always created with ``pretrained=False``: weights come only
            from :meth:`load_pretrained`, never from the network.
        in_chans: input channels (4: RGB + coarse mask).
        embed_dim: override of the stage-1 width (None: the variant's).
        num_heads: override of the stage-1 head count (None: the variant's).
        stages: override of the number of blocks per stage, 4 entries (None: the variant's).
        global_att_blocks: override of the indices of blocks with global attention (None: the variant's).
            A global block must not be the first block of a stage (timm's query pooling needs a window).
        window_spec: override of the window size per stage, 4 entries (None: the variant's).
    """

    def __init__(
        self,
        *,
        variant: str = "sam2_hiera_base_plus",
        in_chans: int = 4,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        stages: list[int] | None = None,
        global_att_blocks: list[int] | None = None,
        window_spec: list[int] | None = None,
    ) -> None:
        super().__init__()
        overrides = {
            name: value
            for name, value in (
                ("embed_dim", embed_dim),
                ("num_heads", num_heads),
                ("stages", tuple(stages) if stages is not None else None),
                ("global_att_blocks", tuple(global_att_blocks) if global_att_blocks is not None else None),
                ("window_spec", tuple(window_spec) if window_spec is not None else None),
            )
            if value is not None
        }
        if not timm.is_model(variant):
            raise ValueError(
                f"backbone variant {variant!r} is not a timm model; expected e.g. 'sam2_hiera_base_plus'"
            )
        trunk = timm.create_model(variant, pretrained=False, in_chans=in_chans, num_classes=0, **overrides)
        if not isinstance(trunk, HieraDet):
            raise ValueError(
                f"backbone variant {variant!r} is a {type(trunk).__name__}, expected a Hiera (HieraDet) model "
                "such as 'sam2_hiera_base_plus'"
            )
        # The classification head (and its norm) is never used; dropping it keeps every parameter trained
        # and makes SAM 2 trunk checkpoints (which have no head) load exactly.
        trunk.prune_intermediate_layers(indices=len(trunk.stage_ends), prune_head=True)
        self.trunk = trunk
        self.in_chans = in_chans
        self.channels: tuple[int, ...] = tuple(info["num_chs"] for info in trunk.feature_info)
        self.strides: tuple[int, ...] = tuple(info["reduction"] for info in trunk.feature_info)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the trunk.

        Args:
            x: Bx(in_chans)xHxW normalised input, H and W multiples of 32.

        Returns:
            Four feature maps BxC_ixH/s_ixW/s_i for strides s_i = 4, 8, 16, 32 (channels ``self.channels``).
        """
        return self.trunk.forward_intermediates(x, intermediates_only=True)

    def load_pretrained(self, path: str | Path) -> None:
        """Load SAM 2 or timm Hiera weights from a local file.

        Accepted files (``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``): an official
        SAM 2 checkpoint (``{"model": {"image_encoder.trunk.…": …}}``), a timm
        ``sam2_hiera_*`` state dict (its classifier head, if any, is ignored), or a state dict of this
        trunk. A 3-channel patch embedding is extended to ``in_chans`` with zero weights for the extra
        channels, so the pretrained network initially ignores the mask and sees the image as it was
        trained to.

        Raises:
            CheckpointError: if the file is missing, unreadable with ``weights_only=True``, or holds the
                weights of another architecture.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"backbone checkpoint {str(path)!r} does not exist or is not a file")
        try:
            if path.suffix == ".safetensors":  # how the Hugging Face hub ships timm's weights
                obj = safetensors.torch.load_file(str(path), device="cpu")
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch and safetensors raise several types for foreign or corrupt files
            raise CheckpointError(
                f"backbone checkpoint {str(path)!r} could not be read as a PyTorch (weights_only=True) or "
                f"safetensors file: {err}"
            ) from err
        for wrapper in ("model", "state_dict"):
            if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"backbone checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict"
            )
        state = _to_trunk_keys(obj)
        weight = state.get("patch_embed.proj.weight")
        own = self.trunk.patch_embed.proj.weight
        if weight is not None and weight.ndim == 4 and weight.shape[1] < own.shape[1] == self.in_chans:
            extra = weight.new_zeros(weight.shape[0], own.shape[1] - weight.shape[1], *weight.shape[2:])
            state["patch_embed.proj.weight"] = torch.cat([weight, extra], dim=1)
        load_exactly(self.trunk, state, source=str(path))
        log.info("loaded Hiera backbone weights from %s", path)


def _to_trunk_keys(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Map SAM 2 / timm key names onto timm ``HieraDet`` trunk names; drop everything else."""
    if any(key.startswith(SAM2_TRUNK_PREFIX) for key in state):
        state = {
            key[len(SAM2_TRUNK_PREFIX) :]: v for key, v in state.items() if key.startswith(SAM2_TRUNK_PREFIX)
        }
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key.startswith("head."):
            continue
        for old, new in _SAM2_TO_TIMM_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out
