"""ZIM's image encoder (ZIM paper, Sec. 3.3: ZIM keeps SAM's ViT image encoder).

``segment_anything``'s ``ImageEncoderViT`` with SAM's fixed settings (1024 input, 16-px patches,
windowed attention of side 14 with relative positions, a few global blocks, neck to the prompt width),
so the parameters are SAM's, key for key. Two speed switches leave the function unchanged:

- ``attention``: the backend of every block's attention (see
  :mod:`zim_lightning.models.vit_attention`); ``"eager"`` is segment-anything's code.
- ``activation_checkpointing``: in training, each ViT block keeps only its input and recomputes its
  activations in the backward pass (``torch.utils.checkpoint``, non-reentrant), trading about one more
  encoder forward for most of the encoder's activation memory.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch.utils.checkpoint import checkpoint

from zim_lightning.models.vit_attention import ViTAttention, check_backend

#: Side of SAM's windowed attention, in patches.
WINDOW_SIZE = 14
#: LayerNorm epsilon of SAM's ViT.
LAYER_NORM_EPS = 1e-6
#: MLP expansion of SAM's ViT.
MLP_RATIO = 4.0


class ImageEncoder(ImageEncoderViT):
    """SAM's ViT image encoder with a selectable attention backend and activation checkpointing.

    Args:
        image_size: side of the square padded input (1024).
        patch_size: ViT patch size (16): the embedding is ``image_size / patch_size`` on a side.
        embed_dim: ViT width (768 / 1024 / 1280 for vit_b / l / h).
        depth: ViT blocks.
        num_heads: attention heads.
        global_attn_indexes: blocks with global attention; the others use 14x14 windows.
        out_chans: channels of the output embedding (the prompt width, 256 in SAM).
        window_size: side of the attention windows in patches (SAM: 14).
        attention: attention backend, one of
            :data:`~zim_lightning.models.vit_attention.ATTENTION_BACKENDS`.
        activation_checkpointing: recompute each block's activations in the backward pass.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: tuple[int, ...],
        out_chans: int,
        window_size: int = WINDOW_SIZE,
        attention: str = "eager",
        activation_checkpointing: bool = False,
    ) -> None:
        check_backend(attention)
        super().__init__(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=MLP_RATIO,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=LAYER_NORM_EPS),
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
        )
        # Same weights as the stock modules segment-anything just built (so seeds give the same network).
        for block in self.blocks:
            block.attn = ViTAttention.from_sam(block.attn, backend=attention)
        self.activation_checkpointing = activation_checkpointing

    @property
    def attention(self) -> str:
        """The attention backend of the blocks."""
        return self.blocks[0].attn.backend

    def set_attention(self, backend: str) -> None:
        """Switch every block to ``backend`` (weights untouched)."""
        check_backend(backend)
        for block in self.blocks:
            block.attn.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode.

        Args:
            x: Bx3xSxS normalised, padded image.

        Returns:
            BxCx(S/16)x(S/16) image embedding.
        """
        x = self.patch_embed(x)  # BxHxWxD
        if self.pos_embed is not None:
            x = x + self.pos_embed
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # BxHxWxD -> BxDxHxW -> BxCxHxW
