"""ZIM: Zero-Shot Image Matting for Anything (ZIM paper, Sec. 3.3, "ZIM architecture").

SAM's image encoder and prompt encoder, plus a mask decoder with prompt-aware masked attention and a
hierarchical pixel decoder fed by a light convolutional feature pyramid of the input image. Both
changes over SAM are switches (``masked_attention``, ``pixel_decoder``), the paper's ablations; with
``masked_attention=False, pixel_decoder="sam"`` the network is SAM's (4 mask tokens, no mask prompt),
and a SAM checkpoint fills every parameter.

The split into :meth:`Zim.encode_preprocessed` and :meth:`Zim.decode` is the official ONNX layout:
the encoder gives ``image_embeddings`` and the pyramid ``(feat_D0, feat_D1, feat_D2)``; the decoder
takes them with ``attn_mask``, ``point_coords`` and ``point_labels``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from zim_lightning.models.attention_mask import attention_map_from_prompts, is_box_prompt
from zim_lightning.models.image_encoder import ImageEncoder
from zim_lightning.models.mask_decoder import MaskDecoder
from zim_lightning.models.pixel_decoder import DECODER_STRIDES, PYRAMID_STRIDES, ImageFeaturePyramid
from zim_lightning.models.prompt_encoding import PromptEncoding
from zim_lightning.models.transformer import KeyMask
from zim_lightning.prompt_labels import LABEL_ABSENT

#: SAM's normalisation of 0-255 RGB pixels.
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


class Zim(nn.Module):
    """The ZIM network.

    Args:
        image_size: side of the square padded input in pixels (1024).
        patch_size: ViT patch size: 16, the only one the decoders take; the embedding grid is
            ``image_size / patch_size`` (64).
        encoder_embed_dim: ViT width.
        encoder_depth: ViT blocks.
        encoder_num_heads: ViT attention heads.
        encoder_global_attn_indexes: ViT blocks with global attention.
        encoder_attention: ViT attention backend (:mod:`zim_lightning.models.vit_attention`; same
            weights and function, ``"eager"`` is segment-anything's code). The default folds the
            relative positions into q/k: nothing of size 4096x4096 is stored for the backward pass, and
            a tiny training step on CPU is about 2x faster than with ``"eager"`` or ``"sdpa"``.
        encoder_activation_checkpointing: recompute the ViT blocks' activations in the backward pass.
        prompt_embed_dim: width C of the image embedding, prompt tokens and decoder transformer (256).
        decoder_depth: two-way transformer blocks (2).
        decoder_num_heads: decoder attention heads (8).
        decoder_mlp_dim: decoder token MLP width (2048).
        iou_head_hidden_dim: IoU head width (256).
        pyramid_channels: widths of (feat_D0, feat_D1, feat_D2) at strides (2, 4, 8).
        decoder_channels: hierarchical pixel decoder stage widths at strides (8, 4, 2); the last must be
            ``prompt_embed_dim // 8``.
        masked_attention: prompt-aware masked token-to-image attention (paper ablation); False gives
            SAM's attention.
        pixel_decoder: ``"hierarchical"`` (ZIM, stride 2) or ``"sam"`` (stride 4; paper ablation).
        attention_sigma: Gaussian sigma of point attention maps, in cells (21).
        attention_stride: pixels per attention-map cell (16).
        float32_heads: under autocast (bf16), run the feature pyramid and the decoder in float32 and only
            the ViT encoder in the autocast dtype (see :func:`zim_lightning.speed.set_float32_heads`).
            The ViT holds nearly all the work; the bf16 rounding of the other two is what moves the
            alpha (docs/benchmarks.md).
    """

    def __init__(
        self,
        *,
        image_size: int = 1024,
        patch_size: int = 16,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 12,
        encoder_num_heads: int = 12,
        encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        encoder_attention: str = "sdpa_fold",
        encoder_activation_checkpointing: bool = False,
        prompt_embed_dim: int = 256,
        decoder_depth: int = 2,
        decoder_num_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        iou_head_hidden_dim: int = 256,
        pyramid_channels: tuple[int, int, int] = (16, 32, 64),
        decoder_channels: tuple[int, int, int] = (64, 32, 32),
        masked_attention: bool = True,
        pixel_decoder: str = "hierarchical",
        attention_sigma: int = 21,
        attention_stride: int = 16,
        float32_heads: bool = False,
    ) -> None:
        super().__init__()
        if pixel_decoder not in DECODER_STRIDES:
            raise ValueError(f"pixel_decoder must be one of {sorted(DECODER_STRIDES)}, got {pixel_decoder!r}")
        if patch_size != 16:
            # the pixel decoders (three x2 steps, or SAM's two) and the attention maps' stride assume it
            raise ValueError(f"patch_size must be 16 (SAM's ViT; the decoders assume it), got {patch_size}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.embedding_size = image_size // patch_size
        self.masked_attention = masked_attention
        self.pixel_decoder = pixel_decoder
        self.attention_sigma = attention_sigma
        self.attention_stride = attention_stride
        self.float32_heads = float32_heads
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

        self.image_encoder = ImageEncoder(
            image_size=image_size,
            patch_size=patch_size,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            out_chans=prompt_embed_dim,
            attention=encoder_attention,
            activation_checkpointing=encoder_activation_checkpointing,
        )
        self.feature_pyramid = (
            ImageFeaturePyramid(channels=tuple(pyramid_channels)) if pixel_decoder == "hierarchical" else None
        )
        self.prompt_encoder = PromptEncoding(
            embed_dim=prompt_embed_dim, image_embedding_size=self.embedding_size, input_image_size=image_size
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=prompt_embed_dim,
            transformer_depth=decoder_depth,
            transformer_num_heads=decoder_num_heads,
            transformer_mlp_dim=decoder_mlp_dim,
            iou_head_hidden_dim=iou_head_hidden_dim,
            pixel_decoder=pixel_decoder,
            feature_channels=tuple(pyramid_channels),
            stage_channels=tuple(decoder_channels),
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def output_stride(self) -> int:
        """Stride of the decoded logits relative to the padded input: 2 (hierarchical) or 4 (sam)."""
        return self.mask_decoder.output_stride

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise with SAM's mean/std and zero-pad bottom-right to the square input.

        Args:
            images: Bx3xHxW RGB in [0, 255] (uint8 or float), H, W <= ``image_size`` (already resized
                to the longest side ``image_size``).

        Returns:
            Bx3xSxS float, S = ``image_size``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Bx3xHxW RGB, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height > self.image_size or width > self.image_size:
            raise ValueError(
                f"images must be at most {self.image_size} on a side (resize the longest side to "
                f"{self.image_size} first), got {height}x{width}"
            )
        x = (images.float() - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.image_size - width, 0, self.image_size - height))

    def encode_preprocessed(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """What the official ``encoder.onnx`` computes.

        Args:
            x: Bx3xSxS normalised, padded image (see :meth:`preprocess`).

        Returns:
            ``image_embeddings`` BxCx(S/16)x(S/16) and ``(feat_D0, feat_D1, feat_D2)`` at strides
            (2, 4, 8). With the ``sam`` pixel decoder the features are unused and returned with zero
            channels (Bx0x(S/2)x(S/2), ...), which keeps the decoder's seven-input signature.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"encode_preprocessed takes Bx3x{self.image_size}x{self.image_size} normalised, padded "
                f"images (see preprocess, or call encode_image), got shape {tuple(x.shape)}"
            )
        embedding = self.image_encoder(x)
        if self.feature_pyramid is not None:
            with self._heads_precision(x):
                feats = self.feature_pyramid(x)
        else:
            side = x.shape[-1]
            feats = tuple(x.new_zeros(x.shape[0], 0, side // s, side // s) for s in PYRAMID_STRIDES)
        return embedding, feats

    def _heads_in_float32(self, reference: torch.Tensor) -> bool:
        """Whether the feature pyramid and the decoder leave the autocast now (``float32_heads``)."""
        return self.float32_heads and torch.is_autocast_enabled(reference.device.type)

    def _heads_precision(self, reference: torch.Tensor) -> contextlib.AbstractContextManager:
        """Autocast off for the feature pyramid and the decoder when ``float32_heads`` asks for it."""
        if self._heads_in_float32(reference):
            return torch.autocast(device_type=reference.device.type, enabled=False)
        return contextlib.nullcontext()

    def encode_image(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:meth:`preprocess` then :meth:`encode_preprocessed`.

        Args:
            images: Bx3xHxW RGB in [0, 255], H, W <= ``image_size``.

        Returns:
            See :meth:`encode_preprocessed`.
        """
        return self.encode_preprocessed(self.preprocess(images))

    def decode(
        self,
        image_embeddings: torch.Tensor,
        feats: tuple[torch.Tensor, ...],
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the official ``decoder.onnx`` computes.

        A sample whose labels contain 2 or 3 is a box sample (additive masked attention); others are
        point samples (multiplicative). An embedding of batch 1 serves B prompt sets.

        Args:
            image_embeddings: BxCx64x64 or 1xCx64x64.
            feats: (feat_D0, feat_D1, feat_D2), batch B or 1.
            point_coords: BxNx2 float, ``(X, Y)`` pixels in the 1024 frame.
            point_labels: BxN float: -1 padding, 0 negative, 1 positive, 2 / 3 box corners; also -2, an
                absent point that changes nothing (training batches fill prompts to one length with it).
            attn_mask: Bx64x64 float in [0, 1] (see :mod:`zim_lightning.models.attention_mask`), or None
                to build it from the prompts. Ignored when ``masked_attention`` is off.
            multimask_output: False returns mask 0, True all 4 (as the official predictor).

        Returns:
            (logits BxKx(1024/s)x(1024/s), iou BxK): K = 1 or 4, s = :attr:`output_stride`.
        """
        if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
            raise ValueError(f"point_coords must be BxNx2, got shape {tuple(point_coords.shape)}")
        if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise ValueError(
                f"point_labels must be BxN = {tuple(point_coords.shape[:2])}, got {tuple(point_labels.shape)}"
            )
        if point_coords.shape[1] == 0:
            raise ValueError(
                "decode needs at least one prompt point (N >= 1): a box's two corners, or points"
            )
        batch = point_coords.shape[0]
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"image_embeddings must have batch 1 or {batch} (the prompt sets), got {image_embeddings.shape[0]}"
            )
        if not self._heads_in_float32(image_embeddings):
            return self._decode(
                image_embeddings, feats, point_coords, point_labels, attn_mask, multimask_output
            )
        with self._heads_precision(image_embeddings):  # a bf16 encoder's outputs, decoded in float32
            feats = tuple(f.float() for f in feats)
            return self._decode(
                image_embeddings.float(), feats, point_coords, point_labels, attn_mask, multimask_output
            )

    def _decode(
        self,
        image_embeddings: torch.Tensor,
        feats: tuple[torch.Tensor, ...],
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        attn_mask: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = point_coords.shape[0]
        key_mask = None
        if self.masked_attention:
            side = image_embeddings.shape[-1]
            if attn_mask is None:
                attn_mask = attention_map_from_prompts(
                    point_coords,
                    point_labels,
                    size=side,
                    stride=self.attention_stride,
                    sigma=self.attention_sigma,
                )
            elif tuple(attn_mask.shape) != (batch, *image_embeddings.shape[-2:]):
                raise ValueError(
                    f"attn_mask must be Bx{side}x{side} = {(batch, side, side)}, got {tuple(attn_mask.shape)}"
                )
            key_mask = KeyMask.from_attention_map(attn_mask, is_box_prompt(point_labels))
        tokens = self.prompt_encoder(point_coords, point_labels)
        logits, iou = self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            self.prompt_encoder.dense_embedding(),
            tokens,
            feats,
            key_mask,
            prompt_present=point_labels != LABEL_ABSENT,
        )
        if not multimask_output:
            logits, iou = logits[:, :1], iou[:, :1]
        return logits, iou

    def forward(
        self,
        images: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        multimask_output: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Encode images and decode one prompt set per image.

        Args:
            images: Bx3xHxW RGB in [0, 255], H, W <= 1024 (resized, as in SAM).
            point_coords: BxNx2 ``(X, Y)`` pixels in the 1024 frame.
            point_labels: BxN labels (-1, 0, 1, 2, 3).
            multimask_output: False: mask 0 only; True: all 4.

        Returns:
            ``logits`` BxKx(1024/s)x(1024/s) (sigmoid gives alpha) and ``iou`` BxK.
        """
        embedding, feats = self.encode_image(images)
        logits, iou = self.decode(
            embedding, feats, point_coords, point_labels, multimask_output=multimask_output
        )
        return {"logits": logits, "iou": iou}

    def postprocess_masks(
        self, logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Bring decoder logits to the original image, as the official predictor does.

        Bilinear to ``image_size``, crop the resized image (``input_size``), bilinear to the original.

        Args:
            logits: BxKxhxw decoder logits.
            input_size: (H, W) of the resized image before padding.
            original_size: (H, W) of the original image.

        Returns:
            BxKxHxW logits at the original size.
        """
        full = F.interpolate(logits, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        full = full[..., : input_size[0], : input_size[1]]
        return F.interpolate(full, tuple(original_size), mode="bilinear", align_corners=False)
