"""The converter's training stage: through the real CLI, configs, datamodule and tiny network on CPU."""

from __future__ import annotations

import csv
import functools
import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from zim_lightning.lit.callbacks import MatteGridLogger, SkipCountLogger
from zim_lightning.lit.cli import cli_main
from zim_lightning.lit.converter_module import ConverterModule
from zim_lightning.lit.matting_module import frame_errors
from zim_lightning.models.checkpoint import load_exactly, read_state_dict
from zim_lightning.models.converter import build_converter_tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def synthetic(tiny_synthetic) -> Path:
    return tiny_synthetic(0)


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny converter config on the synthetic sample, shrunk to a few seconds of CPU."""
    return [
        "-c",
        str(CONFIGS / "trainer" / "cpu.yaml"),
        "-c",
        str(CONFIGS / "converter" / "tiny.yaml"),
        f"--data.init_args.train_shards={data / 'matting/train/matting-000000.tar'}",
        f"--data.init_args.val_shards={data / 'matting/val/matting-000000.tar'}",
        f"--data.init_args.seg_shards={data / 'seg/seg-000000.tar'}",
        "--data.init_args.crop_size=64",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--data.init_args.shuffle_buffer=4",
        "--data.init_args.shuffle_initial=2",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


class _Steps(Callback):
    """Records the global step and learning rate at the start of every training batch."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.starts.append(trainer.global_step)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class _Dtypes(Callback):
    """Records the dtypes the network's convolutions compute in during training."""

    def __init__(self) -> None:
        self.seen: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        for module in pl_module.net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, i, o: self.seen.add(o.dtype))


def test_fast_dev_run_in_bf16_mixed_on_cpu(synthetic: Path, tmp_path: Path):
    cli = cli_main(
        _args(synthetic, tmp_path, "--trainer.fast_dev_run=true", "--trainer.precision=bf16-mixed"), run=False
    )
    assert isinstance(cli.model, ConverterModule)
    dtypes = _Dtypes()
    cli.trainer.callbacks.append(dtypes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not [w for w in caught if "is NaN" in str(w.message)]  # it warns only when it scores nothing
    assert cli.trainer.global_step == 1
    assert torch.bfloat16 in dtypes.seen
    logged = cli.trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"]) and torch.isfinite(logged["val/sad"])
    # the identity baseline (coarse mask as the matte) is measured on the same crops
    assert torch.isfinite(logged["val/sad_input"])


def test_a_validation_that_scores_no_sample_says_so(synthetic: Path, tmp_path: Path):
    from zim_lightning.data.tar_writer import write_tar

    empty = tmp_path / "empty.tar"
    write_tar(empty, [], compress=False)  # a shard that holds nothing
    args = _args(synthetic, tmp_path, "--trainer.fast_dev_run=true", f"--data.init_args.val_shards={empty}")
    cli = cli_main(args, run=False)
    with pytest.warns(UserWarning, match="val/loss is NaN: this val epoch scored no sample on any rank"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.isnan(cli.trainer.callback_metrics["val/loss"])


@pytest.mark.slow
def test_run_logs_then_resumes_at_the_saved_step(synthetic: Path, tmp_path: Path):
    common = (
        "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        "--model.init_args.scheduler.init_args.warmup_steps=0",
    )
    first = cli_main(_args(synthetic, tmp_path, "--trainer.max_steps=2", *common), run=False)
    for callback in first.trainer.callbacks:
        if isinstance(callback, (MatteGridLogger, SkipCountLogger)):
            callback.every_n_steps = 1
    first.trainer.fit(first.model, datamodule=first.datamodule)
    # the run directory holds the resolved config, picture grids, metrics and checkpoints
    log_dir = Path(first.trainer.log_dir)
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and (log_dir / "config.yaml").is_file()
    images = sorted(p.name for p in (log_dir / "images").glob("*.png"))
    assert "train_grid_step0000001.png" in images and "val_grid_step0000002.png" in images
    with open(log_dir / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {
        "train/loss_step",
        "train/l1_step",
        "train/grad_step",
        "val/loss",
        "val/sad",
        "val/mse",
    } <= columns
    assert "data/skipped" in columns and {"lr-AdamW/decay", "lr-AdamW/no_decay"} <= columns

    second = cli_main(_args(synthetic, tmp_path, "--trainer.max_steps=4", *common), run=False)
    steps = _Steps()
    second.trainer.callbacks.append(steps)
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=str(last))
    assert steps.starts == [2, 3]
    assert second.trainer.global_step == 4
    # the schedule resumed at step 2 of the new, longer cosine (lr 1e-3 * (1 + cos(pi * s / 4)) / 2)
    scheduler = second.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4 and scheduler.total_steps == 4
    assert steps.lrs == pytest.approx([0.5e-3, 1e-3 * (1 + math.cos(math.pi * 3 / 4)) / 2])

    # a Lightning checkpoint of this module is read by the models' loader (weights_only, "net." prefix)
    net = build_converter_tiny()
    load_exactly(net, read_state_dict(last), source=str(last))
    assert torch.equal(net.head_os1.weight, first.model.net.head_os1.weight.detach())


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(synthetic: Path):
    cli = cli_main(_args(synthetic, synthetic / "unused"), run=False)
    batch = next(iter(cli.datamodule.train_dataloader()))
    torch.manual_seed(0)
    module = ConverterModule(
        net=build_converter_tiny(), optimizer=functools.partial(torch.optim.AdamW, lr=3e-3)
    )
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(4):
        loss = module._step(batch)[1]["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


class _ConstantAlpha(torch.nn.Module):
    """A converter stand-in predicting the same alpha everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        alpha = torch.full_like(masks.float(), self.value)
        return {"alpha": alpha, "alpha_os1": alpha, "alpha_os4": alpha, "alpha_os8": alpha}


def test_frame_errors_are_scaled_as_the_paper_scales_them():
    errors = frame_errors(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))
    assert torch.allclose(errors["sad"], torch.tensor([0.002]))  # sum |a - t| / 1000
    assert torch.allclose(errors["mse"], torch.tensor([250.0]))  # mean (a - t)^2 x 1000
    assert torch.allclose(errors["mae"], torch.tensor([500.0]))  # mean |a - t| x 1000
    # means over the valid pixels, weighted, also for weights that sum to less than 1
    valid = torch.tensor([[0.25, 0.25], [0.0, 0.0]]).view(1, 1, 2, 2)
    weighted = frame_errors(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5), valid)
    assert torch.allclose(weighted["mae"], torch.tensor([500.0]))
    assert torch.allclose(weighted["sad"], torch.tensor([0.00025]))  # the weighted sum


def test_validation_scores_the_coarse_input_mask_as_its_baseline():
    module = ConverterModule(net=_ConstantAlpha(0.5))
    ones = torch.ones(2, 1, 4, 4)
    module.validation_step(
        {"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "mask": ones, "alpha": ones}, 0
    )
    assert float(module.val_metrics["sad_input"].compute()) == 0.0  # the mask equals the target
    assert float(module.val_metrics["sad"].compute()) == pytest.approx(0.008)  # 16 pixels off by 0.5


def test_collated_uint8_labels_score_as_their_float_values():
    # The datamodule collates mask and alpha as uint8 (255 = 1); the module scales them itself, so a
    # collated batch gives the metrics of its float form, on whichever path it arrives.
    alpha_u8 = torch.tensor([0, 51, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask_u8 = torch.where(alpha_u8 > 127, 255, 0).to(torch.uint8)
    image = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)

    def scores(mask: torch.Tensor, alpha: torch.Tensor) -> dict[str, float]:
        module = ConverterModule(net=_ConstantAlpha(0.5))
        module.validation_step({"image": image, "mask": mask, "alpha": alpha}, 0)
        return {name: float(metric.compute()) for name, metric in module.val_metrics.items()}

    collated = scores(mask_u8, alpha_u8)
    assert collated == pytest.approx(scores(mask_u8.float() / 255, alpha_u8.float() / 255), rel=1e-6)
    assert collated["val/sad_input"] == pytest.approx((0.2 + 0.498 + 0.0 + 0.0) / 1000, abs=1e-6)


class _Outputs(Callback):
    """Keeps what each training step returned."""

    def __init__(self) -> None:
        self.outputs: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.outputs.append(outputs)


class _StrideOutputs(torch.nn.Module):
    """A converter stand-in whose outputs at each stride differ."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        alpha = torch.full_like(masks, 0.25) + self.bias
        return {"alpha": alpha, "alpha_os1": alpha, "alpha_os4": alpha * 2, "alpha_os8": alpha * 3}


def test_a_training_step_logs_the_stl_share_and_returns_the_final_alpha(tmp_path: Path):
    from lightning.pytorch import Trainer

    batch = {
        "image": torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
        "mask": torch.full((4, 1, 8, 8), 255, dtype=torch.uint8),
        "alpha": torch.full((4, 1, 8, 8), 255, dtype=torch.uint8),
        "is_stl": torch.tensor([True, False, False, False]),
        "key": list("abcd"),
    }
    outputs = _Outputs()
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[outputs],
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer.fit(ConverterModule(net=_StrideOutputs()), train_dataloaders=loader)
    assert float(trainer.callback_metrics["train/stl_fraction"]) == pytest.approx(0.25)  # 1 of 4
    (step,) = outputs.outputs
    assert torch.equal(step["alpha"], torch.full((4, 1, 8, 8), 0.25))  # the stride-1 output, not os4 / os8


class _BandsOnTheMask(torch.nn.Module):
    """A converter stand-in whose refinement bands are its input masks, so they differ in size."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        alpha = images[:, :1].float() / 255.0
        band = masks > 0.5
        return {
            "alpha": alpha,
            "alpha_os1": alpha,
            "alpha_os4": alpha,
            "alpha_os8": alpha,
            "band_os1": band,
            "band_os4": band,
        }


def test_band_weighted_validation_loss_does_not_depend_on_how_samples_batch():
    # The bands differ in size from sample to sample: pooled over a batch, their means would weigh the
    # samples by band size, so the epoch's val/loss would change with the batch size (and rank count).
    module = ConverterModule(net=_BandsOnTheMask(), band_weighted_loss=True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=generator).to(torch.uint8)
    masks = torch.zeros(3, 1, 32, 32)
    for i, side in enumerate((4, 12, 28)):
        masks[i, :, :side, :side] = 1.0
    alphas = torch.rand(masks.shape, generator=generator) * (1 + torch.arange(3.0)).view(3, 1, 1, 1) / 3

    def val_loss(batch_size: int) -> float:
        module.val_metrics.reset()
        for start in range(0, 3, batch_size):
            part = slice(start, start + batch_size)
            module.validation_step({"image": images[part], "mask": masks[part], "alpha": alphas[part]}, 0)
        return float(module.val_metrics["loss"].compute())

    assert val_loss(3) == pytest.approx(val_loss(1), rel=1e-5)
