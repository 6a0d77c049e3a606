"""The optimisation recipe of the paper: AdamW with a cosine learning-rate schedule (ZIM paper, Sec. 4.1).

The paper trains the converter (lr 1e-3) and ZIM (lr 1e-5) with AdamW and a cosine schedule for 500k
iterations. :class:`WarmupCosineLR` adds a linear warm-up, which keeps the first steps of fine-tuning
from wrecking a pretrained SAM, and is stepped once per optimiser step (not per epoch: streaming
datasets have no natural epoch).

The LightningModules receive the optimiser and the scheduler as callables (LightningCLI's
``OptimizerCallable`` / ``LRSchedulerCallable``), so YAML picks them with ``class_path``/``init_args``;
:func:`configure_optimization` is the one place both modules turn them into Lightning's dictionary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

log = logging.getLogger(__name__)

#: Attributes that define the schedule's shape (as opposed to its progress).
_SCHEDULE_FIELDS = ("total_steps", "warmup_steps", "warmup_start_ratio", "min_lr_ratio", "base_lrs")


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from ``warmup_start_ratio * lr`` to ``lr``, then cosine decay to ``min_lr_ratio * lr``.

    Step it once per optimiser step. After ``total_steps`` the factor stays at ``min_lr_ratio``.

    Args:
        optimizer: the optimiser whose learning rates it scales.
        total_steps: optimiser steps of the whole run, warm-up included; None (the configs' choice): the
            training module sets it from the trainer (``trainer.max_steps``) through
            :meth:`set_total_steps`, so the cosine always ends with the run.
        warmup_steps: steps of the linear warm-up (0: none).
        warmup_start_ratio: factor of the learning rate at step 0 of the warm-up.
        min_lr_ratio: factor of the learning rate at the end of the cosine.
        last_epoch: index of the last step taken, for resuming (-1: a fresh start).

    Raises:
        ValueError: on a non-positive ``total_steps``, a negative ``warmup_steps`` or ratios outside [0, 1].
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        warmup_start_ratio: float = 0.01,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        for name, ratio in (("warmup_start_ratio", warmup_start_ratio), ("min_lr_ratio", min_lr_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {ratio}")
        self.total_steps: int | None = None
        self.warmup_steps = warmup_steps
        self.warmup_start_ratio = warmup_start_ratio
        self.min_lr_ratio = min_lr_ratio
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run's length (optimiser steps). A warm-up as long as the run or longer (a short run of
        a paper config) would leave no cosine and end at the peak rate: it is cut to a tenth of the run,
        with a warning."""
        if not 1 <= total_steps < math.inf:
            raise ValueError(
                f"total_steps must be a finite number >= 1 of optimiser steps, got {total_steps}; "
                "set trainer.max_steps (streaming data has no natural end) or the scheduler's total_steps"
            )
        self.total_steps = int(total_steps)
        if self.warmup_steps >= self.total_steps:
            cut = self.total_steps // 10
            log.warning(
                "warmup_steps %d is not shorter than the run's %d steps, which would leave no cosine decay: "
                "warming up for %d steps instead (set the scheduler's warmup_steps to choose)",
                self.warmup_steps,
                self.total_steps,
                cut,
            )
            self.warmup_steps = cut
        if hasattr(self, "base_lrs"):  # set after construction (the trainer's run length)
            self._apply_rates()

    def _apply_rates(self) -> None:
        # The optimiser holds the rate the constructor (or a restored state) set, from the schedule as it
        # was then; give it this schedule's rate at the current step.
        factor = self.factor(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the progress (step, learning rates) but keep this run's schedule.

        The schedule's shape comes from the config of the run that resumes: extending a run with a larger
        ``trainer.max_steps`` stretches the cosine to the new end instead of silently keeping the old one.
        """
        schedule = {name: getattr(self, name) for name in _SCHEDULE_FIELDS}
        super().load_state_dict(state_dict)
        self.__dict__.update(schedule)
        # The optimiser was restored first with the learning rates of the saved schedule; give it this
        # schedule's rates at the restored step, or the first resumed step would run at the old rate.
        self._apply_rates()

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * frac
        if self.total_steps is None:
            if step == 0:  # the constructor's initial step, before the trainer has told the length
                return 1.0
            raise RuntimeError("WarmupCosineLR stepped before set_total_steps(); the run length is unknown")
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


#: Parameter names (substrings) that take no weight decay besides the 1-D ones (biases, norms): learned
#: positions and relative-position tables of the ViT and Hiera backbones.
NO_DECAY_NAMES: tuple[str, ...] = ("pos_embed", "rel_pos")


def parameter_groups(module: torch.nn.Module, *, exempt: bool = True) -> list[dict]:
    """The module's parameters in two groups: with weight decay, and without it.

    Without decay (``exempt``), as ViT / SAM fine-tuning recipes do: 1-D parameters (biases, norm
    scales and shifts), learned position embeddings and relative-position tables (:data:`NO_DECAY_NAMES`)
    and every ``nn.Embedding`` (SAM's prompt label embeddings, the IoU and mask tokens). Decaying them
    pulls pretrained values towards zero for no regularising gain.

    Args:
        module: the network.
        exempt: False puts every parameter in one group that decays (the optimiser's weight decay).

    Returns:
        ``[{"params": decayed, "name": "decay"}, {"params": exempt, "weight_decay": 0.0, "name":
        "no_decay"}]`` (the second only when ``exempt``), for any ``torch.optim`` optimiser (Lightning's
        learning-rate monitor logs ``lr-AdamW/decay`` and ``lr-AdamW/no_decay``).
    """
    embeddings = {
        id(p)
        for m in module.modules()
        if isinstance(m, torch.nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    decayed, kept = [], []
    for name, param in module.named_parameters():
        no_decay = param.ndim <= 1 or id(param) in embeddings or any(key in name for key in NO_DECAY_NAMES)
        (kept if exempt and no_decay else decayed).append(param)
    if not exempt:
        return [{"params": decayed}]
    return [{"params": decayed, "name": "decay"}, {"params": kept, "weight_decay": 0.0, "name": "no_decay"}]


def configure_optimization(
    params: Iterable[torch.nn.Parameter] | list[dict],
    optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer],
    scheduler: Callable[[Optimizer], LRScheduler] | None,
    *,
    total_steps: int | float | None = None,
) -> dict:
    """Build the optimiser over ``params`` (trainable ones only) and a per-step scheduler.

    Args:
        params: the module's parameters, or parameter groups (:func:`parameter_groups`); frozen ones
            (``requires_grad=False``) are left out, so AdamW keeps no state for them, and so are groups
            left empty.
        optimizer: ``OptimizerCallable``, e.g. ``functools.partial(torch.optim.AdamW, lr=1e-5)``.
        scheduler: ``LRSchedulerCallable`` or None for a constant learning rate.
        total_steps: the run's optimiser steps (``trainer.estimated_stepping_batches``), handed to a
            :class:`WarmupCosineLR` built without its own ``total_steps``.

    Returns:
        Lightning's ``configure_optimizers`` dictionary.
    """
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        trainable: list = [g for g in groups if g["params"]]
    else:
        trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: every parameter of the network is frozen")
    opt = optimizer(trainable)
    if scheduler is None:
        return {"optimizer": opt}
    sched = scheduler(opt)
    if isinstance(sched, WarmupCosineLR) and sched.total_steps is None:
        if total_steps is None:
            raise ValueError("WarmupCosineLR has no total_steps and the run length is unknown")
        sched.set_total_steps(total_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
