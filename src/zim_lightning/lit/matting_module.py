"""What the converter and ZIM training modules share: the injected network, optimiser and scheduler,
the loss, and per-stage metric objects (ZIM paper, Sec. 3.1 and 3.3 use the same loss for both).

Validation errors here are measured in the training frame (the square crop, or SAM's 1024 frame inside
the valid region), scaled as the paper scales them (SAD / 1000, MSE and MAE x 1000), per sample and then
averaged. They track training; the paper's protocol (original resolution, MicroMat-3K prompts) is
``zim-lightning eval``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric, MetricCollection

from zim_lightning.lit.optimization import configure_optimization, parameter_groups
from zim_lightning.lit.preemption import expect_worker_deaths_after_sigterm
from zim_lightning.models.checkpoint import NET_SPEC_KEY, random_start_of

log = logging.getLogger(__name__)

#: Training steps in a row whose loss is not finite that are skipped before the run stops.
MAX_NONFINITE_STEPS = 10

#: Loss terms logged for every stage (``<stage>/<name>``).
LOSS_TERMS: tuple[str, ...] = ("loss", "l1", "grad")
#: Frame errors logged in validation and test.
FRAME_ERRORS: tuple[str, ...] = ("sad", "mse", "mae")


def frame_errors(alpha: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample matting errors in the training frame, scaled as in the paper's tables.

    Args:
        alpha: predicted alpha, Bx1xHxW in [0, 1].
        target: ground-truth alpha, Bx1xHxW in [0, 1].
        valid: optional Bx1xHxW weight in [0, 1] (0 on padding); None counts every pixel.

    Returns:
        dict of B-vectors: ``sad`` = sum |a - t| / 1000, ``mse`` = mean (a - t)^2 * 1000 and
        ``mae`` = mean |a - t| * 1000, sums and means over the valid pixels.
    """
    diff = (alpha.float() - target.float()).flatten(1)  # BxHW
    weight = torch.ones_like(diff) if valid is None else valid.float().flatten(1)
    count = weight.sum(dim=1).clamp_min(1e-6)  # a weighted mean for fractional weights; 0 for none
    abs_sum = (diff.abs() * weight).sum(dim=1)
    return {
        "sad": abs_sum / 1000.0,
        "mse": (diff.square() * weight).sum(dim=1) / count * 1000.0,
        "mae": abs_sum / count * 1000.0,
    }


def _means(names: Iterable[str], prefix: str) -> MetricCollection:
    # nan_strategy="disable": MeanMetric's default NaN check reads every update back to the host (the
    # host then waits for the GPU, every step); a NaN here is kept, so the epoch's value shows it.
    return MetricCollection({name: MeanMetric(nan_strategy="disable") for name in names}, prefix=prefix)


class MattingModule(LightningModule):
    """Base of the training modules: holds ``net`` and builds the optimiser from injected callables.

    Subclasses implement ``training_step``, ``validation_step`` and ``test_step``; they return
    ``{"loss": ..., "alpha": Bx1xHxW}`` (alpha detached, in the batch's frame) so that callbacks such as
    :class:`~zim_lightning.lit.callbacks.MatteGridLogger` can draw it without running the network again.

    Args:
        net: the built network (the attribute name ``net`` is the checkpoint key prefix that
            :func:`zim_lightning.models.checkpoint.read_state_dict` strips).
        optimizer: ``OptimizerCallable``: parameters -> optimiser (AdamW in the configs).
        scheduler: ``LRSchedulerCallable`` stepped per optimiser step, or None for a constant rate.
        extra_val_metrics: names of further per-sample values the subclass logs in validation and test.
        decay_exempt: no weight decay on biases, norms, position embeddings and tables, and embeddings
            (:func:`~zim_lightning.lit.optimization.parameter_groups`); False decays every parameter
            (one parameter group, as runs before this switch saved their optimiser state).
        require_pretrained: refuse to fit a network its builder started from random weights (the paper
            configs set it: their recipes start from SAM or SAM 2 weights, and a 500k-step run from
            random weights would be wasted), unless the fit resumes a checkpoint (``--ckpt_path``).
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: Callable[[Iterable[nn.Parameter]], Optimizer],
        scheduler: Callable[[Optimizer], LRScheduler] | None,
        extra_val_metrics: tuple[str, ...] = (),
        decay_exempt: bool = True,
        require_pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.decay_exempt = decay_exempt
        self.require_pretrained = require_pretrained
        self._nonfinite_in_a_row = 0
        self._skip_optimizer_step = False
        #: The network's config (class_path, init_args), set by ``zim-lightning fit`` and stored in every
        #: checkpoint, weights-only ones included, so the checkpoint alone rebuilds the network.
        self.net_spec: dict | None = None
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a built torch.nn.Module, got {type(net).__name__}")
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # One metric object per stage, so a validation in the middle of training leaves the running
        # training means alone.
        self.train_metrics = _means(LOSS_TERMS, "train/")
        eval_names = LOSS_TERMS + FRAME_ERRORS + tuple(extra_val_metrics)
        self.val_metrics = _means(eval_names, "val/")
        self.test_metrics = _means(eval_names, "test/")

    def loss_is_finite(self, loss: Tensor) -> bool:
        """Whether to take this training step: False when the loss is not finite on some rank (every rank
        decides alike). A NaN step would otherwise turn every weight and the optimiser state into NaN, and
        the checkpoints after it. A skipped step returns :meth:`skipped_step` and updates no weight and no
        optimiser state, but still counts as one of the run's steps (``max_steps``, the learning-rate
        schedule).

        Raises:
            FloatingPointError: after :data:`MAX_NONFINITE_STEPS` such steps in a row.
        """
        # Ranks whose loss is finite, summed on the device: the host reads one value back (Lightning's
        # reduce_boolean_decision would read the flag, copy it back to the device and read the sum).
        finite = torch.isfinite(loss.detach()).all().to(torch.int32)
        ranks = self.trainer.strategy.reduce(finite, reduce_op="sum")
        self._skip_optimizer_step = int(ranks) != self.trainer.world_size
        if not self._skip_optimizer_step:
            self._nonfinite_in_a_row = 0
            return True
        self._nonfinite_in_a_row += 1
        if self._nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
            raise FloatingPointError(
                f"the training loss was not finite for {self._nonfinite_in_a_row} steps in a row (at global "
                f"step {self.trainer.global_step}); the checkpoints before it are intact. Lower the "
                "learning rate, or train in float32 (--trainer.precision=32-true) to find the cause"
            )
        log.warning(
            "global step %d: the training loss is not finite; skipping this batch (%d in a row)",
            self.trainer.global_step,
            self._nonfinite_in_a_row,
        )
        return False

    def skipped_step(self) -> dict[str, Tensor]:
        """The output of a training step that :meth:`loss_is_finite` skips: a zero loss that reaches every
        trainable parameter. Under DDP every rank must run a backward that reaches every parameter (and
        Lightning refuses a step that returns None); :meth:`optimizer_step` then drops the zero gradients,
        so neither the weights nor the optimiser's moments and step counts move (AdamW would otherwise
        still decay the weights and apply its momentum)."""
        trainable = [p.sum() for p in self.parameters() if p.requires_grad]
        return {"loss": torch.stack(trainable).sum() * 0.0}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure():
            result = optimizer_closure()  # the training step and its backward
            if self._skip_optimizer_step:
                optimizer.zero_grad(set_to_none=True)  # optimisers pass over parameters without gradients
                return None  # and Lightning's precision plugins then skip the step (and the loss scaler)
            return result

        return super().optimizer_step(epoch, batch_idx, optimizer, closure)

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        batch_norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())
        if isinstance(strategy, DDPStrategy) and not batch_norms:
            # DDP broadcasts rank 0's buffers at every forward. Ours are constants (pixel mean and std;
            # LayerNorm and GroupNorm, no BatchNorm), and the broadcast hangs validation when a rank has
            # no validation batch (fewer validation shards than ranks): rank 0 waits in the broadcast
            # while the other waits in the metrics' sync. configs/trainer/ddp.yaml sets this already.
            strategy._ddp_kwargs["broadcast_buffers"] = False  # read when the model is wrapped, after setup

    # Once Lightning has taken SIGTERM over (after on_fit_start), before the loop draws a batch: a SIGTERM
    # sent to the whole process group, workers included, then stops the run as one to the main process.
    def on_train_start(self) -> None:
        expect_worker_deaths_after_sigterm()

    def on_validation_start(self) -> None:
        expect_worker_deaths_after_sigterm()

    def on_test_start(self) -> None:
        expect_worker_deaths_after_sigterm()

    def random_start_problem(self, *, resuming: bool) -> str | None:
        """Why this fit must not start (``require_pretrained`` and a network built from random weights,
        unless the run resumes from a checkpoint), with the remedy; or None."""
        remedy = random_start_of(self.net)
        if not self.require_pretrained or not remedy or resuming:
            return None
        return (
            f"{type(self.net).__name__} starts from random weights, and this config "
            f"(require_pretrained: true) trains from pretrained ones: {remedy}. "
            "To train from random weights anyway, set --model.init_args.require_pretrained=false"
        )

    def on_fit_start(self) -> None:
        trainer = self.trainer
        clip = trainer.gradient_clip_val
        fused = any(o.defaults.get("fused") for o in trainer.optimizers)
        if clip and fused and str(trainer.precision) in ("16-mixed", "bf16-mixed"):
            # Lightning's mixed-precision plugin refuses to clip a fused optimiser, but only at the first
            # optimiser step, after compiling
            raise ValueError(
                f"gradient_clip_val={clip} with a fused optimiser under {trainer.precision} precision: "
                "Lightning cannot clip it. Set --model.init_args.optimizer.init_args.fused=false, or drop "
                "gradient_clip_val"
            )
        problem = self.random_start_problem(resuming=bool(trainer.ckpt_path))
        if problem is not None:
            raise ValueError(problem)
        per_device = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if isinstance(per_device, int):
            # The configs' batch size is per device: the paper's 16 is the total on one GPU only.
            total = per_device * trainer.world_size * trainer.accumulate_grad_batches
            log.info(
                "batch per optimiser step: %d (%d per device x %d devices x %d accumulated)",
                total,
                per_device,
                trainer.world_size,
                trainer.accumulate_grad_batches,
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.net_spec is not None:
            checkpoint[NET_SPEC_KEY] = self.net_spec

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # An optimiser state of one parameter group was saved before the weight-decay groups existed:
        # resume it as it was, rather than fail in the optimiser's load_state_dict.
        states = checkpoint.get("optimizer_states") or []
        if self.decay_exempt and states and len(states[0].get("param_groups", ())) == 1:
            warnings.warn(
                "the checkpoint's optimiser state has one parameter group (saved before decay_exempt "
                "existed): resuming with decay_exempt=False, every parameter decayed as before",
                stacklevel=2,
            )
            self.decay_exempt = False

    def configure_optimizers(self) -> dict:
        return configure_optimization(
            parameter_groups(self, exempt=self.decay_exempt),
            self.optimizer_factory,
            self.scheduler_factory,
            # max_steps when set, else epochs x batches: the cosine ends with the run
            total_steps=self.trainer.estimated_stepping_batches if self._trainer is not None else None,
        )

    def _log_train_step(self, values: dict[str, Tensor], *, batch_size: int) -> None:
        """Log a training step's scalars: Lightning logs the batch value per step and the running mean
        per epoch."""
        metrics = self.train_metrics
        for name, value in values.items():
            metric = metrics[name]
            # forward, not update: Lightning logs the batch value on steps and the running mean on epochs
            metric(value.detach().float())
            self.log(
                f"{metrics.prefix}{name}",
                metric,
                on_step=True,
                on_epoch=True,
                # not prog_bar: Lightning would read it back from the device at every step (the configs'
                # lit.callbacks.ProgressBar shows it, read once a second)
                batch_size=batch_size,
                # metrics sync their own states across ranks
                sync_dist=False,
            )

    def _accumulate_eval(
        self, metrics: MetricCollection, values: dict[str, Tensor], *, batch_size: int
    ) -> None:
        """Accumulate a validation or test batch's scalars or per-sample vectors, logged at the epoch end
        (:meth:`_log_epoch`): a rank can see no evaluation batch at all (fewer validation shards than
        ranks), and a metric that only some ranks logged would leave the others waiting in its
        synchronisation.
        """
        for name, value in values.items():
            # A scalar is pooled over its batch: it counts once per sample of the batch, so that the
            # epoch's value does not depend on how the partial batches fell (per-sample vectors count
            # each sample once). (Not MeanMetric's weight: with nan_strategy="disable" it ignores it.)
            value = value.detach().float()
            metrics[name].update(value.expand(batch_size) if value.ndim == 0 else value)

    def _log_epoch(self, metrics: MetricCollection) -> None:
        """Compute (synchronised over every rank, each one taking part) and log an evaluation epoch."""
        for name in metrics.keys(keep_base=True):
            metric = metrics[name]
            # a rank without batches still joins the synchronisation; its empty state weighs nothing
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before the ..update.*")
                value = metric.compute()
            if name == "loss" and torch.isnan(value):
                rank_zero_warn(
                    f"{metrics.prefix}loss is NaN: this {metrics.prefix.rstrip('/')} epoch scored no sample on "
                    "any rank (empty or unreadable shards, or every sample skipped: see the skip counts), "
                    "or the network's outputs were NaN"
                )
            self.log(f"{metrics.prefix}{name}", value, prog_bar=name == "loss", sync_dist=False)
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)
