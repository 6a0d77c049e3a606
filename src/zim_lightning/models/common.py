"""Small layers shared by ZIM's image feature pyramid and pixel decoders (ZIM paper, Sec. 3.3,
"hierarchical pixel decoder")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a BxCxHxW map, at every pixel.

    Same parameters (``weight``, ``bias``) and result as ``segment_anything``'s ``LayerNorm2d``, computed
    with the fused ``F.layer_norm`` on a channels-last view (about 3x faster at 512x512 on CPU).

    Args:
        num_channels: C.
        eps: variance epsilon (SAM's 1e-6).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        # A Python tuple, not x.shape[-1:], so ONNX tracing sees a constant.
        self.normalized_shape = (num_channels,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # BxCxHxW -> BxHxWxC
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvBlock(nn.Sequential):
    """3x3 convolution, channel LayerNorm and GELU: ``Bxin_chxHxW -> Bxout_chx(H/stride)x(W/stride)``.

    Channel LayerNorm (as in SAM) rather than BatchNorm keeps the output independent of the batch,
    which matters when one image is decoded with many prompt sets.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: 1 or 2.
        bias: give the convolution a bias (see :class:`~zim_lightning.models.pixel_decoder.ImageFeaturePyramid`).
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias),
            LayerNorm2d(out_channels),
            nn.GELU(),
        )
