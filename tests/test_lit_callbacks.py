"""RunCheckpoint: the interval checkpoints of ModelCheckpoint, and the run's final step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from zim_lightning.lit.callbacks import RunCheckpoint


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
    _fit(_checkpoint(RunCheckpoint, tmp_path), max_steps=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step003.ckpt", "step006.ckpt"]
    assert _step(tmp_path / "last.ckpt") == 6


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

    from zim_lightning.lit.callbacks import ProgressBar

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

    from zim_lightning.lit import callbacks
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
