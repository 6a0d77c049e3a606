"""ZIM's image encoder (ZIM paper, Sec. 3.3: ZIM keeps SAM's ViT image encoder).

``segment_anything``'s ``ImageEncoderViT`` with SAM's fixed settings (1024 input, 16-px patches,
windowed attention of side 14 with relative positions, a few global blocks, neck to the prompt width),
so the parameters are SAM's, key for key.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT

#: Side of SAM's windowed attention, in patches.
WINDOW_SIZE = 14
#: LayerNorm epsilon of SAM's ViT.
LAYER_NORM_EPS = 1e-6
#: MLP expansion of SAM's ViT.
MLP_RATIO = 4.0


def build_image_encoder(
    *,
    image_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    out_chans: int,
) -> ImageEncoderViT:
    """Build SAM's ViT image encoder.

    Args:
        image_size: side of the square padded input (1024).
        patch_size: ViT patch size (16): the embedding is ``image_size / patch_size`` on a side.
        embed_dim: ViT width (768 / 1024 / 1280 for vit_b / l / h).
        depth: ViT blocks.
        num_heads: attention heads.
        global_attn_indexes: blocks with global attention; the others use 14x14 windows.
        out_chans: channels of the output embedding (the prompt width, 256 in SAM).

    Returns:
        Module mapping a normalised Bx3xSxS image to the BxCx(S/16)x(S/16) embedding.
    """
    return ImageEncoderViT(
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
        window_size=WINDOW_SIZE,
        global_attn_indexes=tuple(global_attn_indexes),
    )
