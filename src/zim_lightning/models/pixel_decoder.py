"""Pixel decoders of ZIM (ZIM paper, Sec. 3.3, "hierarchical pixel decoder").

Both turn the transformer's 64x64 image embedding into the per-pixel embedding that the mask tokens are
dotted with (its width is the hypernetwork output, ``transformer_dim // 8``, as in SAM):

- ``hierarchical`` (ZIM): :class:`ImageFeaturePyramid` computes light convolutional features from the
  normalised input image at strides 2, 4 and 8 (``feat_D0``, ``feat_D1``, ``feat_D2``; computed once
  per image, on the encoder side, as the official ``encoder.onnx`` does). :class:`HierarchicalPixelDecoder`
  upsamples the embedding x2 three times, concatenating the feature of the same stride and fusing with a
  3x3 convolution each time: output stride 2 (512x512 for 1024 input).
- ``sam``: SAM's two transposed convolutions, output stride 4 (256x256); kept under SAM's name
  ``output_upscaling`` so it loads from a SAM checkpoint. Transposed convolutions with kernel = stride
  are what the paper blames for checkerboard artifacts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zim_lightning.models.common import ConvBlock, LayerNorm2d

#: Output strides of the image feature pyramid, finest first (feat_D0, feat_D1, feat_D2).
PYRAMID_STRIDES: tuple[int, int, int] = (2, 4, 8)
#: Output stride of each pixel decoder variant, relative to the 1024 input.
DECODER_STRIDES: dict[str, int] = {"hierarchical": 2, "sam": 4}


class ImageFeaturePyramid(nn.Module):
    """Light convolutional features of the normalised input image at strides 2, 4 and 8.

    Each level halves the resolution with a strided 3x3 ConvBlock and refines with a second one.

    The first convolution has a bias. Without one, the image's zero padding (the frame beyond a
    non-square image) would reach the first LayerNorm as pixels of all zeros: at zero variance its
    backward pass multiplies the gradient by 1/sqrt(eps) = 1000, so the band of padding next to the
    image gave the pyramid gradients of 1e5 to 1e7 at every step. Those overflow float16 (the loss
    scaler of 16-mixed then skips steps and shrinks its scale below 1) and, in any precision, swamp
    AdamW's moment estimates.

    Args:
        channels: widths of (feat_D0, feat_D1, feat_D2), at strides (2, 4, 8).
        in_channels: input image channels.
    """

    def __init__(self, *, channels: tuple[int, int, int], in_channels: int = 3) -> None:
        super().__init__()
        self.channels = tuple(channels)
        widths = (in_channels, *self.channels)
        self.levels = nn.ModuleList(
            nn.Sequential(
                ConvBlock(in_channels=widths[i], out_channels=widths[i + 1], stride=2, bias=i == 0),
                ConvBlock(in_channels=widths[i + 1], out_channels=widths[i + 1]),
            )
            for i in range(len(self.channels))
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the pyramid.

        Args:
            image: Bx3xHxW normalised image (SAM mean/std), H and W multiples of 8.

        Returns:
            (feat_D0 BxC0x(H/2)x(W/2), feat_D1 BxC1x(H/4)x(W/4), feat_D2 BxC2x(H/8)x(W/8)).
        """
        feats = []
        x = image
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats[0], feats[1], feats[2]


class HierarchicalPixelDecoder(nn.Module):
    """Upsample the image embedding step by step, fusing the image features of each stride.

    Stage i: 1x1 projection to ``stage_channels[i]`` (cheap, at the coarse resolution), bilinear x2,
    concatenation with the pyramid feature of the new stride, 3x3 ConvBlock.

    Args:
        embed_dim: channels of the transformer's image embedding (at stride 16).
        feature_channels: widths of (feat_D0, feat_D1, feat_D2) at strides (2, 4, 8).
        stage_channels: output widths of the stages at strides (8, 4, 2); the last is the per-pixel
            embedding width (``transformer_dim // 8``).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        feature_channels: tuple[int, int, int],
        stage_channels: tuple[int, int, int],
    ) -> None:
        super().__init__()
        in_widths = (embed_dim, *stage_channels[:-1])
        # Stages run coarse to fine: stride 8 uses feat_D2, stride 4 feat_D1, stride 2 feat_D0.
        fused_feats = tuple(reversed(tuple(feature_channels)))
        self.projections = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=1)
            for c_in, c_out in zip(in_widths, stage_channels, strict=True)
        )
        self.fusions = nn.ModuleList(
            ConvBlock(in_channels=c_out + c_feat, out_channels=c_out)
            for c_out, c_feat in zip(stage_channels, fused_feats, strict=True)
        )
        self.out_channels = stage_channels[-1]

    def forward(self, embedding: torch.Tensor, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Decode.

        Args:
            embedding: BxCx(H/16)x(W/16) image embedding after the transformer.
            feats: (feat_D0, feat_D1, feat_D2) at strides (2, 4, 8); batch B or 1 (broadcast).

        Returns:
            Bx``out_channels``x(H/2)x(W/2) per-pixel embedding.
        """
        x = embedding
        for projection, fusion, feat in zip(self.projections, self.fusions, reversed(feats), strict=True):
            x = F.interpolate(projection(x), scale_factor=2.0, mode="bilinear", align_corners=False)
            feat = feat.expand(x.shape[0], -1, -1, -1)  # one image's features serve B prompt sets
            x = fusion(torch.cat([x, feat], dim=1))
        return x


def sam_output_upscaling(transformer_dim: int) -> nn.Sequential:
    """SAM's pixel decoder: two transposed convolutions, stride 16 -> 4.

    The layer order equals SAM's ``MaskDecoder.output_upscaling`` so its keys load from a SAM checkpoint.

    Args:
        transformer_dim: channels C of the image embedding.

    Returns:
        Module mapping BxCxhxw to Bx(C/8)x(4h)x(4w).
    """
    return nn.Sequential(
        nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(transformer_dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
        nn.GELU(),
    )
