"""Prompt embedding of ZIM (ZIM paper, Sec. 3.3: ZIM keeps SAM's prompt encoder).

ZIM takes every prompt as points with labels in SAM's ONNX convention (-1 padding, 0 negative,
1 positive, 2 / 3 box top-left / bottom-right corner), so one tensor pair carries boxes, points and
both. ``segment_anything``'s ``PromptEncoder.forward`` takes boxes as a separate argument and ignores
labels 2 and 3, so this module embeds the whole label set itself while keeping the ``PromptEncoder``'s
parameter names (``pe_layer``, ``point_embeddings.{0..3}``, ``not_a_point_embed``, ``no_mask_embed``),
which makes a SAM checkpoint's ``prompt_encoder.*`` weights load key for key. SAM's mask-prompt branch
(``mask_downscaling``) is left out: ZIM has no mask input.
"""

from __future__ import annotations

import contextlib

import torch
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

#: Number of label embeddings: negative point, positive point, box top-left, box bottom-right.
NUM_POINT_EMBEDDINGS = 4


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the random Fourier features take sin/cos of (2 pi x coords @ gaussian), up to about
    a hundred, so bf16's 8 bits there would move a click by pixels (about 2 px near x = 1000)."""
    if not torch.amp.is_autocast_available(device.type):  # e.g. the meta device: nothing to turn off
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class PromptEncoding(nn.Module):
    """Embeds labelled points into sparse tokens and gives the dense positional encoding.

    Args:
        embed_dim: token width C (the mask decoder's transformer width).
        image_embedding_size: side of the square image embedding (64 for 1024 input).
        input_image_size: side of the square padded input image in pixels (1024).
    """

    def __init__(self, *, embed_dim: int, image_embedding_size: int, input_image_size: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(NUM_POINT_EMBEDDINGS))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid.

        Returns:
            1xCxSxS float, S = ``image_embedding_size``.
        """
        side = self.image_embedding_size
        with _float32(self.no_mask_embed.weight.device):
            return self.pe_layer((side, side)).unsqueeze(0)

    def dense_embedding(self) -> torch.Tensor:
        """The "no mask" embedding SAM adds to the image embedding when no mask prompt is given.

        Returns:
            1xCx1x1 float, broadcastable over the image embedding.
        """
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def forward(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """Embed labelled points.

        Args:
            point_coords: BxNx2 float, ``(X, Y)`` pixels in the padded input frame (1024).
            point_labels: BxN float in {-2, -1, 0, 1, 2, 3}; coordinates of padding (-1) and absent
                points (-2) are ignored.

        Returns:
            BxNxC sparse prompt tokens (zero for absent points, which the decoder hides).
        """
        # +0.5: SAM encodes the centre of the pixel.
        coords = (point_coords.float() + 0.5) / self.input_image_size
        with _float32(coords.device):
            pe = self.pe_layer._pe_encoding(coords)  # BxNxC
        labels = point_labels[..., None]  # BxNx1
        # Padding carries no position, only the "not a point" embedding.
        tokens = pe * (labels >= 0) + self.not_a_point_embed.weight * (labels == -1)
        for label, embedding in enumerate(self.point_embeddings):
            tokens = tokens + embedding.weight * (labels == label)
        return tokens
