"""Every YAML under configs/ parses through the CLI, with the paper's settings and every ablation switch.

Parsing (``--print_config``) validates each ``class_path`` and ``init_args`` against the real signatures
without building anything, so the paper-scale networks are never instantiated here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from zim_lightning.lit.cli import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
STAGE_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "trainer")


def _resolved(capsys: pytest.CaptureFixture, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_configs_exist():
    names = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert {"converter/paper.yaml", "converter/tiny.yaml", "zim/vit_b.yaml", "zim/tiny.yaml"} <= names
    assert {f"trainer/{n}.yaml" for n in ("cpu", "gpu", "ddp", "ddp_multinode", "v100")} <= names


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_stage_config_parses(config: Path, capsys: pytest.CaptureFixture):
    cfg = _resolved(capsys, "-c", str(CONFIGS / "trainer" / "cpu.yaml"), "-c", str(config))
    assert cfg["model"]["class_path"].startswith("zim_lightning.lit.")
    assert cfg["data"]["class_path"] == "zim_lightning.data.datamodule.ZimDataModule"
    assert cfg["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.stem)
def test_trainer_preset_parses(preset: Path, capsys: pytest.CaptureFixture):
    cfg = _resolved(capsys, "-c", str(preset), "-c", str(CONFIGS / "converter" / "tiny.yaml"))
    expected = {"cpu": "32-true", "gpu": "bf16-mixed", "ddp": "bf16-mixed", "ddp_multinode": "bf16-mixed"}
    assert cfg["trainer"]["precision"] == expected.get(preset.stem, "16-mixed")
    if preset.stem.startswith("ddp"):
        assert cfg["trainer"]["strategy"]["class_path"].endswith("DDPStrategy")


def test_paper_settings(capsys: pytest.CaptureFixture):
    conv = _resolved(capsys, "-c", str(CONFIGS / "converter" / "paper.yaml"))
    zim = _resolved(capsys, "-c", str(CONFIGS / "zim" / "vit_b.yaml"))
    for cfg, lr in ((conv, 1e-3), (zim, 1e-5)):
        model = cfg["model"]["init_args"]
        assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
        assert model["optimizer"]["init_args"]["lr"] == pytest.approx(lr)
        assert model["scheduler"]["class_path"].endswith("WarmupCosineLR")
        assert model["grad_weight"] == 10.0
        assert cfg["trainer"]["max_steps"] == 500_000
        assert cfg["data"]["init_args"]["batch_size"] == 16
    assert conv["model"]["init_args"]["net"]["class_path"].endswith("build_converter_hiera_b_plus")
    assert conv["data"]["init_args"]["crop_size"] == 1024
    assert conv["data"]["init_args"]["sga"] and conv["data"]["init_args"]["sga_p"] == 0.5
    assert conv["data"]["init_args"]["stl"]
    net = zim["model"]["init_args"]["net"]["init_args"]
    assert net["variant"] == "vit_b" and net["masked_attention"] and net["pixel_decoder"] == "hierarchical"
    assert zim["model"]["init_args"]["bce_weight"] == 0.0  # the paper's loss, L1 + 10 * gradient only
    assert zim["data"]["init_args"]["image_size"] == 1024 and zim["data"]["init_args"]["box_jitter"] == 0.1
    # the fastest training path measured on an H100 (docs/benchmarks.md)
    assert net["attention"] == "sdpa_fold" and zim["model"]["init_args"]["optimizer"]["init_args"]["fused"]
    assert zim["model"]["init_args"]["compile"] == "default" and zim["model"]["init_args"]["channels_last"]


def test_ablation_switches_and_merged_configs(capsys: pytest.CaptureFixture):
    cfg = _resolved(
        capsys,
        "-c",
        str(CONFIGS / "trainer" / "gpu.yaml"),
        "-c",
        str(CONFIGS / "zim" / "vit_b.yaml"),
        "--model.init_args.net.init_args.masked_attention=false",
        "--model.init_args.net.init_args.pixel_decoder=sam",
        "--trainer.max_steps=1000",
    )
    net = cfg["model"]["init_args"]["net"]["init_args"]
    assert net["masked_attention"] is False and net["pixel_decoder"] == "sam"
    assert cfg["trainer"]["max_steps"] == 1000 and cfg["trainer"]["precision"] == "bf16-mixed"
    cfg = _resolved(
        capsys,
        "-c",
        str(CONFIGS / "converter" / "paper.yaml"),
        "--data.init_args.sga=false",
        "--data.init_args.stl=false",
    )
    assert cfg["data"]["init_args"]["sga"] is False and cfg["data"]["init_args"]["stl"] is False


def test_the_tiny_zim_config_builds_the_chosen_variant():
    cli = cli_main(
        [
            "-c",
            str(CONFIGS / "zim" / "tiny.yaml"),
            "--model.init_args.net.init_args.masked_attention=false",
            "--model.init_args.net.init_args.pixel_decoder=sam",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert cli.model.net.masked_attention is False and cli.model.net.pixel_decoder == "sam"
    assert cli.model.net.image_size == cli.datamodule.hparams.image_size
    # the run seed reaches the data streams
    assert cli.datamodule.seed == 0


@pytest.mark.parametrize("value", ["7", "true", "false"])
def test_any_seed_everything_value_parses_and_seeds_the_data(value, monkeypatch):
    # true draws a random run seed, false sets none (the data streams then take 0)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    cli = cli_main(
        ["-c", str(CONFIGS / "zim" / "tiny.yaml"), f"--seed_everything={value}", "--trainer.logger=false"],
        run=False,
    )
    expected = int(os.environ["PL_GLOBAL_SEED"]) if value == "true" else {"7": 7, "false": 0}[value]
    assert cli.datamodule.seed == expected


def test_ranks_take_rank_zeros_run_seed_unless_the_data_seed_is_given(monkeypatch):
    from types import SimpleNamespace

    from zim_lightning.data.datamodule import ZimDataModule

    monkeypatch.setenv("PL_GLOBAL_SEED", "1234")  # this rank's own draw of seed_everything: true
    rank_zero = SimpleNamespace(world_size=2, strategy=SimpleNamespace(broadcast=lambda value, src: 99))
    drawn, given = ZimDataModule(stage="zim"), ZimDataModule(stage="zim", seed=5)
    assert drawn.seed == 1234
    for data in (drawn, given):
        data.trainer = rank_zero
        data.setup("fit")
    assert (drawn.seed, given.seed) == (99, 5)


def test_an_explicit_data_seed_wins_over_the_run_seed():
    cli = cli_main(
        ["-c", str(CONFIGS / "zim" / "tiny.yaml"), "--data.init_args.seed=5", "--trainer.logger=false"],
        run=False,
    )
    assert cli.datamodule.seed == 5  # was silently replaced by seed_everything's 0


def test_unknown_options_are_refused(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "-c", str(CONFIGS / "zim" / "tiny.yaml"), "--model.init_args.net.init_args.bogus=1"])
    assert exit_info.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_run_configs_saved_with_the_old_build_stage_option_still_parse(capsys: pytest.CaptureFixture):
    args = ["-c", str(CONFIGS / "zim" / "tiny.yaml"), "--trainer.logger=false"]
    cli = cli_main([*args, "--data.init_args.build_shards=null"], run=False)  # what older config.yaml hold
    assert cli.datamodule.stage == "zim"
    with pytest.raises(SystemExit) as exit_info:  # a usage error, as every value the classes refuse
        cli_main([*args, "--data.init_args.build_shards=sa_000000.tar"], run=False)
    assert exit_info.value.code == 2
    assert "build_shards is no longer a ZimDataModule stage" in capsys.readouterr().err
