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

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from ``warmup_start_ratio * lr`` to ``lr``, then cosine decay to ``min_lr_ratio * lr``.

    Step it once per optimiser step. After ``total_steps`` the factor stays at ``min_lr_ratio``.

    Args:
        optimizer: the optimiser whose learning rates it scales.
        total_steps: optimiser steps of the whole run, warm-up included (the CLI links it to
            ``trainer.max_steps``).
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
        total_steps: int,
        warmup_steps: int = 0,
        warmup_start_ratio: float = 0.01,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1:
            raise ValueError(
                f"total_steps must be >= 1 optimiser steps, got {total_steps}; set trainer.max_steps "
                "(the CLI links it to the scheduler) or the scheduler's total_steps"
            )
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        for name, ratio in (("warmup_start_ratio", warmup_start_ratio), ("min_lr_ratio", min_lr_ratio)):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {ratio}")
        self.total_steps = total_steps
        self.warmup_steps = min(warmup_steps, total_steps)
        self.warmup_start_ratio = warmup_start_ratio
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * frac
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def configure_optimization(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[[Iterable[torch.nn.Parameter]], Optimizer],
    scheduler: Callable[[Optimizer], LRScheduler] | None,
) -> dict:
    """Build the optimiser over ``params`` (trainable ones only) and a per-step scheduler.

    Args:
        params: the module's parameters; frozen ones (``requires_grad=False``) are left out, so AdamW
            keeps no state for them.
        optimizer: ``OptimizerCallable``, e.g. ``functools.partial(torch.optim.AdamW, lr=1e-5)``.
        scheduler: ``LRSchedulerCallable`` or None for a constant learning rate.

    Returns:
        Lightning's ``configure_optimizers`` dictionary.
    """
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: every parameter of the network is frozen")
    opt = optimizer(trainable)
    if scheduler is None:
        return {"optimizer": opt}
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step", "frequency": 1},
    }
