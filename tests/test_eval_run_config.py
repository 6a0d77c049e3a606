"""`zim-lightning eval --run-config RUN/config.yaml --checkpoint RUN/.../last.ckpt` on a real (one-step)
tiny ZIM run: the network is the run's (frame, weights), the metrics are those of the Python API
(``zim_lightning.demo.evaluate_network``) on the same network, and bad inputs end in parser errors that
name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_lit_zim import CONFIGS, FRAME
from tests.test_lit_zim import _args as zim_run_args
from zim_lightning.demo import evaluate_network
from zim_lightning.evaluate import main
from zim_lightning.lit.cli import cli_main
from zim_lightning.lit.zim_module import ZimModule
from zim_lightning.models.build import RunConfigError, zim_from_checkpoint, zim_from_run_config
from zim_lightning.models.checkpoint import CheckpointError

# The run's frame, FRAME, is neither the tiny config's 256 nor SAM's 1024: a network built from anything
# but the run's config would have another one.


@pytest.fixture(scope="module")
def synthetic(tiny_synthetic) -> Path:
    return tiny_synthetic(1)


@pytest.fixture(scope="module")
def run(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config.yaml, last.ckpt) of a one-step configs/zim/tiny.yaml run, channels-last weights on."""
    run_dir = tmp_path_factory.mktemp("zim_run")
    extra = ("--model.init_args.channels_last=true", "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    cli = cli_main(["fit", *zim_run_args(synthetic, run_dir, *extra, "--trainer.num_sanity_val_steps=0")])
    return Path(cli.trainer.log_dir) / "config.yaml", Path(cli.trainer.checkpoint_callback.last_model_path)


def _eval_args(config: Path, checkpoint: Path, data: Path, out: Path) -> list[str]:
    return [
        "--run-config", str(config),
        "--checkpoint", str(checkpoint),
        "--data", str(data),
        "--format", "micromat",
        "--out", str(out),
        "--baselines", "binary",
        "--grid-count", "0",
        "--accelerator", "cpu",
        "--num-workers", "0",
    ]  # fmt: skip


def test_eval_of_a_run_equals_the_python_api_on_the_run_network(run, synthetic: Path, tmp_path: Path):
    config, checkpoint = run
    assert main(_eval_args(config, checkpoint, synthetic / "micromat", tmp_path)) == 0
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["run_config"] == str(config) and doc["checkpoint"] == str(checkpoint)
    assert doc["image_size"] == FRAME

    net = zim_from_run_config(config, checkpoint)
    assert net.image_size == FRAME
    # the weights are the checkpoint's, read here without the project's loader
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    own = net.state_dict()
    assert set(own) == {k.removeprefix("net.") for k in saved if k.startswith("net.")}
    assert all(torch.equal(value, saved[f"net.{key}"]) for key, value in own.items())

    expected = evaluate_network(net, synthetic / "micromat", tmp_path / "api", seed=0, num_workers=0)
    assert doc["results"] == expected["results"] and doc["baselines"] == expected["baselines"]
    assert doc["results"]["fine"]["box"]["n"] >= 1


def test_a_fit_checkpoint_carries_its_network(run, synthetic: Path, tmp_path: Path, capsys):
    config, checkpoint = run
    by_config = zim_from_run_config(config, checkpoint)
    alone = zim_from_checkpoint(checkpoint)  # no config.yaml, no --model
    assert alone.image_size == FRAME and alone.masked_attention == by_config.masked_attention
    assert all(torch.equal(v, by_config.state_dict()[k]) for k, v in alone.state_dict().items())
    # the commands take such a checkpoint alone
    args = _eval_args(config, checkpoint, synthetic / "micromat", tmp_path)
    assert main(args[2:]) == 0  # without --run-config
    assert json.loads((tmp_path / "metrics.json").read_text())["image_size"] == FRAME
    # a plain state dict carries no network: the error says what to give instead
    plain = tmp_path / "plain.pt"
    torch.save(by_config.state_dict(), plain)
    with pytest.raises(RunConfigError, match="does not carry its network's config"):
        zim_from_checkpoint(plain)
    with pytest.raises(SystemExit):
        main(["--data", str(synthetic / "micromat"), "--format", "micromat", "--out", str(tmp_path / "none")])
    assert "name the network: --model, --run-config, or a --checkpoint" in capsys.readouterr().err


def test_a_compiled_module_saves_the_keys_of_the_plain_network(run, tmp_path: Path):
    config, checkpoint = run
    module = ZimModule(net=zim_from_run_config(config, checkpoint), compile="default")
    module.configure_model()  # nn.Module.compile on every part, lazily: nothing compiles until a call
    assert any(getattr(m, "_compiled_call_impl", None) is not None for m in module.net.children())
    with torch.no_grad():  # other weights than the run's, so a load that did nothing would show
        for parameter in module.net.parameters():
            parameter.add_(1.0)
    path = tmp_path / "compiled.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    loaded = zim_from_run_config(config, path)
    assert all(torch.equal(v, module.net.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_bad_run_configs_and_checkpoints_are_parser_errors_naming_the_file(
    run, synthetic: Path, tmp_path: Path, capsys
):
    config, checkpoint = run
    data = synthetic / "micromat"

    def refused(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    missing = tmp_path / "nowhere" / "config.yaml"
    assert f"--run-config {str(missing)!r} does not exist" in refused(
        _eval_args(missing, checkpoint, data, tmp_path)
    )

    converter = CONFIGS / "converter" / "tiny.yaml"  # the label converter's training config
    err = refused(_eval_args(converter, checkpoint, data, tmp_path))
    assert f"run config {str(converter)!r} is not a ZIM training config" in err
    assert "build_converter_tiny" in err and "zim_lightning.models.zim.Zim" in err

    trainer_only = CONFIGS / "trainer" / "cpu.yaml"
    assert "has no model.init_args.net.class_path" in refused(
        _eval_args(trainer_only, checkpoint, data, tmp_path)
    )

    # the run's config with SAM's pixel decoder: the checkpoint's hierarchical decoder keys do not fit
    other = yaml.safe_load(config.read_text())
    other["model"]["init_args"]["net"]["init_args"]["pixel_decoder"] = "sam"
    other_config = tmp_path / "other.yaml"
    other_config.write_text(yaml.safe_dump(other))
    err = refused(_eval_args(other_config, checkpoint, data, tmp_path))
    assert f"checkpoint '{checkpoint}" in err and "does not match Zim" in err and "unexpected" in err
    with pytest.raises(CheckpointError, match="missing"):
        zim_from_run_config(other_config, checkpoint)

    err = refused([*_eval_args(config, checkpoint, data, tmp_path), "--model", "tiny"])
    assert "not allowed with argument" in err
    err = refused([*_eval_args(config, checkpoint, data, tmp_path), "--pixel-decoder", "sam"])
    assert "the run's config fixes the architecture" in err
    with pytest.raises(RunConfigError, match="is not YAML"):
        zim_from_run_config(checkpoint)
