"""The training callbacks: RunCheckpoint (interval checkpoints and the run's final step), the matte grids,\nthe skip counts and the progress bar."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from zim_lightning.data.skips import SkipCounter
from zim_lightning.lit import callbacks
from zim_lightning.lit.callbacks import (
    MatteGridLogger,
    ProgressBar,
    RunCheckpoint,
    SkipCountLogger,
    matte_grid,
)


def _fit(
    checkpoint: ModelCheckpoint, max_steps: int, *, accumulate: int = 1, ckpt_path: Path | None = None
) -> None:
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[checkpoint],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)


def _checkpoint(cls: type[ModelCheckpoint], folder: Path) -> ModelCheckpoint:
    return cls(
        dirpath=folder,
        filename="step{step:03d}",
        auto_insert_metric_name=False,
        every_n_train_steps=3,
        save_last=True,
        save_top_k=-1,
    )


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_the_final_step_is_saved_when_it_is_not_an_interval_step(tmp_path: Path) -> None:
    _fit(_checkpoint(RunCheckpoint, tmp_path / "ours"), max_steps=5)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "last.ckpt",
        "step003.ckpt",
        "step005.ckpt",
    ]
    assert _step(tmp_path / "ours" / "last.ckpt") == 5
    # Lightning's own callback leaves the last two steps unsaved
    _fit(_checkpoint(ModelCheckpoint, tmp_path / "plain"), max_steps=5)
    assert _step(tmp_path / "plain" / "last.ckpt") == 3


def test_a_final_interval_step_is_saved_once(tmp_path: Path) -> None:
    written = []

    class Counting(RunCheckpoint):
        def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
            written.append(Path(filepath).name)
            super()._save_checkpoint(trainer, filepath)

    _fit(_checkpoint(Counting, tmp_path), max_steps=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step003.ckpt", "step006.ckpt"]
    assert _step(tmp_path / "last.ckpt") == 6
    # not written a second time at the end (a multi-GB write; with a monitor, a "-v1" copy too)
    assert written == ["step003.ckpt", "last.ckpt", "step006.ckpt", "last.ckpt"]


def test_a_resumed_run_does_not_save_its_starting_step_again(tmp_path: Path) -> None:
    # with accumulation, Lightning would save the starting step after the first micro-batch, over the
    # checkpoint the run resumed from (with a micro-batch's progress in it)
    _fit(_checkpoint(RunCheckpoint, tmp_path), max_steps=3, accumulate=2)
    started = tmp_path / "step003.ckpt"
    before = torch.load(started, weights_only=True)["loops"]
    _fit(_checkpoint(RunCheckpoint, tmp_path), max_steps=5, accumulate=2, ckpt_path=started)
    assert torch.load(started, weights_only=True)["loops"] == before
    assert _step(tmp_path / "step005.ckpt") == 5


def test_logging_callbacks_act_on_the_micro_batch_that_ends_an_optimiser_step() -> None:
    from types import SimpleNamespace

    from zim_lightning.lit.callbacks import _step_ends

    accumulating = SimpleNamespace(accumulate_grad_batches=2)
    assert [_step_ends(accumulating, i) for i in range(4)] == [False, True, False, True]
    assert all(_step_ends(SimpleNamespace(accumulate_grad_batches=1), i) for i in range(3))


def test_the_progress_bar_of_a_run_sized_in_steps_shows_its_epoch_alone():
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    descriptions = {}
    for max_epochs in (-1, 5):  # -1: what Lightning sets when a run gives max_steps only
        for bar in (RichProgressBar(), ProgressBar()):
            trainer = L.Trainer(
                callbacks=[bar], max_steps=10, max_epochs=max_epochs, logger=False, enable_checkpointing=False
            )
            bar.setup(trainer, L.LightningModule(), stage="fit")
            description = bar._get_train_description(3)
            assert len(description) == len(bar.validation_description)  # padded alike: no flicker
            descriptions[max_epochs, type(bar).__name__] = description.strip()
    assert descriptions[-1, "RichProgressBar"] == "Epoch 3/-2"  # Lightning's, which this bar mends
    assert descriptions[-1, "ProgressBar"] == "Epoch 3"
    assert descriptions[5, "ProgressBar"] == descriptions[5, "RichProgressBar"] == "Epoch 3/4"


def test_the_progress_bar_shows_the_first_steps_loss_after_the_sanity_check(monkeypatch):
    from types import SimpleNamespace

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from zim_lightning.lit.callbacks import ProgressBar

    class Logging(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train/loss", out["loss"], on_step=True, on_epoch=True)  # no prog_bar, as ours
            return out

    class Shown(Callback):  # after the bar: what it shows at each step's end
        def __init__(self) -> None:
            self.shown, self.logged = [], []

        def on_train_batch_end(self, trainer, *args) -> None:
            self.shown.append(dict(bar._shown))
            self.logged.append(float(trainer.callback_metrics["train/loss_step"]))

    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: 0.0))  # no second passes
    bar, shown = ProgressBar(show="train/loss_step"), Shown()  # one name as a string
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[bar, shown],
        num_sanity_val_steps=1,  # reads before training, when nothing is logged yet
        limit_val_batches=1,
        val_check_interval=2,  # a validation after the second step: read at its end
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Logging())
    assert bar.show == ("train/loss_step",)
    # read at the first step, then not again while the (frozen) second lasts, but at the validation's end
    first, second = ({"train/loss_step": shown.logged[i]} for i in (0, 1))
    assert shown.shown == [first, first, second]
    assert shown.logged[1] != shown.logged[0] != shown.logged[2]


# ----------------------------------------------------------------------------- grids, skip counts, the bar

S, T = 128, 64  # frame, tile
LIME, RED, YELLOW = [0, 255, 0], [255, 0, 0], [255, 255, 0]


def _zim_batch(n: int = 1, labels=(1.0,), coords=((64.0, 64.0),)) -> dict:
    return {
        "image": torch.zeros(n, 3, S, S, dtype=torch.uint8),
        "alpha": torch.zeros(n, 1, S, S),
        "point_coords": torch.tensor([list(coords)] * n),
        "point_labels": torch.tensor([list(labels)] * n),
    }


def _pixel(grid: torch.Tensor, row: int, col: int, y: int, x: int) -> list[int]:
    """Pixel (y, x) of tile (row, col) of a make_grid(padding=2) grid."""
    return grid[:, 2 + row * (T + 2) + y, 2 + col * (T + 2) + x].tolist()


def test_prompts_are_drawn_in_their_colours_where_they_are_in_the_tile():
    # what a break looks like: (colours swapped), (frame pixels not scaled to the tile)
    alpha = torch.zeros(1, 1, S, S)
    assert _pixel(matte_grid(_zim_batch(labels=(1.0,)), alpha, tile_size=T), 0, 0, 32, 32) == LIME
    assert _pixel(matte_grid(_zim_batch(labels=(0.0,)), alpha, tile_size=T), 0, 0, 32, 32) == RED
    box = _zim_batch(labels=(2.0, 3.0), coords=((32.0, 32.0), (96.0, 96.0)))  # the tile's 16..48 square
    grid = matte_grid(box, alpha, tile_size=T)
    assert _pixel(grid, 0, 0, 16, 32) == YELLOW and _pixel(grid, 0, 0, 32, 32) == [0, 0, 0]


def test_grid_columns_rows_and_the_converters_mask():
    # what a break looks like: (max_samples ignored), (mask column dropped), (prediction and truth swapped)
    batch = _zim_batch(n=3)
    grid = matte_grid(batch, torch.ones(3, 1, S, S), max_samples=2, tile_size=T)
    assert grid.shape == (3, 2 * T + 3 * 2, 3 * T + 4 * 2)
    assert _pixel(grid, 1, 1, 5, 5) == [255] * 3 and _pixel(grid, 1, 2, 5, 5) == [0] * 3  # prediction | truth
    converter = {"image": batch["image"], "alpha": batch["alpha"], "mask": torch.ones(3, 1, S, S)}
    grid = matte_grid(converter, torch.zeros(3, 1, S, S), max_samples=1, tile_size=T)
    assert grid.shape == (3, T + 2 * 2, 4 * T + 5 * 2)
    assert _pixel(grid, 0, 1, 5, 5) == [255] * 3  # image | mask | prediction | truth


def test_the_progress_bar_reads_the_loss_once_per_interval(monkeypatch):
    # a read at t=0, none before t=read_every_s, one at it
    from zim_lightning.lit.callbacks import ProgressBar

    clock = [0.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    bar = ProgressBar(show="train/loss_step", read_every_s=1.0)
    trainer = SimpleNamespace(
        loggers=[], progress_bar_metrics={}, callback_metrics={"train/loss_step": torch.tensor(1.0)}
    )
    shown = []
    for t, value in ((0.0, 1.0), (0.5, 2.0), (1.0, 3.0), (1.9, 4.0)):
        clock[0] = t
        trainer.callback_metrics["train/loss_step"] = torch.tensor(value)
        shown.append(bar.get_metrics(trainer, None)["train/loss_step"])
    assert shown == [1.0, 1.0, 3.0, 3.0]


def test_a_box_given_bottom_right_first_is_drawn():
    # corners in either order give the same box (no torchvision error on xmin > xmax)
    alpha = torch.zeros(1, 1, S, S)
    ordered = matte_grid(
        _zim_batch(labels=(2.0, 3.0), coords=((32.0, 32.0), (96.0, 96.0))), alpha, tile_size=T
    )
    swapped = matte_grid(
        _zim_batch(labels=(2.0, 3.0), coords=((96.0, 96.0), (32.0, 32.0))), alpha, tile_size=T
    )
    assert torch.equal(ordered, swapped)


class _GridModel(L.LightningModule):
    """Steps that return what the matting modules return ({"loss", "alpha"}), on ZIM-shaped batches."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        alpha = torch.ones(len(batch["image"]), 1, S, S) * self.weight.sigmoid()
        return {"loss": (alpha - batch["alpha"]).square().mean(), "alpha": alpha.detach()}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SkipsData(L.LightningDataModule):
    """Batches of two, and a skip counter that has counted 2 empty masks and 1 bad JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.skips = SkipCounter()
        for reason in ("empty_mask", "empty_mask", "bad_json"):
            self.skips.skip(reason, "sa_1", "test")

    def train_dataloader(self):
        return DataLoader([_zim_batch(n=2)] * 4, batch_size=None)

    def val_dataloader(self):
        return DataLoader([_zim_batch(n=2)] * 2, batch_size=None)


def test_the_grid_and_skip_loggers_in_a_fit_with_accumulation(tmp_path: Path):
    # what a break looks like: (an interval of 0), (a grid in the sanity check), (a micro-batch that ends no
    # optimiser step logged), (per-reason counts dropped), (skip interval 0 accepted)
    with pytest.raises(ValueError, match="every_n_steps"):
        SkipCountLogger(every_n_steps=0)
    grids, only_val = (
        MatteGridLogger(every_n_steps=2, tile_size=T),
        MatteGridLogger(every_n_steps=0, tile_size=T),
    )
    logged = []

    class _Skips(SkipCountLogger):
        def _log(self, trainer, pl_module):  # at which steps it logs
            super()._log(trainer, pl_module)
            logged.append(trainer.global_step)

    trainer = L.Trainer(
        max_steps=4,  # 8 micro-batches: 2 epochs of 4
        accumulate_grad_batches=2,
        callbacks=[grids, only_val, _Skips(every_n_steps=2)],
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        limit_val_batches=1,
        log_every_n_steps=1,
    )
    trainer.fit(_GridModel(), datamodule=_SkipsData())
    train = sorted(p.name for p in grids.saved if p.name.startswith("train"))
    assert train == [
        "train_grid_step0000002.png",
        "train_grid_step0000004.png",
    ]  # not at step 0's micro-batch
    val = sorted(p.name for p in only_val.saved)
    assert val == [
        "val_grid_step0000002.png",
        "val_grid_step0000004.png",
    ]  # each epoch's end, no sanity check
    assert all(p.is_file() and p.parent.name == "images" for p in grids.saved + only_val.saved)
    assert logged == [2, 4]
    assert trainer.callback_metrics["data/skipped_empty_mask"] == 2
    assert trainer.callback_metrics["data/skipped_bad_json"] == 1
    assert trainer.callback_metrics["data/skipped"] == 3


def test_a_tensorboard_run_gets_the_grids_there_and_no_png_files(tmp_path: Path):
    # the configs log to TensorBoard; its grids go into the event file, not into a folder of PNGs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grids = MatteGridLogger(every_n_steps=2, tile_size=T)
    board = TensorBoardLogger(save_dir=str(tmp_path), name="run")
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[grids],
        accelerator="cpu",
        logger=board,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(_GridModel(), datamodule=_SkipsData())
    board.experiment.flush()
    assert grids.saved == [] and not list(tmp_path.rglob("*.png"))
    events = EventAccumulator(board.log_dir)
    events.Reload()
    images = events.Images("train/grid")
    assert [i.step for i in images] == [2]
    assert (images[0].height, images[0].width) == (
        2 * T + 3 * 2,
        3 * T + 4 * 2,
    )  # 2 rows: image | prediction | truth
