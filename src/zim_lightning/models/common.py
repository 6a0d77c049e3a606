"""Small layers shared by ZIM's image feature pyramid and hierarchical pixel decoder (ZIM paper,
Sec. 3.3, "hierarchical pixel decoder")."""

from __future__ import annotations

from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class ConvBlock(nn.Sequential):
    """3x3 convolution, channel LayerNorm and GELU: ``Bxin_chxHxW -> Bxout_chx(H/stride)x(W/stride)``.

    Channel LayerNorm (SAM's ``LayerNorm2d``) rather than BatchNorm keeps the output independent of the
    batch, which matters when one image is decoded with many prompt sets.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: 1 or 2.
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            LayerNorm2d(out_channels),
            nn.GELU(),
        )
