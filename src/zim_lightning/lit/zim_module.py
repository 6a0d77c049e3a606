"""Training ZIM on SA1B-Matte: fine-tune a pretrained SAM into a promptable matting model (ZIM paper,
Sec. 3.2-3.3 and 4.1).

Each batch holds images in SAM's 1024 frame with one prompt set per image (a jittered box or random
positive / negative points, built by the data side from the matte). The decoder's logits (stride 2 with
the hierarchical pixel decoder, 4 with SAM's) are upsampled bilinearly to the frame, as the official
predictor does, and the paper's loss L1 + 10 * Lgrad is taken on their sigmoid against the matte inside
the valid (non-padding) region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from zim_lightning import speed
from zim_lightning.data.samples import unpack_batch
from zim_lightning.lit.matting_module import MattingModule, frame_errors
from zim_lightning.losses import PAPER_GRAD_WEIGHT, MattingLoss


class ZimModule(MattingModule):
    """LightningModule of ZIM.

    Batches (``stage="zim"``): ``image`` uint8 Bx3x1024x1024 (resized, zero-padded), ``alpha`` float
    Bx1x1024x1024 in [0, 1], ``valid`` float Bx1x1024x1024 (1 inside the resized image), ``point_coords``
    BxNx2 ``(X, Y)`` pixels in the 1024 frame, ``point_labels`` BxN (1 / 0 points, 2 / 3 box corners,
    -1 padding), ``original_size`` and ``input_size`` Bx2, ``key`` list[str]. The datamodule's batches
    carry ``alpha`` as uint8 and no ``valid``; both are made where the batch is, on the GPU
    (:func:`~zim_lightning.data.samples.unpack_batch`: the datamodule's ``on_after_batch_transfer``,
    so callbacks see them too, and the steps, for batches given directly), so a third of the bytes cross
    the bus.

    Logs ``train/{loss,l1,grad}`` and ``val/{loss,l1,grad,sad,mse,mae}`` (errors inside the valid region
    of the 1024 frame).

    Args:
        net: a built ZIM (``zim_lightning.models.build.build_zim``); fine-tuning starts from SAM when the
            builder is given ``sam_checkpoint``. Its ``preprocess``, ``encode_preprocessed`` and
            ``decode`` are called (the padding of each image zeroed after normalisation, as at inference).
        optimizer: optimiser factory (paper: AdamW, lr 1e-5, which the configs set; the default is plain
            AdamW at its own lr 1e-3, too high to fine-tune SAM).
        scheduler: per-step learning-rate schedule factory (paper: cosine), or None.
        grad_weight: lambda of the gradient term (paper: 10).
        bce_weight: weight of binary cross-entropy on the upsampled logits, added to the loss (paper: 0).
            Training from random weights needs it: without it the sigmoid saturates and the network
            settles on an empty matte (``zim_lightning.losses``).
        freeze_image_encoder: keep the ViT image encoder fixed (no gradients, no optimiser state) and
            train the rest: a cheap fine-tuning mode, not the paper's recipe.
        decay_exempt: no weight decay on biases, norms, position embeddings and tables, and embeddings
            (:func:`~zim_lightning.lit.optimization.parameter_groups`); False: one group, all decayed.
        multimask: train all four mask tokens, SAM-style (not in the paper, whose loss takes the first
            output only): token 0 on every prompt, as before, plus, for a single click (ambiguous), the
            smallest loss over tokens 1-3. ``matte-all`` and ``multimask_output=True`` read all four;
            ``multimask_output=False`` (``matte``, the metrics logged here) reads token 0.
        iou_weight: weight of the IoU head's loss (not in the paper; SAM: 1): the mean squared error of
            the four predicted IoUs against each output's actual IoU with the matte (both thresholded at
            0.5, in the valid region). ``matte-all`` ranks and filters its mattes by these predictions.
        require_pretrained: refuse to fit a ZIM built from random weights (no ``sam_checkpoint`` or
            ``checkpoint``) unless resuming (:class:`~zim_lightning.lit.matting_module.MattingModule`).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        grad_weight: float = PAPER_GRAD_WEIGHT,
        bce_weight: float = 0.0,
        freeze_image_encoder: bool = False,
        compile: str | None = None,
        compile_backend: str = "inductor",
        channels_last: bool = False,
        decay_exempt: bool = True,
        multimask: bool = False,
        iou_weight: float = 0.0,
        require_pretrained: bool = False,
    ) -> None:
        """See the class docstring; speed switches (zim_lightning.speed, equivalent outputs):

        Args:
            compile: ``torch.compile`` mode for the encoder, prompt encoder and decoder parts
                ("default", "max-autotune", ...), or None for eager.
            compile_backend: ``torch.compile`` backend ("inductor"; "aot_eager" checks that the network
                compiles without generating code).
            channels_last: store the convolution weights NHWC (faster convolutions on GPUs).
        """
        super().__init__(
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            decay_exempt=decay_exempt,
            require_pretrained=require_pretrained,
        )
        # Plain values only: the checkpoint must stay loadable with weights_only=True.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        if iou_weight < 0:
            raise ValueError(f"iou_weight must be >= 0, got {iou_weight}")
        self.loss = MattingLoss(grad_weight=grad_weight, bce_weight=bce_weight)
        if freeze_image_encoder:
            encoder = getattr(net, "image_encoder", None)
            if not isinstance(encoder, nn.Module):
                raise ValueError(
                    f"freeze_image_encoder=True needs a network with an `image_encoder` module; "
                    f"{type(net).__name__} has none"
                )
            encoder.requires_grad_(False)

    def configure_model(self) -> None:
        # Applied in place, so parameter names (and checkpoints) stay those of the plain network; once,
        # although Lightning calls this hook at every fit / validate / test.
        if getattr(self, "_speed_applied", False):
            return
        self._speed_applied = True
        if self.hparams.channels_last:
            speed.to_channels_last(self.net)
        if self.hparams.compile is not None:
            speed.compile_model(self.net, mode=self.hparams.compile, backend=self.hparams.compile_backend)

    def forward(
        self, images: Tensor, point_coords: Tensor, point_labels: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """Predict alpha in the input frame.

        Args:
            images: Bx3xSxS RGB in [0, 255] (S = 1024, the SAM frame), each image resized into the
                top-left corner and padded bottom-right.
            point_coords: BxNx2 ``(X, Y)`` pixels in the frame.
            point_labels: BxN prompt labels (SAM's ONNX convention).
            valid: Bx1xSxS, 1 on each image and 0 on its padding (the batches' ``valid``), or None when
                no image is padded.

        Returns:
            Bx1xSxS alpha in [0, 1] (float32).
        """
        return torch.sigmoid(self.frame_logits(images, point_coords, point_labels, valid))

    def frame_logits(
        self, images: Tensor, point_coords: Tensor, point_labels: Tensor, valid: Tensor | None = None
    ) -> Tensor:
        """The decoder's first logits, upsampled to the input frame (float32 Bx1xSxS); see :meth:`forward`."""
        return self._frame_outputs(images, point_coords, point_labels, valid, multimask=False)[0]

    def _frame_outputs(
        self,
        images: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        valid: Tensor | None,
        *,
        multimask: bool,
    ) -> tuple[Tensor, Tensor]:
        """Logits of the first (or all four) outputs upsampled to the frame (float32 BxKxSxS), and IoU BxK."""
        net = self.net
        frame = getattr(net, "image_size", images.shape[-1])
        if tuple(images.shape[-2:]) != (frame, frame):
            raise ValueError(
                f"ZIM batches must be in the network's {frame}x{frame} frame, got images of "
                f"{tuple(images.shape[-2:])}; set the datamodule's image_size to the network's image_size"
            )
        # As SAM and the predictor: normalise, then pad with zeros. The batches are padded before (with
        # black, which normalises to about -2), so their padding is set to 0 here.
        x = net.preprocess(images)
        if valid is not None:
            x = x * valid.to(x.dtype)
        embedding, feats = net.encode_preprocessed(x)
        logits, iou = net.decode(embedding, feats, point_coords, point_labels, multimask_output=multimask)
        # upsample logits, not alpha, as the official predictor does: sigmoid after interpolation keeps
        # edges sharp; float32 because the loss compares small differences
        logits = F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits, iou

    def _step(self, batch: dict, *, per_sample: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Alpha (token 0) and loss terms; ``per_sample`` (evaluation): B-vectors of each image's own
        terms, so that epoch means do not depend on how images of different valid areas batch."""
        batch = unpack_batch(batch)  # uint8 alpha -> float, valid from input_size (on the device)
        labels, target, valid = batch["point_labels"].float(), batch["alpha"].float(), batch.get("valid")
        all_tokens = self.hparams.multimask or self.hparams.iou_weight > 0
        logits, iou = self._frame_outputs(
            batch["image"], batch["point_coords"].float(), labels, valid, multimask=all_tokens
        )
        alphas = torch.sigmoid(logits)  # BxKxSxS, K = 4 with all_tokens, else 1
        # token 0: the paper's loss (pooled over the batch's valid pixels)
        values = self.loss(alphas[:, :1], target, valid, logits=logits[:, :1], per_sample=per_sample)
        if self.hparams.multimask:
            ambiguous_loss = self._ambiguous_click_loss(alphas, logits, target, valid, labels)
            values["loss"] = values["loss"] + (ambiguous_loss if per_sample else ambiguous_loss.mean())
        if self.hparams.iou_weight > 0:
            iou_loss = F.mse_loss(iou.float(), _mask_iou(alphas, target, valid), reduction="none").mean(dim=1)
            values["loss"] = values["loss"] + self.hparams.iou_weight * (
                iou_loss if per_sample else iou_loss.mean()
            )
        return alphas[:, :1], values

    def _ambiguous_click_loss(
        self, alphas: Tensor, logits: Tensor, target: Tensor, valid: Tensor | None, labels: Tensor
    ) -> Tensor:
        """B: the smallest loss over tokens 1-3 for a single-click prompt (SAM's ambiguity), else 0."""
        clicks = ((labels == 0) | (labels == 1)).sum(dim=1)
        ambiguous = (clicks == 1) & ~((labels == 2) | (labels == 3)).any(dim=1)
        per_token = [
            self.loss(alphas[:, k : k + 1], target, valid, logits=logits[:, k : k + 1], per_sample=True)
            for k in range(1, alphas.shape[1])
        ]
        alternatives = torch.stack([terms["loss"] for terms in per_token], dim=1)  # Bx3, each sample's own
        return alternatives.amin(dim=1) * ambiguous

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        alpha, terms = self._step(batch)
        if not self.loss_is_finite(terms["loss"]):
            return self.skipped_step()  # no update (see MattingModule.loss_is_finite)
        self._log_train_step(terms, batch_size=batch["image"].shape[0])
        return {"loss": terms["loss"], "alpha": alpha.detach()}

    def _evaluate(self, batch: dict, metrics: MetricCollection) -> dict[str, Tensor]:
        batch = unpack_batch(batch)
        alpha, terms = self._step(batch, per_sample=True)
        values = {**terms, **frame_errors(alpha, batch["alpha"].float(), batch.get("valid"))}
        self._accumulate_eval(metrics, values, batch_size=batch["image"].shape[0])
        return {"loss": terms["loss"].mean(), "alpha": alpha.detach()}

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.test_metrics)


@torch.no_grad()
def _mask_iou(alphas: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
    """BxK IoU of each output with the matte, both thresholded at 0.5, inside ``valid`` (1 when both empty)."""
    predicted, truth = alphas > 0.5, (target > 0.5).expand_as(alphas)
    both, either = predicted & truth, predicted | truth
    if valid is not None:
        inside = (valid > 0).expand_as(alphas)
        both, either = both & inside, either & inside
    intersection = both.flatten(2).sum(-1).float()
    union = either.flatten(2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.ones_like(union))
