"""ZIM's mask decoder (ZIM paper, Sec. 3.3): SAM's output tokens and two-way transformer with
prompt-aware masked attention, a swappable pixel decoder, and the dot product of the per-pixel
embedding with the hypernetwork-mapped mask tokens.

Parameter names equal ``segment_anything``'s ``MaskDecoder`` for every part the two share
(``transformer``, ``iou_token``, ``mask_tokens``, ``iou_prediction_head``, ``output_hypernetworks_mlps``
and, for the ``sam`` pixel decoder, ``output_upscaling``), so a SAM checkpoint loads key for key.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from zim_lightning.models.pixel_decoder import (
    DECODER_STRIDES,
    HierarchicalPixelDecoder,
    sam_output_upscaling,
)
from zim_lightning.models.transformer import KeyMask, MaskedTwoWayTransformer

#: ZIM keeps SAM's 4 mask tokens (SAM's single-mask token plus 3 multimask tokens).
NUM_MASK_TOKENS = 4
#: Depth of SAM's hypernetwork MLPs.
HYPERNETWORK_DEPTH = 3


class MaskDecoder(nn.Module):
    """Predict mask logits and IoU scores from an image embedding and prompt tokens.

    Args:
        transformer_dim: token and image-embedding width C.
        transformer_depth: two-way blocks.
        transformer_num_heads: attention heads.
        transformer_mlp_dim: hidden width of the token MLPs.
        iou_head_depth: layers of the IoU MLP.
        iou_head_hidden_dim: hidden width of the IoU MLP.
        pixel_decoder: ``"hierarchical"`` (ZIM, stride 2) or ``"sam"`` (SAM's, stride 4).
        feature_channels: widths of (feat_D0, feat_D1, feat_D2); used by the hierarchical decoder.
        stage_channels: widths of the hierarchical decoder's stages at strides (8, 4, 2); the last must
            be ``transformer_dim // 8``.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer_depth: int,
        transformer_num_heads: int,
        transformer_mlp_dim: int,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        pixel_decoder: str = "hierarchical",
        feature_channels: tuple[int, int, int] = (16, 32, 64),
        stage_channels: tuple[int, int, int] = (64, 32, 32),
    ) -> None:
        super().__init__()
        if pixel_decoder not in DECODER_STRIDES:
            raise ValueError(f"pixel_decoder must be one of {sorted(DECODER_STRIDES)}, got {pixel_decoder!r}")
        pixel_dim = transformer_dim // 8
        if pixel_decoder == "hierarchical" and stage_channels[-1] != pixel_dim:
            raise ValueError(
                f"stage_channels[-1] must equal transformer_dim // 8 = {pixel_dim} (the hypernetwork "
                f"output width), got {stage_channels[-1]}"
            )
        self.transformer_dim = transformer_dim
        self.num_mask_tokens = NUM_MASK_TOKENS
        self.pixel_decoder_kind = pixel_decoder
        self.output_stride = DECODER_STRIDES[pixel_decoder]
        self.transformer = MaskedTwoWayTransformer(
            depth=transformer_depth,
            embedding_dim=transformer_dim,
            num_heads=transformer_num_heads,
            mlp_dim=transformer_mlp_dim,
        )
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, transformer_dim)
        if pixel_decoder == "sam":
            self.output_upscaling = sam_output_upscaling(transformer_dim)
        else:
            self.pixel_decoder = HierarchicalPixelDecoder(
                embed_dim=transformer_dim, feature_channels=feature_channels, stage_channels=stage_channels
            )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, pixel_dim, HYPERNETWORK_DEPTH)
            for _ in range(NUM_MASK_TOKENS)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, NUM_MASK_TOKENS, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_embedding: torch.Tensor,
        prompt_tokens: torch.Tensor,
        feats: tuple[torch.Tensor, ...],
        key_mask: KeyMask | None,
        prompt_present: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode all 4 masks.

        Args:
            image_embeddings: BxCxhxw or 1xCxhxw (broadcast over the B prompt sets).
            image_pe: 1xCxhxw positional encoding of the grid.
            dense_embedding: 1xCx1x1 "no mask" embedding added to the image embedding.
            prompt_tokens: BxNxC sparse prompt tokens.
            feats: (feat_D0, feat_D1, feat_D2), batch B or 1; ignored by the ``sam`` pixel decoder.
            key_mask: prompt-aware restriction of the token-to-image attention, or None (SAM's).
            prompt_present: BxN bool, False for absent prompt points (hidden from every attention), or
                None (all present).

        Returns:
            (logits Bx4x(16h/stride)x(16w/stride), stride = ``output_stride``; iou Bx4).
        """
        batch = prompt_tokens.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1+4)xC
        tokens = torch.cat([output_tokens[None].expand(batch, -1, -1), prompt_tokens], dim=1)  # Bx(5+N)xC
        src = image_embeddings.expand(batch, -1, -1, -1) + dense_embedding  # BxCxhxw
        _, channels, height, width = src.shape
        token_mask = None
        if prompt_present is not None:  # the output tokens are always present
            present = torch.cat(
                [prompt_present.new_ones(batch, output_tokens.shape[0]), prompt_present], dim=1
            )
            token_mask = KeyMask.hiding(present)
        hs, src = self.transformer(src, image_pe, tokens, key_mask, token_mask)
        iou_token_out = hs[:, 0, :]  # BxC
        mask_tokens_out = hs[:, 1 : 1 + NUM_MASK_TOKENS, :]  # Bx4xC
        src = src.transpose(1, 2).reshape(batch, channels, height, width)  # BxHWxC -> BxCxhxw
        if self.pixel_decoder_kind == "sam":
            upscaled = self.output_upscaling(src)
        else:
            upscaled = self.pixel_decoder(src, feats)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # Bx4x(C/8)
        b, c, h, w = upscaled.shape
        logits = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, NUM_MASK_TOKENS, h, w)
        iou = self.iou_prediction_head(iou_token_out)  # Bx4
        return logits, iou
