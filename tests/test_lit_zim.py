"""ZIM's training stage: through the real CLI, configs, datamodule and tiny network on CPU."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from zim_lightning.data.samples import unpack_batch
from zim_lightning.lit import callbacks, preemption
from zim_lightning.lit.callbacks import ProgressBar, matte_grid
from zim_lightning.lit.cli import ZimLightningCLI, cli_main, main
from zim_lightning.lit.matting_module import frame_errors
from zim_lightning.lit.zim_module import ZimModule
from zim_lightning.models.build import ZIM_VARIANTS
from zim_lightning.models.zim import Zim

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: Frame of these tests: smaller than the tiny config's 256 to keep each step well under a second.
FRAME = 128
#: No validation, and the logger writing every 50 steps (beyond these tests' steps).
QUIET = (
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=50",
)


@pytest.fixture(scope="module")
def synthetic(tiny_synthetic) -> Path:
    return tiny_synthetic(1)


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "-c",
        str(CONFIGS / "trainer" / "cpu.yaml"),
        "-c",
        str(CONFIGS / "zim" / "tiny.yaml"),
        f"--data.init_args.train_shards={data / 'matting/train/matting-000000.tar'}",
        f"--data.init_args.val_shards={data / 'matting/val/matting-000000.tar'}",
        f"--data.init_args.image_size={FRAME}",
        f"--model.init_args.net.init_args.image_size={FRAME}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--data.init_args.shuffle_buffer=4",
        "--data.init_args.shuffle_initial=2",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def test_fast_dev_run(synthetic: Path, tmp_path: Path, caplog, monkeypatch):
    # through the command's entry point: `fit && eval` and torchrun read 0 as a finished run, and our
    # INFO lines show without the user raising the log level (as in a fresh process: level unset)
    monkeypatch.setattr(logging.getLogger("zim_lightning"), "level", logging.NOTSET)
    assert main(["fit", *_args(synthetic, tmp_path, "--trainer.fast_dev_run=true")]) == 0
    assert "batch per optimiser step: 2 (2 per device x 1 devices x 1 accumulated)" in caplog.text
    # main() tells a preemption from a failure by this trainer's SIGTERM flag
    trainer = ZimLightningCLI.last_trainer
    assert isinstance(trainer.lightning_module, ZimModule)
    assert trainer.global_step == 1
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/l1", "train/grad", "val/loss", "val/sad", "val/mse", "val/mae"):
        assert torch.isfinite(logged[key]), key


def test_lightning_and_the_progress_bar_read_the_logged_values_back_not_at_every_step(
    synthetic: Path, tmp_path: Path, monkeypatch
):
    """Lightning turns every value logged with prog_bar=True into a Python number at every batch end, in
    its logger connector and again in its bar; on a GPU each read waits for the whole step. The training
    values are logged without it, and the configs' bar reads them once a second and at epoch ends."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LoggingReads(TorchDispatchMode):
        """Counts the values read back (.item(), float()) by Lightning's logging and progress bars."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_local_scalar_dense":
                where = " ".join(f.filename for f in traceback.extract_stack())
                self.count += "logger_connector" in where or "progress" in where or "lit/callbacks" in where
            return func(*args, **(kwargs or {}))

    # the bar's clock stands still: its one-second interval never passes, however slow the steps
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: 0.0))
    reads, bars = {}, {}
    for steps in (2, 5):
        with LoggingReads() as spy:
            cli = cli_main(
                ["fit", *_args(synthetic, tmp_path / str(steps), f"--trainer.max_steps={steps}", *QUIET)]
            )
        reads[steps] = spy.count
        (bars[steps],) = (c for c in cli.trainer.callbacks if isinstance(c, ProgressBar))
    assert reads[5] == reads[2] > 0  # once at the first step and at the epoch's end, not per step
    logged = cli.trainer.callback_metrics  # the epoch's end: what the bar read last
    assert bars[5]._shown == {name: float(logged[name]) for name in ("train/loss_step", "train/loss_epoch")}
    with pytest.raises(ValueError, match="read_every_s"):
        ProgressBar(read_every_s=-1)


def test_require_pretrained_refuses_a_network_built_from_random_weights_unless_resuming(tmp_path: Path):
    # the paper configs set it: a run without sam_checkpoint stops before its first step
    from lightning.pytorch import Trainer

    from zim_lightning.models.build import build_zim

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)

    def module(**net_args) -> ZimModule:
        result = ZimModule(net=build_zim(variant="tiny", **net_args), require_pretrained=True)
        result.trainer = trainer  # a module holds its trainer weakly
        return result

    random = module()
    with pytest.raises(ValueError, match=r"random weights.*sam_checkpoint=.*require_pretrained=false"):
        random.on_fit_start()
    trainer.ckpt_path = str(tmp_path / "last.ckpt")  # resuming: the weights come from there
    random.on_fit_start()
    trainer.ckpt_path = None
    weights = tmp_path / "zim_tiny.pt"
    torch.save(random.net.state_dict(), weights)
    module(checkpoint=str(weights)).on_fit_start()  # given weights: no complaint
    allowed = ZimModule(net=build_zim(variant="tiny"))  # the default: random starts allowed
    allowed.trainer = trainer
    allowed.on_fit_start()


@pytest.mark.parametrize("poisoned_calls", [{2}, set(range(100))])
def test_a_non_finite_loss_skips_its_step_and_a_run_of_them_stops_training(
    synthetic: Path, tmp_path: Path, monkeypatch, caplog, poisoned_calls: set[int]
):
    step, calls, weights = ZimModule._step, [], []

    def poisoned(self, batch, **kwargs):
        alpha, terms = step(self, batch, **kwargs)
        if self.training:
            calls.append(1)
            # the weights before the poisoned step, then before the step after it (so after the skip)
            if len(calls) - 1 in poisoned_calls or len(calls) in poisoned_calls:
                weights.append([p.detach().clone() for p in self.net.parameters()])
            if len(calls) in poisoned_calls:  # a bf16 overflow, say
                terms = {**terms, "loss": terms["loss"] * float("nan")}
        return alpha, terms

    monkeypatch.setattr(ZimModule, "_step", poisoned)
    quiet = ("--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0")
    steps = 3 if len(poisoned_calls) == 1 else 12  # a skipped step still counts as one of the run's
    args = ["fit", *_args(synthetic, tmp_path, f"--trainer.max_steps={steps}", *quiet)]
    if len(poisoned_calls) > 1:  # every step: the run stops, with a clear error, before the weights go
        with pytest.raises(FloatingPointError, match="not finite for 10 steps in a row"):
            cli_main(args)
        return
    with caplog.at_level("WARNING", logger="zim_lightning"):
        cli = cli_main(args)
    assert "the training loss is not finite; skipping this batch" in caplog.text
    assert all(torch.isfinite(p).all() for p in cli.model.net.parameters())
    # the skipped step moved no weight: no gradient step, and no AdamW weight decay or momentum either
    before, after = weights
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


def _fp16_trainer(scaler: torch.amp.GradScaler, *, max_steps: int) -> L.Trainer:
    """A bare CPU Trainer in 16-mixed (the V100 preset's precision) with ``scaler``: Lightning itself
    would make 16-mixed on the CPU bf16."""
    from lightning.pytorch.plugins import MixedPrecision

    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )


def test_a_non_finite_step_is_skipped_under_the_fp16_loss_scaler_too() -> None:
    # 16-mixed (the V100 preset) steps through a GradScaler: the skipped step must pass it by as well
    from zim_lightning.lit.matting_module import MattingModule

    class Linear(MattingModule):
        def __init__(self) -> None:
            super().__init__(net=torch.nn.Linear(4, 1), optimizer=None, scheduler=None)
            self.weights: list[list[torch.Tensor]] = []

        def training_step(self, batch, batch_idx):
            self.weights.append([p.detach().clone() for p in self.net.parameters()])
            loss = self.net(batch).square().mean() * (float("nan") if self.global_step == 2 else 1.0)
            return {"loss": loss} if self.loss_is_finite(loss) else self.skipped_step()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)

    torch.manual_seed(0)
    module = Linear()
    trainer = _fp16_trainer(torch.amp.GradScaler("cpu"), max_steps=4)
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=4))
    assert trainer.global_step == 4
    assert all(torch.equal(a, b) for a, b in zip(module.weights[2], module.weights[3], strict=True))
    # ... while the steps before it trained (the scaler may skip one that overflows fp16)
    assert not all(torch.equal(a, b) for a, b in zip(module.weights[0], module.weights[2], strict=True))


_NAN_ON_RANK_ONE = """
from zim_lightning.lit.zim_module import ZimModule


class NanOnRankOne(ZimModule):
    def _step(self, batch, **kwargs):
        alpha, terms = super()._step(batch, **kwargs)
        if self.training and self.trainer.global_rank == 1 and self.trainer.global_step == 2:
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        return alpha, terms
"""


@pytest.mark.slow  # two DDP processes on the CPU (gloo)
def test_two_ranks_skip_a_non_finite_step_together_and_validate_with_one_validation_shard(
    synthetic: Path, tmp_path: Path
):
    # A NaN loss on one rank: both skip the step (Lightning refuses a step returning None under DDP).
    # One validation shard for two ranks: rank 1 has no validation batch, which hung a DDP strategy that
    # broadcasts buffers (Lightning's default), as here.
    import os
    import subprocess
    import sys

    (tmp_path / "nan_module.py").write_text(_NAN_ON_RANK_ONE)
    args = _args(
        synthetic,
        tmp_path,
        "--model.class_path=nan_module.NanOnRankOne",
        "--trainer.devices=2",
        "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "zim_lightning", "fit", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=400,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the two-rank fit hung: {str(error.stderr)[-2000:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("the training loss is not finite; skipping this batch") == 2  # once per rank
    last = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow  # a fit in a subprocess, stopped by a signal
def test_a_run_stopped_by_sigterm_exits_with_143_and_keeps_its_steps(synthetic: Path, tmp_path: Path):
    import subprocess
    import sys
    import time

    # a DataLoader worker, and the signal sent to the whole process group, as SLURM's preemption,
    # `timeout` and `kill -- -PGID` do: a worker killed by it must not abort the save of the steps
    # Sized in epochs with no validation: Lightning builds the training loader before it takes SIGTERM over
    # (the scheduler asks for the number of steps).
    extra = (
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=1000",
        "--data.init_args.val_shards=null",
        "--data.init_args.num_workers=1",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "zim_lightning", "fit", *_args(synthetic, tmp_path, *extra)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.rglob("config.yaml")):  # written when the fit starts
            assert process.poll() is None and time.monotonic() < deadline, "the fit did not start"
            time.sleep(0.5)
        time.sleep(5)  # a few training steps
        os.killpg(process.pid, signal.SIGTERM)  # a preemption
        _, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    # not 0: `fit && eval` must not go on with a half-trained model, and torchrun restarts
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "is killed by signal" not in stderr  # PyTorch's dead-worker check was off (preemption.py)
    assert list(tmp_path.rglob("last.ckpt"))  # save_on_exception kept the steps done


def test_the_sigterm_wrapper_goes_on_lightnings_handler_once_and_stops_the_worker_check():
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGCHLD)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        preemption.expect_worker_deaths_after_sigterm()  # no Trainer has taken SIGTERM over: left alone
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        calls = []
        signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))  # as Lightning's
        preemption.expect_worker_deaths_after_sigterm()
        wrapped = signal.getsignal(signal.SIGTERM)
        preemption.expect_worker_deaths_after_sigterm()  # each loop's start: wrapped once
        assert signal.getsignal(signal.SIGTERM) is wrapped
        assert signal.getsignal(signal.SIGCHLD) is saved[1]  # PyTorch's check holds until the signal
        wrapped(signal.SIGTERM, None)
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGCHLD) is preemption._no_check  # PyTorch's check is off
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGCHLD, saved[1])


class _SigtermAfterTheFirstStep(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # to this process, as a preemption (Lightning's handler runs)


def test_after_sigterm_errors_are_a_preemption_and_a_keyboard_interrupt_is_the_users_stop(caplog):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_SigtermAfterTheFirstStep()],
    )
    with pytest.raises(SIGTERMException) as stopped:
        trainer.fit(BoringModel())
    assert trainer.received_sigterm and trainer.global_step == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zim_lightning"):
        assert preemption.stop_or_raise(stopped.value, trainer, "resume with --ckpt_path=x") == 143
    assert [r.getMessage() for r in caplog.records] == ["stopped by SIGTERM; resume with --ckpt_path=x"]
    assert preemption.is_preemption(RuntimeError("DataLoader worker exited unexpectedly"), trainer)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after the signal propagates: not exit status 143
        preemption.stop_or_raise(KeyboardInterrupt(), trainer, "run it again")


def test_the_sigterm_wrapper_does_nothing_off_the_main_thread():
    # a Trainer may run in a worker thread (a notebook's background fit), where installing a signal
    # handler raises ValueError
    saved = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def lightnings(signum, frame) -> None:
        pass

    def wrap() -> None:
        try:
            preemption.expect_worker_deaths_after_sigterm()
        except BaseException as error:
            errors.append(error)

    try:
        signal.signal(signal.SIGTERM, lightnings)
        thread = threading.Thread(target=wrap)
        thread.start()
        thread.join()
        assert errors == [] and signal.getsignal(signal.SIGTERM) is lightnings
    finally:
        signal.signal(signal.SIGTERM, saved)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--data.init_args.train_shards=missing-{000000..000001}.tar",), "train_shards: 2 of the 2 shards"),
        (("--data.init_args.batch_size=0",), "batch_size must be >= 1"),
        (("--model.init_args.require_pretrained=true",), "starts from random weights, and this config"),
    ],
)
def test_a_run_with_missing_shards_or_a_refused_value_is_a_usage_error_before_its_log_folder(
    synthetic: Path, tmp_path: Path, capsys, extra: tuple[str, ...], words: str
):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args(synthetic, tmp_path, *extra)])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert not list(tmp_path.rglob("config.yaml"))


def test_a_second_run_into_the_same_log_folder_replaces_its_config(synthetic: Path, tmp_path: Path):
    # a resume, or the demo run again, into one fixed log folder must not abort on the earlier config.yaml
    fixed = (*QUIET, "--trainer.max_steps=1", "--trainer.logger.init_args.version=run0")
    first = cli_main(["fit", *_args(synthetic, tmp_path, *fixed, "--trainer.log_every_n_steps=7")])
    config = Path(first.trainer.log_dir) / "config.yaml"
    assert "log_every_n_steps: 7" in config.read_text()
    second = cli_main(["fit", *_args(synthetic, tmp_path, *fixed, "--trainer.log_every_n_steps=9")])
    assert Path(second.trainer.log_dir) == config.parent
    assert "log_every_n_steps: 9" in config.read_text()


def test_a_run_failing_on_workers_the_sigterm_killed_stops_as_sigterm_and_other_errors_raise(
    monkeypatch, caplog
):
    # A run waiting for a batch when the group's SIGTERM killed its DataLoader workers fails on them
    # before Lightning's stop at the batch's end (PyTorch's RuntimeError for dead workers, or a
    # ConnectionResetError while a worker was handing a batch over): still a preemption.
    from zim_lightning.lit import cli

    def run(received_sigterm: bool | None, error: Exception):
        def failing_on_dead_workers(args):
            if received_sigterm is not None:  # the run got as far as making its trainer
                cli.ZimLightningCLI.last_trainer = SimpleNamespace(received_sigterm=received_sigterm)
            raise error

        monkeypatch.setattr(cli, "cli_main", failing_on_dead_workers)
        return cli.main(["fit"])

    dead = RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")
    monkeypatch.setattr(cli.ZimLightningCLI, "last_trainer", None)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # no SIGTERM: a failure as it is
        run(False, dead)
    assert run(True, dead) == 128 + signal.SIGTERM
    assert run(True, ConnectionResetError(104, "Connection reset by peer")) == 128 + signal.SIGTERM
    assert (
        "stopped by SIGTERM (then ConnectionResetError: [Errno 104] Connection reset by peer)" in caplog.text
    )
    # the earlier run's trainer received it; this run failed before it had one: a failure as it is
    assert cli.ZimLightningCLI.last_trainer.received_sigterm
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        run(None, dead)


def test_clipping_a_fused_optimiser_under_mixed_precision_is_refused_before_training(
    synthetic: Path, tmp_path: Path
):
    extra = (
        "--trainer.precision=bf16-mixed",
        "--trainer.gradient_clip_val=1.0",
        "--model.init_args.optimizer.init_args.fused=true",
        "--trainer.fast_dev_run=true",
    )
    with pytest.raises(ValueError, match="fused optimiser under bf16-mixed.*fused=false"):
        cli_main(["fit", *_args(synthetic, tmp_path, *extra)])


@pytest.mark.parametrize("name", ["last", "best", "hpc", "registry:run:latest", "s3://bucket/run/last.ckpt"])
def test_lightnings_own_ckpt_path_names_pass_to_lightning(synthetic: Path, tmp_path: Path, name, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    resolved = []  # Lightning resolves these names itself (and fails there when none applies)
    monkeypatch.setattr(
        LightningCLI, "_parse_ckpt_path", lambda cli: resolved.append(cli.config.fit.ckpt_path)
    )
    monkeypatch.setattr(LightningCLI, "_run_subcommand", lambda cli, subcommand: None)
    cli_main(["fit", *_args(synthetic, tmp_path), f"--ckpt_path={name}"])
    assert resolved == [name]


def test_a_checkpoint_of_another_model_or_no_checkpoint_cannot_resume_a_run(
    synthetic: Path, tmp_path: Path, capsys
):
    from zim_lightning.models.build import build_zim
    from zim_lightning.models.converter import build_converter_tiny

    def fit_checkpoint(name: str, module: str, net: torch.nn.Module) -> Path:
        state = {f"net.{k}": v for k, v in net.state_dict().items()}
        torch.save({"state_dict": state, "hyper_parameters": {"_class_path": module}}, tmp_path / name)
        return tmp_path / name

    zim_module, converter_module = (
        "zim_lightning.lit.zim_module.ZimModule",
        "zim_lightning.lit.converter_module.ConverterModule",
    )
    converter = fit_checkpoint("converter.ckpt", converter_module, build_converter_tiny())
    other_net = fit_checkpoint("other_net.ckpt", zim_module, build_converter_tiny())
    other_frame = fit_checkpoint("other_frame.ckpt", zim_module, build_zim(variant="tiny"))  # 1024, not 256
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    for path, reason in (
        (converter, f"a checkpoint of {converter_module}, and this run's model is {zim_module}"),
        (other_net, "its network is not this run's ("),
        (other_frame, "3 with another shape: image_encoder.blocks.1.attn.rel_pos_h (127, 32) vs"),
        (plain, "not a Lightning checkpoint"),
        (text, "is not a PyTorch checkpoint"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli_main(["fit", *_args(synthetic, tmp_path, f"--ckpt_path={path}")])
        message = " ".join(capsys.readouterr().err.split())
        assert exc.value.code == 2 and f"--ckpt_path '{path}' does not fit this run" in message
        assert reason in message
    for path in (tmp_path / "missing.ckpt", tmp_path):  # a typo, a folder: before any log folder exists
        with pytest.raises(SystemExit) as exc:
            cli_main(["fit", *_args(synthetic, tmp_path / "run", f"--ckpt_path={path}")])
        message = " ".join(capsys.readouterr().err.split())
        assert exc.value.code == 2 and f"--ckpt_path '{path}' does not exist or is not a file" in message
    assert not (tmp_path / "run").exists()


def test_the_tiny_config_fine_tunes_from_a_trained_networks_checkpoint(synthetic: Path, tmp_path: Path):
    from zim_lightning.models.checkpoint import NET_SPEC_KEY

    trained = cli_main(_args(synthetic, tmp_path), run=False)
    for parameter in trained.model.net.parameters():
        parameter.data.normal_()  # weights no fresh build has
    state = {f"net.{k}": v for k, v in trained.model.net.state_dict().items()}
    torch.save({"state_dict": state, NET_SPEC_KEY: trained.model.net_spec}, tmp_path / "last.ckpt")
    tuned = cli_main(
        _args(synthetic, tmp_path, f"--model.init_args.net.init_args.checkpoint={tmp_path / 'last.ckpt'}"),
        run=False,
    )
    for name, value in tuned.model.net.state_dict().items():
        assert torch.equal(value, trained.model.net.state_dict()[name]), name


def test_compiled_training_through_lightning_matches_eager(synthetic: Path, tmp_path: Path):
    """The vit_b config's speed path (compile + channels-last) through Lightning's loop: Dynamo captures the
    encoder, prompt encoder and decoder without a graph break, and the step computes the eager loss. The
    aot_eager backend traces forward and backward like inductor but generates no code, so this runs on a
    CPU in seconds; inductor's kernels themselves are checked by the GPU benchmarks."""
    from torch._dynamo.utils import counters

    def fit(run_dir: Path, *extra: str) -> dict[str, float]:
        cli = cli_main(["fit", *_args(synthetic, run_dir, "--trainer.fast_dev_run=true", *extra)])
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}

    eager = fit(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = fit(
        tmp_path / "compiled",
        "--model.init_args.compile=default",
        "--model.init_args.compile_backend=aot_eager",
        "--model.init_args.channels_last=true",
    )
    # Dynamo captured a graph for each of the four compiled parts (at least), with no break anywhere.
    assert counters["stats"]["unique_graphs"] >= 4
    assert not counters["graph_break"], dict(counters["graph_break"])
    for key in ("train/loss", "val/loss", "val/sad"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5), key
    torch._dynamo.reset()


def test_fixed_batch_loss_drops_grid_draws_prompts_and_frozen_encoder_stays(synthetic: Path):
    cli = cli_main(_args(synthetic, synthetic / "unused"), run=False)
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["image"].shape[-1] == FRAME and batch["alpha"].dtype == torch.uint8  # as collated

    torch.manual_seed(0)
    module = ZimModule(net=cli.model.net, optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))
    on_device = cli.datamodule.on_after_batch_transfer(batch, 0)  # what the step and callbacks then see
    assert on_device["alpha"].dtype == torch.float32 and on_device["valid"].shape == on_device["alpha"].shape
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(4):
        alpha, terms = module._step(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.9 * losses[0], losses

    # the grid: image with prompts drawn | prediction | truth, one row per sample
    grid = matte_grid(batch, alpha.detach(), max_samples=2, tile_size=64)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * 64 + 3 * 2, 3 * 64 + 4 * 2)
    plain = matte_grid({k: v for k, v in batch.items() if not k.startswith("point")}, alpha, tile_size=64)
    assert not torch.equal(grid, plain[:, : grid.shape[1]])  # the prompts changed the image tiles
    unpacked = matte_grid(unpack_batch(batch), alpha.detach(), max_samples=2, tile_size=64)
    assert (grid.int() - unpacked.int()).abs().max() <= 1  # the uint8 truth drawn as the float one

    frozen = ZimModule(
        net=cli.model.net, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), freeze_image_encoder=True
    )
    encoder = [p.detach().clone() for p in frozen.net.image_encoder.parameters()]
    decoder = [p.detach().clone() for p in frozen.net.mask_decoder.parameters()]
    optimizer = frozen.configure_optimizers()["optimizer"]
    frozen._step(batch)[1]["loss"].backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(encoder, frozen.net.image_encoder.parameters(), strict=True))
    assert any(
        not torch.equal(a, b) for a, b in zip(decoder, frozen.net.mask_decoder.parameters(), strict=True)
    )


def test_bce_weight_adds_cross_entropy_of_the_frame_logits(synthetic: Path):
    cli = cli_main(_args(synthetic, synthetic / "unused"), run=False)
    batch = unpack_batch(next(iter(cli.datamodule.train_dataloader())))
    paper = ZimModule(net=cli.model.net)
    mixed = ZimModule(net=cli.model.net, bce_weight=0.5)
    with torch.no_grad():
        logits = paper.frame_logits(
            batch["image"], batch["point_coords"], batch["point_labels"], batch["valid"]
        )
        _, paper_terms = paper._step(batch)
        _, mixed_terms = mixed._step(batch)
    valid = batch["valid"].float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, batch["alpha"].float(), reduction="none"
    )
    expected = paper_terms["loss"] + 0.5 * (bce * valid).sum() / valid.sum()
    assert mixed_terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert mixed_terms["l1"].item() == paper_terms["l1"].item()  # the paper terms are logged unchanged


def test_batches_in_another_frame_are_refused(synthetic: Path):
    cli = cli_main(_args(synthetic, synthetic / "unused", "--data.init_args.image_size=64"), run=False)
    batch = next(iter(cli.datamodule.train_dataloader()))
    with pytest.raises(ValueError, match=f"{FRAME}x{FRAME} frame"):
        cli.model.training_step(batch, 0)


def test_channels_last_switch_keeps_the_loss_and_applies_once(synthetic: Path):
    cli = cli_main(_args(synthetic, synthetic / "unused"), run=False)
    batch = next(iter(cli.datamodule.train_dataloader()))
    plain = ZimModule(net=cli.model.net)
    with torch.no_grad():
        reference = plain._step(batch)[1]["loss"]
    fast = ZimModule(net=cli.model.net, channels_last=True)
    fast.configure_model()
    fast.configure_model()  # Lightning calls the hook at every stage; the switch applies once
    convs = [m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():
        torch.testing.assert_close(fast._step(batch)[1]["loss"], reference, rtol=1e-4, atol=1e-5)


def _batch(labels: list[list[float]]) -> dict:
    generator = torch.Generator().manual_seed(0)
    b = len(labels)
    alpha = torch.zeros(b, 1, FRAME, FRAME)
    alpha[:, :, 30:90, 40:100] = torch.rand(b, 1, 60, 60, generator=generator)
    valid = torch.ones(b, 1, FRAME, FRAME)
    valid[0, :, FRAME * 3 // 4 :] = (
        0  # the first image is landscape: padding below it, the second fills the frame
    )
    return {
        "image": torch.randint(0, 256, (b, 3, FRAME, FRAME), generator=generator).to(torch.uint8),
        "alpha": alpha,
        "valid": valid,
        "point_coords": torch.tensor([[[40.0, 30.0], [100.0, 90.0], [0.0, 0.0]]]).expand(b, -1, -1).clone(),
        "point_labels": torch.tensor(labels),
    }


def test_training_sees_a_padded_image_as_the_predictor_does():
    """Collated images are padded with black before normalisation; the network must see SAM's
    normalise-then-zero-pad, as at inference (predictor, ONNX encoder, official runner)."""
    import torch.nn.functional as F

    net = _net()
    module = ZimModule(net=net)
    batch = _batch([[1.0, -1.0, -2.0], [2.0, 3.0, -2.0]])
    height = FRAME * 3 // 4  # the first image's rows; collate pads the rest with black
    batch["image"][0, :, height:] = 0
    coords, labels = batch["point_coords"], batch["point_labels"]
    with torch.no_grad():
        trained = module.frame_logits(batch["image"], coords, labels, batch["valid"])
        embedding, feats = net.encode_image(batch["image"][:1, :, :height])  # the predictor's input
        logits, _ = net.decode(embedding, feats, coords[:1], labels[:1])
        inference = F.interpolate(logits[:, :1], size=(FRAME, FRAME), mode="bilinear", align_corners=False)
        black = module.frame_logits(batch["image"], coords, labels)  # no valid: black padding
    torch.testing.assert_close(trained[:1], inference, atol=1e-5, rtol=1e-5)
    assert (black[:1] - inference)[
        ..., :height, :
    ].abs().max() > 1e-3  # the padding changes the image's logits


def test_validation_means_weigh_pooled_losses_by_batch_size_and_vectors_by_sample():

    module = ZimModule(net=Zim(**ZIM_VARIANTS["tiny"], image_size=FRAME))
    metrics = module.val_metrics
    # a full batch of 3 (loss pooled over it: 1.0) and a partial batch of 1 (4.0): 7 / 4 per sample
    module._accumulate_eval(metrics, {"loss": torch.tensor(1.0), "sad": torch.tensor([1.0, 1.0, 1.0])}, batch_size=3)  # fmt: skip
    module._accumulate_eval(metrics, {"loss": torch.tensor(4.0), "sad": torch.tensor([4.0])}, batch_size=1)
    assert metrics["loss"].compute().item() == pytest.approx(1.75)
    assert metrics["sad"].compute().item() == pytest.approx(1.75)


@pytest.mark.parametrize("switches", [{}, {"multimask": True}, {"iou_weight": 1.0}])
def test_validation_loss_does_not_depend_on_how_images_batch(switches):

    torch.manual_seed(0)
    module = ZimModule(net=Zim(**ZIM_VARIANTS["tiny"], image_size=FRAME).eval(), **switches)
    batch = _batch([[1.0, -1.0, -2.0], [2.0, 3.0, -2.0]])  # different valid areas (3/4 and all)
    with torch.no_grad():
        module._evaluate(batch, module.val_metrics)
        together = {name: m.compute().item() for name, m in module.val_metrics.items()}
        module.val_metrics.reset()
        for i in range(2):
            module._evaluate({k: v[i : i + 1] for k, v in batch.items()}, module.val_metrics)
        apart = {name: m.compute().item() for name, m in module.val_metrics.items()}
    assert together == pytest.approx(apart, rel=1e-5)


def _grads(module: ZimModule, batch: dict) -> dict[str, float]:
    module.zero_grad()
    _, terms = module._step(batch)
    terms["loss"].backward()
    return {
        name: 0.0 if p.grad is None else float(p.grad.abs().max())
        for name, p in module.net.mask_decoder.named_parameters()
    }


def test_multimask_and_iou_switches_train_every_output_token():

    torch.manual_seed(0)
    net = Zim(**ZIM_VARIANTS["tiny"], image_size=FRAME)
    click, box = [1.0, -1.0, -2.0], [2.0, 3.0, -2.0]  # a single click is ambiguous, a box is not
    paper = ZimModule(net=net)
    both = ZimModule(net=net, multimask=True, iou_weight=1.0)
    _, paper_terms = paper._step(_batch([click, box]))
    _, both_terms = both._step(_batch([click, box]))
    # token 0's terms are the paper's (pooled over the batch's valid pixels); the switches only add losses
    for name in ("l1", "grad"):
        torch.testing.assert_close(both_terms[name], paper_terms[name])
    assert both_terms["loss"] > paper_terms["loss"]

    def trained(grads: dict[str, float], part: str) -> bool:
        return any(v > 0 for n, v in grads.items() if n.startswith(part))

    grads = _grads(paper, _batch([click, box]))  # the paper's loss: token 0 only, no IoU
    assert not trained(grads, "iou_prediction_head") and not trained(grads, "output_hypernetworks_mlps.1")
    grads = _grads(both, _batch([click, box]))
    assert trained(grads, "iou_prediction_head")
    assert trained(grads, "output_hypernetworks_mlps.0")
    # the click trains the closest of tokens 1-3 (SAM's minimum over the alternatives): exactly one
    assert sum(trained(grads, f"output_hypernetworks_mlps.{k}") for k in (1, 2, 3)) == 1
    grads = _grads(both, _batch([box, box]))  # no ambiguous prompt: tokens 1-3 get no mask loss
    assert trained(grads, "output_hypernetworks_mlps.0") and trained(grads, "iou_prediction_head")
    assert not any(trained(grads, f"output_hypernetworks_mlps.{k}") for k in (1, 2, 3))
    two_clicks = [1.0, 0.0, -1.0]  # a positive and a negative click: not ambiguous either
    grads = _grads(both, _batch([two_clicks, box]))
    assert not any(trained(grads, f"output_hypernetworks_mlps.{k}") for k in (1, 2, 3))
    with pytest.raises(ValueError, match="iou_weight"):
        ZimModule(net=net, iou_weight=-1.0)


def test_what_the_network_predicts_in_the_padding_changes_no_loss_term():
    # every term, the IoU head's target included, is computed in the valid region of the frame only

    net = _net()
    module = ZimModule(net=net, multimask=True, iou_weight=1.0)
    decode = net.decode

    def padding_filled(*args, **kwargs):
        logits, iou = decode(*args, **kwargs)
        logits = logits.clone()
        # sample 0's padding starts at frame row 3/4 (see _batch); the logits' row there still reaches
        # the last valid frame row through the bilinear upsampling, the rows after it do not
        rows = logits.shape[-2] * 3 // 4 + 1
        logits[0, :, rows:] = 20.0
        return logits, iou

    batch = _batch([[1.0, -1.0, -2.0], [2.0, 3.0, -2.0]])
    with torch.no_grad():
        base = module._step(batch)[1]
        net.decode = padding_filled
        try:
            filled = module._step(batch)[1]
        finally:
            net.decode = decode
    for name, value in base.items():
        torch.testing.assert_close(filled[name], value, msg=name)


def test_a_padded_image_gives_the_feature_pyramid_gradients_of_the_networks_size():
    # The padding of a non-square image is zeros: through a convolution without a bias it reached the
    # first LayerNorm with zero variance, whose backward multiplies by 1/sqrt(eps) = 1000 per level
    # (gradients of ~1e7, over float16's range, against ~1 elsewhere).
    from zim_lightning.models.common import LayerNorm2d

    module = ZimModule(net=_net())
    largest: list[float] = []
    for layer in module.net.feature_pyramid.modules():
        if isinstance(layer, LayerNorm2d):
            layer.register_full_backward_hook(
                lambda _, grad_in, __: largest.append(grad_in[0].abs().max().item())
            )
    batch = _batch([[1.0, -1.0, -2.0], [2.0, 3.0, -2.0]])  # the first image has padding below it
    _, terms = module._step(batch)
    terms["loss"].backward()

    def norm(prefix: str, inside: bool) -> float:
        grads = [p.grad for n, p in module.net.named_parameters() if n.startswith(prefix) == inside]
        return torch.stack([g.norm() for g in grads if g is not None]).norm().item()

    assert max(largest) < torch.finfo(torch.float16).max
    assert norm("feature_pyramid.", True) < 10 * norm("feature_pyramid.", False)


def test_16_mixed_training_on_padded_images_updates_the_weights_from_a_loss_scale_of_one():
    # the V100 preset: a GradScaler skips every step whose float16 gradients overflow, halving its
    # scale each time; from a scale of 1 the first steps must already update
    module = ZimModule(net=_net())
    before = [p.detach().clone() for p in module.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    trainer = _fp16_trainer(scaler, max_steps=2)
    batch = _batch([[1.0, -1.0, -2.0], [2.0, 3.0, -2.0]])
    trainer.fit(module, torch.utils.data.DataLoader([batch, batch], batch_size=None))
    assert scaler.get_scale() == 1.0  # no step skipped
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


def test_checkpoints_carry_the_network_and_old_optimiser_states_resume(synthetic: Path, tmp_path: Path):
    from zim_lightning.models.build import zim_from_checkpoint
    from zim_lightning.models.checkpoint import NET_SPEC_KEY, read_net_spec

    steps = ("--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0")
    old = cli_main(
        ["fit", *_args(synthetic, tmp_path / "old", *steps, "--model.init_args.decay_exempt=false")]
    )
    # a weights-only checkpoint, the file one ships for inference, carries the network too
    weights_only = tmp_path / "weights_only.ckpt"
    old.trainer.save_checkpoint(weights_only, weights_only=True)
    assert read_net_spec(weights_only)["init_args"]["image_size"] == FRAME
    assert zim_from_checkpoint(weights_only).image_size == FRAME
    # an optimiser state of one parameter group, as saved before decay_exempt existed
    last = torch.load(old.trainer.checkpoint_callback.last_model_path, weights_only=True)
    del last["hyper_parameters"]["decay_exempt"], last[NET_SPEC_KEY]
    before = tmp_path / "before.ckpt"
    torch.save(last, before)
    with pytest.warns(UserWarning, match="one parameter group"):
        resumed = cli_main(
            [
                "fit",
                *_args(synthetic, tmp_path / "resumed", "--trainer.max_steps=2", *steps[1:]),
                f"--ckpt_path={before}",
            ]
        )
    assert resumed.trainer.global_step == 2 and resumed.model.decay_exempt is False


def test_a_finite_step_resets_the_run_of_non_finite_ones() -> None:
    import logging
    from types import SimpleNamespace

    from zim_lightning.lit.matting_module import MAX_NONFINITE_STEPS, MattingModule

    module = MattingModule(net=torch.nn.Linear(2, 2), optimizer=torch.optim.SGD, scheduler=None)
    strategy = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor)  # one device's
    module._trainer = SimpleNamespace(strategy=strategy, global_step=0, world_size=1)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    logging.disable(logging.WARNING)
    try:
        for _ in range(MAX_NONFINITE_STEPS - 1):
            assert not module.loss_is_finite(nan)
        assert module.loss_is_finite(one)
        for _ in range(MAX_NONFINITE_STEPS - 1):  # sporadic NaN steps never stop a run
            assert not module.loss_is_finite(nan)
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------- eval / metrics


# ----------------------------------------------------------------------------- mutation round 9a


def _net() -> Zim:
    torch.manual_seed(0)
    return Zim(**ZIM_VARIANTS["tiny"], image_size=FRAME).eval()


CLICK, BOX = [1.0, -1.0, -2.0], [2.0, 3.0, -2.0]


def _outputs(module: ZimModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return module._frame_outputs(
        batch["image"], batch["point_coords"], batch["point_labels"], batch["valid"], multimask=True
    )


def test_iou_weight_alone_adds_its_weighted_squared_error_against_each_outputs_actual_iou():
    # what a break looks like: (iou_weight ignored without multimask), (weight dropped), (L1), (target threshold)
    net = _net()
    batch = _batch([CLICK, BOX])
    with torch.no_grad():
        base = ZimModule(net=net)._step(batch)[1]["loss"]
        logits, iou = _outputs(ZimModule(net=net), batch)
        predicted, truth = logits.sigmoid() > 0.5, batch["alpha"] > 0.5
        inside = batch["valid"] > 0
        intersection = (predicted & truth & inside).flatten(2).sum(-1).float()
        union = ((predicted | truth) & inside).flatten(2).sum(-1).float()
        actual = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
        expected = (iou - actual).square().mean()
        assert expected > 1e-4  # the random network's IoU head is off: the term is visible
        for weight in (0.5, 2.0):
            loss = ZimModule(net=net, iou_weight=weight)._step(batch)[1]["loss"]
            assert loss.item() == pytest.approx((base + weight * expected).item(), rel=1e-5), weight


def test_the_iou_target_of_an_empty_prediction_of_an_empty_matte_is_one():
    # prediction and truth both empty in the valid region -> IoU 1 (not 0)
    net = _net()
    batch = _batch([CLICK, BOX])
    batch["alpha"].zero_()
    decode = net.decode

    def empty(*args, **kwargs):
        logits, iou = decode(*args, **kwargs)
        return torch.full_like(logits, -20.0), torch.ones_like(iou)

    net.decode = empty
    with torch.no_grad():
        base = ZimModule(net=net)._step(batch)[1]["loss"]
        with_iou = ZimModule(net=net, iou_weight=1.0)._step(batch)[1]["loss"]
    torch.testing.assert_close(with_iou, base)


def test_multimask_adds_each_single_clicks_closest_alternative_and_nothing_else():
    # what a break looks like: (box + click counted as ambiguous), (amax), (token 0 among the alternatives)
    # (negative clicks not counted), (the term scaled)
    net = _net()
    labels = [
        CLICK,  # one positive click: ambiguous
        [2.0, 3.0, 1.0],  # a box and a click: not ambiguous
        [1.0, 0.0, -1.0],  # two clicks: not ambiguous
        [0.0, -1.0, -2.0],  # one negative click: ambiguous
    ]
    batch = _batch(labels)
    paper, multi = ZimModule(net=net), ZimModule(net=net, multimask=True)
    with torch.no_grad():
        base = paper._step(batch)[1]["loss"]
        logits, _ = _outputs(paper, batch)
        alphas = logits.sigmoid()
        each = torch.stack(
            [
                paper.loss(alphas[:, k : k + 1], batch["alpha"], batch["valid"], per_sample=True)["loss"]
                for k in range(4)
            ],
            dim=1,
        )  # Bx4
        ambiguous = torch.tensor([1.0, 0.0, 0.0, 1.0])
        expected = base + (each[:, 1:].amin(dim=1) * ambiguous).mean()
        loss = multi._step(batch)[1]["loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_multimask_steps_alpha_is_token_zeros():
    # what the step returns (grids, frame errors) is output 0, as without the switches
    net = _net()
    batch = _batch([CLICK, BOX])
    with torch.no_grad():
        expected = ZimModule(net=net)._step(batch)[0]
        for switches in ({"multimask": True}, {"iou_weight": 1.0}):
            torch.testing.assert_close(ZimModule(net=net, **switches)._step(batch)[0], expected)


def test_validation_frame_errors_count_the_valid_region_only():
    # val/sad, val/mse, val/mae are taken inside each image, not over its padding
    net = _net()
    batch = _batch([CLICK, BOX])
    module = ZimModule(net=net)
    with torch.no_grad():
        alpha = module(batch["image"], batch["point_coords"], batch["point_labels"], batch["valid"])
        module._evaluate(batch, module.val_metrics)
    expected = frame_errors(alpha, batch["alpha"], batch["valid"])
    for name in ("sad", "mse", "mae"):
        assert module.val_metrics[name].compute().item() == pytest.approx(
            expected[name].mean().item(), rel=1e-5
        )


def test_test_steps_accumulate_in_the_test_metrics():
    # trainer.test logs test/..., and leaves the validation means alone
    module = ZimModule(net=_net())
    with torch.no_grad():
        module.test_step(_batch([CLICK, BOX]), 0)
    assert module.test_metrics["loss"].update_count == 1
    assert module.val_metrics["loss"].update_count == 0


def test_forward_zeroes_the_padding_as_frame_logits_does():
    # forward(valid=...) is the sigmoid of frame_logits with the same valid map
    module = ZimModule(net=_net())
    batch = _batch([CLICK, BOX])
    args = batch["image"], batch["point_coords"], batch["point_labels"]
    with torch.no_grad():
        torch.testing.assert_close(
            module(*args, batch["valid"]), module.frame_logits(*args, batch["valid"]).sigmoid()
        )
        assert not torch.allclose(module(*args, batch["valid"]), module(*args))


def test_the_speed_switches_pass_their_mode_and_backend_and_apply_once(monkeypatch):
    # what a break looks like: (applied at every stage), (mode dropped), (backend dropped)
    from zim_lightning import speed

    calls = []  # spies: the real switches still run
    compile_model, to_channels_last = speed.compile_model, speed.to_channels_last
    monkeypatch.setattr(
        speed, "compile_model", lambda net, **kw: (calls.append(("compile", kw)), compile_model(net, **kw))[1]
    )
    monkeypatch.setattr(
        speed, "to_channels_last", lambda net: (calls.append(("channels_last", {})), to_channels_last(net))[1]
    )
    module = ZimModule(net=_net(), compile="max-autotune", channels_last=True)  # inductor compiles lazily
    module.configure_model()
    module.configure_model()  # Lightning: at every fit / validate / test
    assert calls == [("channels_last", {}), ("compile", {"mode": "max-autotune", "backend": "inductor"})]
    calls.clear()
    ZimModule(net=_net(), compile="default", compile_backend="aot_eager").configure_model()
    assert calls == [("compile", {"mode": "default", "backend": "aot_eager"})]
