"""Two-way transformer with prompt-aware masked attention (ZIM paper, Sec. 3.3, "prompt-aware masked
attention").

SAM's two-way transformer, with the token-to-image cross-attention (in every block and in the final
layer) restricted by the prompt's attention map ``M`` (one value per image-embedding cell, the same for
every token and head):

- box samples: ``softmax(QK^T / sqrt(d) + M_b) V`` with ``M_b = 0`` where the box map is 1 and
  ``-inf`` where it is 0: tokens see only the cells inside the box;
- point samples: ``softmax(M_p * QK^T / sqrt(d)) V`` with ``M_p`` in [0, 1] the Gaussian map: logits
  are damped far from the clicks (attention flattens there, it is not cut off).

Since ``M`` depends on the key position only, ``M_p * (q . k_j)`` equals ``q . (M_p[j] k_j)``: the point
mode scales the keys and both modes run in ``scaled_dot_product_attention``. The map is detached (no
gradient flows into the prompts). A sample whose map is all zero (a box off the grid, points off the
grid) would mask every key; its map is replaced by all ones, i.e. plain attention, so no row is ever
fully masked and no NaN appears.

Module and parameter names equal ``segment_anything``'s ``TwoWayTransformer`` so a SAM checkpoint's
``mask_decoder.transformer.*`` loads key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn


@dataclass(frozen=True)
class KeyMask:
    """How the token-to-image attention is restricted, per sample, over the HW image keys.

    Attributes:
        scale: BxHW float in [0, 1], multiplies the attention logits (1 = unchanged), or None.
        bias: BxHW float in {0, -inf}, added to the attention logits (-inf = key hidden).
    """

    scale: Tensor | None
    bias: Tensor

    @classmethod
    def hiding(cls, present: Tensor) -> KeyMask:
        """Hide the keys where ``present`` (BxN bool) is False; the others attend as usual."""
        return cls(scale=None, bias=torch.where(present, 0.0, float("-inf")))

    @classmethod
    def from_attention_map(cls, attn_map: Tensor, box_sample: Tensor) -> KeyMask:
        """Build the logit scale and bias from a prompt attention map.

        Args:
            attn_map: BxHxW float in [0, 1], the prompt's map (1 inside a box / at a click).
            box_sample: B bool, True for box samples (additive mask), False for point samples
                (multiplicative mask).

        Returns:
            The key mask; rows whose map is all zero are un-masked (scale 1, bias 0).
        """
        weight = attn_map.detach().flatten(1).float()  # BxHW
        empty = weight.amax(dim=1, keepdim=True) <= 0  # Bx1
        weight = torch.where(empty, torch.ones_like(weight), weight)
        box = box_sample[:, None]
        scale = torch.where(box, torch.ones_like(weight), weight)
        hidden = box & (weight <= 0)
        bias = torch.where(hidden, torch.full_like(weight, float("-inf")), torch.zeros_like(weight))
        return cls(scale=scale, bias=bias)


class MaskableAttention(Attention):
    """SAM's decoder attention (same ``q/k/v/out_proj`` weights), optionally restricted by a key mask."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: KeyMask | None = None) -> Tensor:
        """Attend queries to keys.

        Args:
            q: BxNqxC queries.
            k: BxNkxC keys.
            v: BxNkxC values.
            key_mask: restriction over the Nk keys, or None for plain attention.

        Returns:
            BxNqxC.
        """
        q = self._separate_heads(self.q_proj(q), self.num_heads)  # BxheadsxNqxc
        k = self._separate_heads(self.k_proj(k), self.num_heads)  # BxheadsxNkxc
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        bias = None
        if key_mask is not None:
            if key_mask.scale is not None:  # scaling key j scales logit column j
                k = k * key_mask.scale[:, None, :, None].to(k.dtype)
            bias = key_mask.bias[:, None, None, :].to(q.dtype)  # Bx1x1xNk, broadcast over heads, queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(self._recombine_heads(out))


class TwoWayBlock(nn.Module):
    """One block of SAM's two-way transformer, the token-to-image attention maskable.

    Args:
        embedding_dim: channel width C.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        attention_downsample_rate: internal width divisor of the cross-attentions.
        skip_first_layer_pe: True in the first block, where queries are the prompt tokens themselves.
    """

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MaskableAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = MaskableAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = MaskableAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        key_mask: KeyMask | None,
        token_mask: KeyMask | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Update tokens and image keys.

        Args:
            queries: BxNxC tokens.
            keys: BxHWxC image embedding.
            query_pe: BxNxC token positional embedding (the initial tokens).
            key_pe: BxHWxC image positional encoding.
            key_mask: prompt-aware restriction of the token-to-image attention, or None.
            token_mask: tokens hidden as keys (absent prompt points), in the token self-attention and
                the image-to-token attention, so they change no other token and no image cell; or None.

        Returns:
            Updated (queries BxNxC, keys BxHWxC).
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries, key_mask=token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries, key_mask=token_mask)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys, key_mask=key_mask))

        queries = self.norm3(queries + self.mlp(queries))

        # Image-to-token attention is not prompt-masked: every image cell may read the prompt tokens.
        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries, key_mask=token_mask))
        return queries, keys


class MaskedTwoWayTransformer(nn.Module):
    """SAM's two-way transformer with prompt-aware masked token-to-image attention.

    Args:
        depth: number of two-way blocks (2 in SAM).
        embedding_dim: channel width C.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLPs.
        attention_downsample_rate: internal width divisor of the cross-attentions.
    """

    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            TwoWayBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = MaskableAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        point_embedding: Tensor,
        key_mask: KeyMask | None = None,
        token_mask: KeyMask | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the blocks and the final token-to-image attention.

        Args:
            image_embedding: BxCxHxW.
            image_pe: BxCxHxW (or 1xCxHxW) positional encoding of the image grid.
            point_embedding: BxNxC tokens (output tokens followed by prompt tokens).
            key_mask: restriction over the HW image cells (row-major), or None for SAM's attention.
            token_mask: tokens hidden as keys (see :class:`TwoWayBlock`), or None.

        Returns:
            (tokens BxNxC, image embedding BxHWxC).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)  # BxCxHxW -> BxHWxC
        key_pe = image_pe.flatten(2).transpose(1, 2)  # BxHWxC or 1xHWxC
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, key_mask, token_mask)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(
            queries + self.final_attn_token_to_image(q=q, k=k, v=keys, key_mask=key_mask)
        )
        return queries, keys
