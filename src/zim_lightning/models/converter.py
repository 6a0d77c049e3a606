"""Label converter: image + coarse segmentation mask -> alpha matte (ZIM paper, Sec. 3.1).

The paper's converter is a mask-guided matting network in the style of MGMatting (Yu et al., CVPR 2021)
on a Hiera-base-plus backbone. This module implements it:

- the backbone (:class:`~zim_lightning.models.hiera_backbone.HieraBackbone`) sees the normalised image and
  the mask as a fourth channel and gives features at strides 4, 8, 16 and 32;
- a top-down decoder fuses them, and two light shortcut branches on the raw 4-channel input bring
  features at strides 2 and 1, so that hair-level detail reaches the output;
- three heads predict alpha at output strides 8, 4 and 1;
- progressive refinement (MGMatting's PRM) starts from the stride-8 alpha and overwrites it with the
  stride-4 prediction inside the dilated uncertain band of the current alpha, then with the stride-1
  prediction inside the band of the updated alpha. Confident regions therefore keep the coarse,
  semantically robust prediction and only boundaries take the fine ones.

``converter_model_registry`` maps names to builders ``(*, checkpoint=None, backbone_checkpoint=None)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zim_lightning.models.checkpoint import (
    load_exactly,
    mark_random_start,
    read_state_dict,
    warn_random_start,
)
from zim_lightning.models.hiera_backbone import HieraBackbone

#: SAM's normalisation of 0-255 RGB pixels (the backbone was pretrained with SAM 2, which uses it).
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

#: Inputs must be multiples of the backbone's coarsest stride (32) so every stage has whole cells.
SIZE_MULTIPLE = 32

#: Maximum number of GroupNorm groups in the decoder: batch-size independent, unlike BatchNorm, which
#: matters for 1024-px crops where a GPU holds only a few samples.
_NORM_GROUPS = 8

#: Narrowest decoder layer (the full-resolution ones), so tiny configurations keep some capacity.
_MIN_DECODER_DIM = 8


def uncertain_band(alpha: torch.Tensor, radius: int, *, eps: float = 1.0 / 255.0) -> torch.Tensor:
    """Pixels within ``radius`` (Euclidean) of an uncertain alpha value.

    A pixel is uncertain when ``eps < alpha < 1 - eps``, i.e. strictly between 0 and 1 at 8-bit
    precision (a sigmoid never reaches exactly 0 or 1, so an exact test would mark everything). The band
    is that set dilated by a disk of diameter ``2 * radius + 1`` (MGMatting dilates with an ellipse).

    Args:
        alpha: Bx1xHxW alpha in [0, 1].
        radius: dilation radius in pixels (>= 0).
        eps: tolerance of "certainly 0" and "certainly 1".

    Returns:
        Bx1xHxW bool, True inside the band.
    """
    if radius < 0:
        raise ValueError(f"band radius must be >= 0, got {radius}")
    unsure = ((alpha > eps) & (alpha < 1.0 - eps)).to(torch.float32)
    if radius > 0:
        offsets = torch.arange(-radius, radius + 1, device=alpha.device, dtype=torch.float32)
        disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2 + radius).to(torch.float32)
        unsure = F.conv2d(unsure, disk[None, None], padding=radius)
    return unsure > 0.5


def band_radius(width: int) -> int:
    """The dilation radius of an MGMatting refinement width: a kernel ``width // 2`` pixels across (its
    evaluation setting; training draws the diameter from 1..width-1), so a radius of ``width // 4``."""
    return (width // 2) // 2


def progressive_refine(
    current: torch.Tensor, finer: torch.Tensor, width: int, *, eps: float = 1.0 / 255.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of MGMatting's progressive refinement.

    Args:
        current: Bx1xHxW alpha in [0, 1] so far (the stride-8 prediction at the first step).
        finer: Bx1xHxW alpha in [0, 1] from the finer head, same shape.
        width: radius in pixels of the dilation of the uncertain band of ``current``.
        eps: tolerance of the uncertainty test (see :func:`uncertain_band`).

    Returns:
        ``(alpha, band)``: Bx1xHxW alpha equal to ``finer`` inside the band and to ``current`` outside,
        and the Bx1xHxW bool band. The band is computed from detached values: it selects, it is not learnt.
    """
    if current.shape != finer.shape:
        raise ValueError(
            f"progressive_refine needs equal shapes, got {tuple(current.shape)} and {tuple(finer.shape)}"
        )
    band = uncertain_band(current.detach(), width, eps=eps)
    return torch.where(band, finer, current), band


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, _NORM_GROUPS), channels)


class _ConvNormAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, *, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            _norm(out_ch),
            nn.ReLU(inplace=True),
        )


class _FuseUp(nn.Module):
    """Upsample by 2, concatenate a skip feature of the new stride, and mix with two 3x3 convs."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(_ConvNormAct(in_ch + skip_ch, out_ch), _ConvNormAct(out_ch, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # BxCxhxw -> BxCxHxW with (H, W) = skip's size (2h, 2w for inputs that are multiples of 32)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.mix(torch.cat([x, skip], dim=1))


class MattingConverter(nn.Module):
    """Mask-guided matting network on a Hiera backbone: the ZIM label converter.

    Args:
        backbone: timm Hiera variant (``"sam2_hiera_base_plus"`` in the paper).
        backbone_embed_dim: override of the backbone's stage-1 width (None: the variant's).
        backbone_num_heads: override of its stage-1 heads (None: the variant's).
        backbone_stages: override of its blocks per stage, 4 entries (None: the variant's).
        backbone_global_att_blocks: override of its global-attention block indices (None: the variant's).
        backbone_window_spec: override of its window sizes per stage (None: the variant's).
        backbone_checkpoint: local SAM 2 / timm Hiera weights to start from (None: random init).
        decoder_dim: decoder width at strides 32 and 16; it halves at each finer stride (floor 8).
        progressive_refinement: MGMatting's progressive refinement. False: ``alpha`` is the stride-1
            prediction alone (ablation).
        refine_width_os4: MGMatting's refinement width (``self_refine_width1``, 30) of the band where the
            stride-4 alpha replaces the stride-8 alpha: the uncertain pixels dilated by a disk ``width // 2``
            pixels across in evaluation (radius 7 at 30), one 1..width-1 across in training.
        refine_width_os1: the same for the band where the stride-1 alpha replaces the previous alpha
            (MGMatting's ``self_refine_width2``, 15: radius 3 in evaluation).
        random_refine_width: in training mode draw each kernel's diameter uniformly from 1..width-1 per
            batch (MGMatting's training-time perturbation); evaluation always uses ``width // 2``.
        uncertainty_eps: alpha values within this of 0 or 1 count as certain.
    """

    def __init__(
        self,
        *,
        backbone: str = "sam2_hiera_base_plus",
        backbone_embed_dim: int | None = None,
        backbone_num_heads: int | None = None,
        backbone_stages: list[int] | None = None,
        backbone_global_att_blocks: list[int] | None = None,
        backbone_window_spec: list[int] | None = None,
        backbone_checkpoint: str | None = None,
        decoder_dim: int = 256,
        progressive_refinement: bool = True,
        refine_width_os4: int = 30,
        refine_width_os1: int = 15,
        random_refine_width: bool = True,
        uncertainty_eps: float = 1.0 / 255.0,
    ) -> None:
        super().__init__()
        if refine_width_os4 < 0 or refine_width_os1 < 0:
            raise ValueError(
                f"refinement widths must be >= 0, got refine_width_os4={refine_width_os4}, "
                f"refine_width_os1={refine_width_os1}"
            )
        self.backbone = HieraBackbone(
            variant=backbone,
            in_chans=4,
            embed_dim=backbone_embed_dim,
            num_heads=backbone_num_heads,
            stages=backbone_stages,
            global_att_blocks=backbone_global_att_blocks,
            window_spec=backbone_window_spec,
        )
        if backbone_checkpoint is not None:
            self.backbone.load_pretrained(backbone_checkpoint)
        if self.backbone.strides != (4, 8, 16, 32):
            raise ValueError(
                f"backbone {backbone!r} has strides {self.backbone.strides}, expected (4, 8, 16, 32)"
            )
        self.progressive_refinement = progressive_refinement
        self.refine_width_os4 = refine_width_os4
        self.refine_width_os1 = refine_width_os1
        self.random_refine_width = random_refine_width
        self.uncertainty_eps = uncertainty_eps
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        # Whether a batch's mask values passed the range check (see _check_inputs).
        self._mask_values_checked = False

        # decoder width per output stride: full width at the coarse strides, halving towards full
        # resolution where maps are large and carry less semantics
        dim = {32: decoder_dim, 16: decoder_dim}
        for stride, halvings in ((8, 1), (4, 2), (2, 3), (1, 4)):
            dim[stride] = max(decoder_dim >> halvings, _MIN_DECODER_DIM)
        c4, c8, c16, c32 = self.backbone.channels
        self.bottleneck = _ConvNormAct(c32, dim[32], kernel=1)
        self.up16 = _FuseUp(dim[32], c16, dim[16])
        self.up8 = _FuseUp(dim[16], c8, dim[8])
        self.up4 = _FuseUp(dim[8], c4, dim[4])
        # Shortcuts from the raw 4-channel input: the backbone starts at stride 4 and never sees single
        # pixels, so strand-level detail has to come from here.
        self.shortcut2 = nn.Sequential(_ConvNormAct(4, dim[2], stride=2), _ConvNormAct(dim[2], dim[2]))
        self.shortcut1 = nn.Sequential(_ConvNormAct(4, dim[1]), _ConvNormAct(dim[1], dim[1]))
        self.up2 = _FuseUp(dim[4], dim[2], dim[2])
        self.up1 = _FuseUp(dim[2], dim[1], dim[1])
        self.head_os8 = nn.Conv2d(dim[8], 1, 3, padding=1)
        self.head_os4 = nn.Conv2d(dim[4], 1, 3, padding=1)
        self.head_os1 = nn.Conv2d(dim[1], 1, 3, padding=1)

    def _check_inputs(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Bx3xHxW RGB in [0, 255], got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(
                f"images must have H and W multiples of {SIZE_MULTIPLE} (the backbone's coarsest stride), "
                f"got {h}x{w}; pad or resize them"
            )
        if tuple(masks.shape) != (b, 1, h, w):
            raise ValueError(
                f"masks must be Bx1xHxW = {(b, 1, h, w)} in [0, 1] to match the images, got {tuple(masks.shape)}"
            )
        if not masks.is_floating_point():
            raise ValueError(
                f"masks must be float in [0, 1], got dtype {masks.dtype} (a 0/255 uint8 mask: divide by 255)"
            )
        # The values are read back (the host waits for the device) until a batch with a foreground passes:
        # a mask in the wrong range (0/255) comes in every batch, so the first shows it, and later steps
        # do not wait.
        # Skipped while compiling (a data-dependent branch would split the graph).
        if not self._mask_values_checked and not torch.compiler.is_compiling():
            low, high = torch.aminmax(masks)
            if low < 0 or high > 1:
                raise ValueError(f"masks must be in [0, 1], got values in [{float(low)}, {float(high)}]")
            self._mask_values_checked = bool(high > 0)  # an empty batch shows nothing of the range

    def _widths(self) -> tuple[int, int]:
        """Band radii (os4, os1): a disk ``width // 2`` across in evaluation; in training one whose
        diameter is drawn from 1..width-1 per batch (MGMatting's kernels of those sizes)."""
        if not (self.training and self.random_refine_width):
            return band_radius(self.refine_width_os4), band_radius(self.refine_width_os1)

        def draw(width: int) -> int:
            return int(torch.randint(1, width, ()).item()) // 2 if width > 1 else 0

        return draw(self.refine_width_os4), draw(self.refine_width_os1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict alpha mattes.

        Args:
            images: Bx3xHxW RGB in [0, 255] (uint8 or float); H and W multiples of 32.
            masks: Bx1xHxW coarse segmentation in [0, 1].

        Returns:
            dict of Bx1xHxW tensors in [0, 1] at full resolution: ``alpha`` (after progressive
            refinement), ``alpha_os1``, ``alpha_os4``, ``alpha_os8`` (each head alone, for the losses), and
            Bx1xHxW bool ``band_os4`` / ``band_os1``: where refinement took the stride-4 / stride-1 alpha
            (MGMatting weights its finer losses by these; ``ConverterLoss(band_weighted=True)`` does).
        """
        self._check_inputs(images, masks)
        size = images.shape[-2:]
        x = (images.float() - self.pixel_mean) / self.pixel_std
        # mask to [-1, 1]: zero-centred like the normalised RGB channels
        m = masks.to(x.dtype) * 2.0 - 1.0
        inp = torch.cat([x, m], dim=1)  # Bx4xHxW

        f4, f8, f16, f32 = self.backbone(inp)  # BxC_ixH/sxW/s for s = 4, 8, 16, 32
        y = self.bottleneck(f32)  # BxD32xH/32xW/32
        y = self.up16(y, f16)  # BxD16xH/16xW/16
        y8 = self.up8(y, f8)  # BxD8xH/8xW/8
        y4 = self.up4(y8, f4)  # BxD4xH/4xW/4
        y2 = self.up2(y4, self.shortcut2(inp))  # BxD2xH/2xW/2
        y1 = self.up1(y2, self.shortcut1(inp))  # BxD1xHxW

        def full(logits: torch.Tensor) -> torch.Tensor:
            # upsample logits rather than alpha so the sigmoid keeps edges sharp; in float32, so that
            # under bf16 autocast alpha is not rounded to bf16's 8 bits (1/256 steps near 1) before
            # the losses and the 8-bit PNGs of SA1B-Matte
            logits = logits.float()
            return torch.sigmoid(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))

        alpha_os8 = full(self.head_os8(y8))
        alpha_os4 = full(self.head_os4(y4))
        alpha_os1 = torch.sigmoid(self.head_os1(y1).float())
        if self.progressive_refinement:
            width4, width1 = self._widths()
            alpha, band_os4 = progressive_refine(alpha_os8, alpha_os4, width4, eps=self.uncertainty_eps)
            alpha, band_os1 = progressive_refine(alpha, alpha_os1, width1, eps=self.uncertainty_eps)
        else:
            alpha = alpha_os1
            band_os4 = torch.ones_like(alpha_os1, dtype=torch.bool)
            band_os1 = band_os4
        return {
            "alpha": alpha,
            "alpha_os1": alpha_os1,
            "alpha_os4": alpha_os4,
            "alpha_os8": alpha_os8,
            "band_os4": band_os4,
            "band_os1": band_os1,
        }


def _build(
    name: str, checkpoint: str | Path | None, backbone_checkpoint: str | Path | None, **kwargs: object
) -> MattingConverter:
    remedy = (
        "the paper starts its Hiera backbone from SAM 2's: backbone_checkpoint=.../sam2_hiera_base_plus.pt"
    )
    if name != "converter_tiny" and checkpoint is None and backbone_checkpoint is None:
        warn_random_start(f"{name} (no checkpoint or backbone_checkpoint)", remedy)
    model = MattingConverter(
        backbone_checkpoint=None if backbone_checkpoint is None else str(backbone_checkpoint),
        **kwargs,  # type: ignore[arg-type]
    )
    if checkpoint is None and backbone_checkpoint is None:
        mark_random_start(model, remedy)
    if checkpoint is not None:
        load_exactly(model, read_state_dict(checkpoint), source=f"{checkpoint} (as {name})")
    return model


def build_converter_hiera_b_plus(
    *, checkpoint: str | None = None, backbone_checkpoint: str | None = None
) -> MattingConverter:
    """The paper's converter: Hiera-base-plus backbone, decoder width 256."""
    return _build(
        "converter_hiera_b_plus",
        checkpoint,
        backbone_checkpoint,
        backbone="sam2_hiera_base_plus",
        decoder_dim=256,
    )


def build_converter_tiny(
    *, checkpoint: str | None = None, backbone_checkpoint: str | None = None
) -> MattingConverter:
    """A tiny converter for tests and CPU demos: Hiera with width 16 and 5 blocks, decoder width 32."""
    return _build(
        "converter_tiny",
        checkpoint,
        backbone_checkpoint,
        backbone="sam2_hiera_tiny",
        backbone_embed_dim=16,
        backbone_num_heads=1,
        # one block per stage plus a second, global-attention block in stage 3 (the global path is
        # exercised; timm cannot pool queries in a global block, so it must not start a stage)
        backbone_stages=[1, 1, 2, 1],
        backbone_global_att_blocks=[3],
        backbone_window_spec=[8, 4, 4, 2],
        decoder_dim=32,
    )


converter_model_registry: dict[str, Callable[..., MattingConverter]] = {
    "converter_hiera_b_plus": build_converter_hiera_b_plus,
    "converter_tiny": build_converter_tiny,
}
