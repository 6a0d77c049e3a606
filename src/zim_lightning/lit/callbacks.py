"""Training callbacks: picture grids of prompts and mattes, counts of skipped corrupt samples, and the
checkpoints of a run (every N steps and its last step).

Grids show, per sample, the input image (with the ZIM prompt drawn on it: box in yellow, positive points
in green, negative points in red), the converter's coarse input mask when the batch has one, the
prediction and the ground truth. They go to TensorBoard when the run logs there and are saved as PNG
files under the logger's run directory otherwise (CSV logger), so every run leaves pictures to look at.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_keypoints, make_grid

from zim_lightning.prompt_labels import (
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_NEGATIVE,
    LABEL_POSITIVE,
)

log = logging.getLogger(__name__)

_BOX_COLOUR, _POSITIVE_COLOUR, _NEGATIVE_COLOUR = "yellow", "lime", "red"


def _to_rgb_uint8(x: Tensor, size: int) -> Tensor:
    """Bx{1,3}xHxW image in [0, 255], or matte in [0, 1] (uint8: [0, 255]) -> Bx3xsizexsize uint8."""
    scale = 255.0 if x.shape[1] == 1 and x.is_floating_point() else 1.0
    x = x.detach().float().cpu() * scale
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _draw_prompts(tile: Tensor, coords: Tensor, labels: Tensor, scale: float) -> Tensor:
    """Draw one sample's prompts (Nx2 ``(X, Y)`` frame pixels, N labels) on a 3xHxW uint8 tile."""
    coords = coords.detach().float().cpu() * scale
    labels = labels.detach().cpu().round().long()
    radius = max(2, tile.shape[-1] // 64)
    corners = [coords[labels == lab] for lab in (LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT)]
    if all(len(c) for c in corners):
        box = torch.cat([corners[0][0], corners[1][0]])[None]  # 1x4 (x1, y1, x2, y2)
        box = torch.cat([box[:, :2].minimum(box[:, 2:]), box[:, :2].maximum(box[:, 2:])], dim=1)
        tile = draw_bounding_boxes(tile, box, colors=_BOX_COLOUR, width=max(1, radius // 2))
    for lab, colour in ((LABEL_POSITIVE, _POSITIVE_COLOUR), (LABEL_NEGATIVE, _NEGATIVE_COLOUR)):
        points = coords[labels == lab]
        if len(points):
            tile = draw_keypoints(tile, points[None], colors=colour, radius=radius)
    return tile


def _step_ends(trainer: Trainer, batch_idx: int) -> bool:
    """Whether this batch completes an optimiser step (the last micro-batch of gradient accumulation)."""
    return (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0


def matte_grid(batch: dict[str, Any], alpha: Tensor, *, max_samples: int = 4, tile_size: int = 256) -> Tensor:
    """One picture of a batch: a row per sample, columns image | [input mask] | prediction | truth.

    Args:
        batch: a converter or ZIM batch (``image`` Bx3xSxS in [0, 255], ``alpha`` Bx1xSxS (float in
            [0, 1], or uint8 as the ZIM datamodule collates it), optionally
            ``mask`` Bx1xSxS and ``point_coords`` BxNx2 / ``point_labels`` BxN in the frame's pixels).
        alpha: predicted alpha Bx1xSxS in [0, 1].
        max_samples: rows drawn at most.
        tile_size: side of each square tile in pixels.

    Returns:
        3xHxW uint8 grid.
    """
    n = min(max_samples, alpha.shape[0])
    image = batch["image"][:n]
    tiles = _to_rgb_uint8(image, tile_size)
    if "point_coords" in batch and "point_labels" in batch:
        scale = tile_size / image.shape[-1]
        tiles = torch.stack(
            [
                _draw_prompts(t, batch["point_coords"][i], batch["point_labels"][i], scale)
                for i, t in enumerate(tiles)
            ]
        )
    columns = [tiles]
    if "mask" in batch:
        columns.append(_to_rgb_uint8(batch["mask"][:n], tile_size))
    columns += [_to_rgb_uint8(alpha[:n], tile_size), _to_rgb_uint8(batch["alpha"][:n], tile_size)]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # (n * columns)x3xTxT, row-major
    return make_grid(rows, nrow=len(columns), padding=2, pad_value=255)


class MatteGridLogger(Callback):
    """Log a picture grid of prompts, predictions and ground truth every N training steps and at the
    first batch of every validation.

    The LightningModule's steps return ``{"loss", "alpha"}`` (see
    :class:`~zim_lightning.lit.matting_module.MattingModule`), so no extra forward pass is run.

    Args:
        every_n_steps: optimiser steps between training grids (0: validation grids only).
        max_samples: rows per grid.
        tile_size: side of each tile in pixels.
    """

    def __init__(self, *, every_n_steps: int = 500, max_samples: int = 4, tile_size: int = 256) -> None:
        super().__init__()
        if every_n_steps < 0 or max_samples < 1 or tile_size < 16:
            raise ValueError(
                "MatteGridLogger needs every_n_steps >= 0, max_samples >= 1 and tile_size >= 16, got "
                f"{every_n_steps}, {max_samples}, {tile_size}"
            )
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.tile_size = tile_size
        self.saved: list[Path] = []

    def _emit(self, trainer: Trainer, tag: str, batch: dict, outputs: Any) -> None:
        if not trainer.is_global_zero or not isinstance(outputs, dict) or "alpha" not in outputs:
            return
        grid = matte_grid(batch, outputs["alpha"], max_samples=self.max_samples, tile_size=self.tile_size)
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, global_step=step, dataformats="CHW")
                continue
            run_dir = getattr(logger, "log_dir", None) or trainer.default_root_dir
            path = Path(run_dir) / "images" / f"{tag.replace('/', '_')}_step{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(grid, str(path))
            self.saved.append(path)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.every_n_steps
            and _step_ends(trainer, batch_idx)
            and trainer.global_step % self.every_n_steps == 0
        ):
            self._emit(trainer, "train/grid", batch, outputs)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._emit(trainer, "val/grid", batch, outputs)


class SkipCountLogger(Callback):
    """Log how many corrupt samples the datamodule skipped, per reason (``data/skipped_<reason>``).

    Reads ``trainer.datamodule.skips`` (a :class:`~zim_lightning.data.skips.SkipCounter`, or anything with
    ``counts() -> dict[str, int]``); does nothing when the datamodule has none.

    Args:
        every_n_steps: optimiser steps between logs of the running totals.
    """

    def __init__(self, *, every_n_steps: int = 50) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    @staticmethod
    def _counts(trainer: Trainer) -> dict[str, int] | None:
        counter = getattr(trainer.datamodule, "skips", None)
        counts = getattr(counter, "counts", None)
        return counts() if callable(counts) else None

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counts = self._counts(trainer)
        if counts is None:
            return
        values = {f"data/skipped_{reason}": float(n) for reason, n in counts.items()}
        values["data/skipped"] = float(sum(counts.values()))
        # counts live per process; the sum over ranks is the dataset-wide total
        pl_module.log_dict(values, on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=True)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _step_ends(trainer, batch_idx) and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves the run's final step.

    Lightning saves every ``every_n_train_steps`` steps, and at the end of training writes ``last.ckpt``
    only when nothing was saved before: a run whose ``max_steps`` is not a multiple of the interval
    ended with its last steps unsaved (a 25000-step run of an every-10000 config left step 20000 as
    ``last.ckpt``). At the end of training this saves the final step like an interval step, and
    ``last.ckpt`` with it. Takes ``ModelCheckpoint``'s arguments.

    A resumed run counts its starting step as saved (Lightning does not restore that): with gradient
    accumulation, the first micro-batch after resuming would otherwise save the starting step again,
    over the checkpoint the run resumed from, with a micro-batch's progress in it.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step > 0:
            self._last_global_step_saved = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # not already saved at this step
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with the training loss read from the GPU once a second.

    Lightning's own bar turns every value logged with ``prog_bar=True`` into a Python number at every
    batch end (and Lightning's logger connector does it once more). Each such read waits until the GPU has
    run the whole step, backward and optimiser included, so the GPU then idles while the host fetches,
    copies and launches the next batch. The training modules therefore log their step values without
    ``prog_bar``, and this bar shows the ``show`` entries of ``trainer.callback_metrics`` (still on the
    device) read at most once per ``read_every_s`` seconds of training, and always at the end of each
    training epoch and each validation. Values logged with ``prog_bar=True`` (validation losses) show as
    in Lightning's bar.

    A run sized in steps (``max_epochs: -1``) shows "Epoch 3", where Lightning's shows "Epoch 3/-2".

    Args:
        show: names in ``trainer.callback_metrics`` to show (those not logged yet are left out), or one.
        read_every_s: least time between two reads while training; 0 reads at every batch.
        refresh_rate, leave, theme, console_kwargs: Lightning's ``RichProgressBar``.
    """

    def __init__(
        self,
        *,
        show: str | tuple[str, ...] = ("train/loss_step", "train/loss_epoch"),
        read_every_s: float = 1.0,
        refresh_rate: int = 100,
        leave: bool = False,
        theme: RichProgressBarTheme = RichProgressBarTheme(),
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if read_every_s < 0:
            raise ValueError(f"read_every_s must be at least 0 seconds, got {read_every_s}")
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self.show = (show,) if isinstance(show, str) else tuple(show)
        self.read_every_s = read_every_s
        self._shown: dict[str, float] = {}
        self._next_read = -math.inf

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        now = time.monotonic()
        if now >= self._next_read:
            logged = trainer.callback_metrics
            self._shown = {name: float(logged[name]) for name in self.show if name in logged}
            self._next_read = now + self.read_every_s
        return {**super().get_metrics(trainer, pl_module), **self._shown}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._next_read = -math.inf  # the first step's values (the sanity check read none)
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._next_read = -math.inf  # the epoch's values, whenever the last read was
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._next_read = -math.inf
        super().on_validation_end(trainer, pl_module)

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        # padded as Lightning pads it: the validation bar's longer label must not make the bars flicker
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
