"""Training the label converter: image + coarse mask -> alpha matte (ZIM paper, Sec. 3.1).

The converter is trained on matting data whose coarse segmentation inputs the data side derives from the
matte (thresholding, downscaling, blurring, dilation, erosion, convex hull), with SGA cut-outs and STL
samples (coarse masks whose target is the mask itself) mixed in by the datamodule. This module only sees
the resulting batches (``image``, ``mask``, ``alpha``, ``is_stl``) and applies the MGMatting-style loss
of :class:`~zim_lightning.losses.ConverterLoss` (L1 + 10 * gradient on each output stride).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from zim_lightning.data.samples import unpack_batch
from zim_lightning.lit.matting_module import MattingModule, frame_errors
from zim_lightning.losses import PAPER_GRAD_WEIGHT, ConverterLoss


class ConverterModule(MattingModule):
    """LightningModule of the label converter.

    Batches (``stage="converter"``): ``image`` uint8 Bx3xSxS RGB, ``mask`` Bx1xSxS (the coarse input) and
    ``alpha`` Bx1xSxS (the target), each uint8 in [0, 255] as collated or float in [0, 1] (uint8 labels
    are scaled on the device, :func:`~zim_lightning.data.samples.unpack_batch`), ``is_stl`` bool B,
    ``key`` list[str].

    Logs ``train/{loss,l1,grad}``, ``val/{loss,l1,grad,sad,mse,mae}`` of the refined alpha, and
    ``val/sad_input``: the SAD of the coarse input taken as the matte (the identity baseline the converter
    has to beat), plus ``train/stl_fraction`` (share of STL samples in the batches).

    Args:
        net: a built converter (``zim_lightning.models.converter.build_converter_*``) mapping (images
            Bx3xSxS [0, 255], masks Bx1xSxS [0, 1]) to a dict with ``alpha``, ``alpha_os1``,
            ``alpha_os4``, ``alpha_os8`` (Bx1xSxS in [0, 1]).
        optimizer: optimiser factory (paper: AdamW, lr 1e-3).
        scheduler: per-step learning-rate schedule factory (paper: cosine), or None.
        grad_weight: lambda of the gradient term (paper: 10).
        weight_os1: loss weight of the stride-1 output.
        weight_os4: loss weight of the stride-4 output.
        weight_os8: loss weight of the stride-8 output.
        band_weighted_loss: MGMatting's supervision, the stride-4 and stride-1 losses inside their
            refinement bands only (:class:`~zim_lightning.losses.ConverterLoss`); False: every pixel.
        decay_exempt: no weight decay on biases, norms, position embeddings and embeddings
            (:func:`~zim_lightning.lit.optimization.parameter_groups`); False: one group, all decayed.
        require_pretrained: refuse to fit a converter built from random weights (no ``checkpoint`` or
            ``backbone_checkpoint``) unless resuming (:class:`~zim_lightning.lit.matting_module.MattingModule`).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        grad_weight: float = PAPER_GRAD_WEIGHT,
        weight_os1: float = 2.0,
        weight_os4: float = 1.0,
        weight_os8: float = 1.0,
        band_weighted_loss: bool = False,
        decay_exempt: bool = True,
        require_pretrained: bool = False,
    ) -> None:
        super().__init__(
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            extra_val_metrics=("sad_input",),
            decay_exempt=decay_exempt,
            require_pretrained=require_pretrained,
        )
        # Only plain values go into the checkpoint's hyper-parameters: the network and the factories are
        # described by the saved config, and a checkpoint must stay loadable with weights_only=True.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.loss = ConverterLoss(
            grad_weight=grad_weight,
            weight_os1=weight_os1,
            weight_os4=weight_os4,
            weight_os8=weight_os8,
            band_weighted=band_weighted_loss,
        )

    def forward(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """Run the converter: images Bx3xSxS [0, 255], masks Bx1xSxS [0, 1] -> dict of Bx1xSxS alphas."""
        return self.net(images, masks)

    def _step(self, batch: dict, *, per_sample: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Outputs and loss terms; ``per_sample`` (evaluation): B-vectors of each sample's own terms, so
        that epoch means do not depend on how samples batch (they would with ``band_weighted_loss``)."""
        batch = unpack_batch(batch)  # uint8 labels -> float in [0, 1] (on the device)
        outputs = self(batch["image"], batch["mask"])
        return outputs, self.loss(outputs, batch["alpha"], per_sample=per_sample)

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        outputs, terms = self._step(batch)
        if not self.loss_is_finite(terms["loss"]):
            return self.skipped_step()  # no update (see MattingModule.loss_is_finite)
        size = batch["image"].shape[0]
        self._log_train_step(terms, batch_size=size)
        if "is_stl" in batch:
            stl = torch.as_tensor(batch["is_stl"], dtype=torch.float32).mean()
            self.log("train/stl_fraction", stl, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return {"loss": terms["loss"], "alpha": outputs["alpha"].detach()}

    def _evaluate(self, batch: dict, metrics: MetricCollection) -> dict[str, Tensor]:
        batch = unpack_batch(batch)
        outputs, terms = self._step(batch, per_sample=True)
        values = {**terms, **frame_errors(outputs["alpha"], batch["alpha"])}
        values["sad_input"] = frame_errors(batch["mask"], batch["alpha"])["sad"]
        self._accumulate_eval(metrics, values, batch_size=batch["image"].shape[0])
        return {"loss": terms["loss"].mean(), "alpha": outputs["alpha"].detach()}

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, self.test_metrics)
