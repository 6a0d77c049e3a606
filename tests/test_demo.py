"""The end-to-end demo runs every stage and writes its report, metrics and pictures."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from zim_lightning.demo import main


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path: Path):
    out = tmp_path / "demo, run: 1"  # a comma and ": " in the path (shard lists are passed as JSON)
    stale = out / "sa1b_matte" / "sa_000099.tar"  # left by an earlier run with another converter
    stale.parent.mkdir(parents=True)
    with tarfile.open(stale, "w"):
        pass
    argv = ["--out", str(out), "--small-data", "--converter-steps", "2", "--zim-steps", "2"]
    assert main([*argv, "--frame", "64", "--crop-size", "64", "--num-workers", "0"]) == 0
    assert not stale.exists()  # SA1B-Matte is rebuilt from scratch, so ZIM never trains on it

    doc = json.loads((out / "metrics.json").read_text())
    # MicroMat-3K results per subset and prompt, in the eval command's layout
    for subset in ("fine", "coarse"):
        for prompt in ("box", "point"):
            assert doc["results"][subset][prompt]["n"] >= 1
            assert doc["results"][subset][prompt]["sad"] >= 0
    stages = [s["name"] for s in doc["demo"]["stages"]]
    assert stages == ["synthetic data", "converter training", "SA1B-Matte", "ZIM training", "evaluation"]
    assert doc["demo"]["stages"][2]["notes"] == "1 shards"
    for trained in (doc["demo"]["stages"][1], doc["demo"]["stages"][3]):  # both quote their val SAD
        assert "val/sad" in trained["val"] and "val SAD nan" not in trained["notes"]
    for name in ("converter", "zim"):
        assert Path(doc["demo"]["checkpoints"][name]).is_file()
    # evaluated through `eval --run-config`: the ZIM rebuilt from its run, in the run's frame
    assert doc["checkpoint"] == doc["demo"]["checkpoints"]["zim"] and doc["image_size"] == 64
    assert Path(doc["run_config"]) == Path(doc["checkpoint"]).parents[1] / "config.yaml"
    # ZIM trained on the SA1B-Matte shards the converter wrote
    zim_config = next((out / "runs" / "zim").rglob("config.yaml")).read_text()
    assert "sa1b_matte" in zim_config

    report = (out / "report.md").read_text()
    assert "SA1B-Matte" in report and "| evaluation |" in report
    eval_report = (out / "eval_report.md").read_text()  # the evaluation's own report, kept and quoted
    assert "# Matting evaluation: micromat" in eval_report and report.rstrip().endswith(eval_report.rstrip())
    grids = sorted((out / "grids").glob("*.png"))
    assert grids and all(g.stat().st_size > 0 for g in grids)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--frame", "100"], "multiple of 16"),
        (["--frame", "0"], "positive multiple of 16"),
        (["--crop-size", "0"], "positive multiple of 32"),
        (["--crop-size", "48"], "positive multiple of 32"),
        (["--converter-steps", "0"], "--converter-steps must be >= 1"),
        (["--zim-steps", "0"], "--zim-steps must be >= 1"),
        (["--seed", "-1"], "expected an integer >= 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, capsys, flags: list[str], words: str):
    # OUT lies under a plain file: arguments let through would fail at once on creating OUT, rather
    # than run the whole demo
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(blocker / "demo"), "--small-data", *flags])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]  # refused before anything was written


def test_a_folder_that_is_not_the_configs_is_refused(tmp_path: Path, capsys):
    # by the demo's own check before any data is generated, not by a later stage
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(blocker / "demo"), "--configs", str(tmp_path), "--small-data"])
    assert exit_info.value.code == 2
    assert "is not the repository's configs/ folder" in capsys.readouterr().err
