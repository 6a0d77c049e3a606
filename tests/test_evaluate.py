"""`zim-lightning eval` end to end on the synthetic MicroMat-3K and AIM-500 folders (tiny ZIM, random
weights): the files it writes, and its numbers recomputed from the saved 16-bit predictions by an
independent NumPy implementation of the metrics."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_metrics import _ref_conn
from zim_lightning.data.synthetic import generate
from zim_lightning.evaluate import main, write_grids

METRICS = ("sad", "mse", "mae", "grad", "conn")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    return generate(
        tmp_path_factory.mktemp("synth"),
        seed=0,
        num_shards=1,
        num_images=1,
        matting_train=1,
        matting_val=1,
        seg=1,
        shard_size=1,
        micromat=4,
        eval_images=2,
        image_size=(64, 80),
    )


@pytest.fixture(scope="module")
def micromat_run(synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    code = main(
        [
            "--model", "tiny",
            "--data", str(synthetic.micromat),
            "--format", "micromat",
            "--prompt", "both",
            "--out", str(out),
            "--save-predictions",
            "--baselines", "binary,closed_form",
            "--grid-count", "2",
            "--accelerator", "cpu",
            "--num-workers", "0",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def _read_png(path: Path, levels: float) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64) / levels


def _np_paper_errors(p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """The paper protocol in plain NumPy: sums and means, Sobel by slicing a zero-padded array."""

    def sobel(a: np.ndarray) -> np.ndarray:
        z = np.pad(a, 1)
        sx = (z[:-2, 2:] + 2 * z[1:-1, 2:] + z[2:, 2:]) - (z[:-2, :-2] + 2 * z[1:-1, :-2] + z[2:, :-2])
        sy = (z[2:, :-2] + 2 * z[2:, 1:-1] + z[2:, 2:]) - (z[:-2, :-2] + 2 * z[:-2, 1:-1] + z[:-2, 2:])
        return np.sqrt(sx**2 + sy**2 + 1e-8)

    d = p - g
    return {
        "sad": np.abs(d).sum() / 1000,
        "mse": (d**2).mean() * 1000,
        "mae": np.abs(d).mean() * 1000,
        "grad": np.abs(sobel(p) - sobel(g)).mean() * 1000,
        "conn": _ref_conn(p, g) / 1000,
    }


def _data_list(root: Path) -> list[list[str]]:
    return [line.split() for line in (root / "data_list.txt").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_eval_writes_metrics_equal_to_those_recomputed_from_saved_predictions(
    synthetic, micromat_run
) -> None:
    out, root = micromat_run, synthetic.micromat
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["protocol"] == "paper" and doc["model"] == "tiny" and doc["prediction_bits"] == 16
    lines = _data_list(root)
    for subset in ("fine", "coarse"):
        mattes = [m for _, m, _, _ in lines if m.split("/")[1] == subset]
        for prompt in ("point", "box"):
            reported = doc["results"][subset][prompt]
            assert reported["n"] == len(mattes) > 0
            per = []
            for matte in mattes:
                saved = out / "predictions" / prompt / matte
                assert Image.open(saved).mode.startswith("I")  # a 16-bit PNG
                per.append(_np_paper_errors(_read_png(saved, 65535.0), _read_png(root / matte, 255.0)))
            for name in METRICS:
                assert reported[name] == pytest.approx(np.mean([e[name] for e in per]), rel=1e-9), (
                    subset,
                    prompt,
                    name,
                )
            buckets = doc["buckets"][subset][prompt]
            assert sum(buckets[b]["n"] for b in "SML") == len(mattes)

    # The binary baseline is a binary matte, scored like ZIM and saved beside it.
    for prompt in ("point", "box"):
        matte = lines[0][1]
        binary = _read_png(out / "baselines/binary/predictions" / prompt / matte, 65535.0)
        assert set(np.unique(binary)) <= {0.0, 1.0}
        assert (out / "baselines/closed_form/predictions" / prompt / matte).is_file()
    for method in ("binary", "closed_form"):
        for subset in ("fine", "coarse"):
            assert set(doc["baselines"][method][subset]) == {"point", "box"}
            assert doc["baselines"][method][subset]["box"]["n"] == doc["results"][subset]["box"]["n"]
            assert set(doc["baseline_buckets"][method][subset]["box"]) == {"S", "M", "L"}


@pytest.mark.slow
def test_eval_report_instances_and_grids(synthetic, micromat_run) -> None:
    out = micromat_run
    doc = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert "| Method | Prompt | fine SAD | fine MSE | fine MAE | fine Grad | fine Conn | coarse SAD" in report
    zim_box = doc["results"]["fine"]["box"]
    assert f"| zim | box | {zim_box['sad']:.3f} | {zim_box['mse']:.3f} | {zim_box['mae']:.3f} |" in report
    assert "| closed_form | point |" in report and "| binary | box | coarse | S |" in report
    # the paper's ViT-B figures under the results, in the same columns (SAM's: fine box only)
    assert (
        "| ZIM ViT-B | box | 9.961 | 1.893 | 3.426 | 4.813 | 9.655 | 1.860 | 0.448 | 0.659 | 1.281 | 1.807 |"
        in report
    )
    assert "| SAM ViT-B | box | 36.086 | 11.057 | 12.714 | 14.867 | 35.834 | - | - | - | - | - |" in report

    with (out / "instances.csv").open() as f:
        rows = list(csv.DictReader(f))
    instances = len(_data_list(synthetic.micromat))
    assert len(rows) == 3 * 2 * instances  # methods x prompts x instances
    fine_box = [
        float(r["sad"]) for r in rows if (r["method"], r["prompt"], r["subset"]) == ("zim", "box", "fine")
    ]
    assert np.mean(fine_box) == pytest.approx(zim_box["sad"], rel=1e-6)

    for prompt in ("point", "box"):
        for kind in ("best", "worst"):
            grid = out / "grids" / f"zim_{prompt}_{kind}.png"
            assert f"grids/zim_{prompt}_{kind}.png" in report
            image = np.asarray(Image.open(grid))
            # two instances, three panels side by side (64x80 images shown 192 px high, 240 wide)
            assert image.shape[2] == 3 and image.shape[1] == 3 * 240 and image.shape[0] == 2 * (192 + 4)


@pytest.mark.slow
def test_grids_without_saved_predictions_predict_the_scored_alphas_again(
    synthetic, micromat_run, tmp_path: Path
) -> None:
    out = tmp_path / "unsaved"
    shutil.copytree(micromat_run, out)  # into the folder of a run that saved its predictions
    argv = ["--model", "tiny", "--data", str(synthetic.micromat), "--format", "micromat", "--out", str(out)]
    argv += ["--baselines", "binary,closed_form", "--grid-count", "2", "--accelerator", "cpu"]
    assert main([*argv, "--num-workers", "0"]) == 0
    # the earlier run's predictions are gone: they would not be this run's, which metrics.json states
    assert not (out / "predictions").exists() and not (out / "baselines").exists()
    for grid in sorted((micromat_run / "grids").iterdir()):  # the run that read its saved predictions
        assert np.array_equal(np.asarray(Image.open(out / "grids" / grid.name)), np.asarray(Image.open(grid)))


def _stock_sam_checkpoint(path: Path) -> torch.nn.Module:
    """segment-anything's own tiny Sam, random weights, saved as a SAM checkpoint; its mask logits are
    spread (the hypernetworks' last layers x30) so that its masks are neither empty nor full."""
    from zim_lightning.benchmarking import build_stock_sam

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    sam = build_stock_sam("tiny").eval()
    torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
    torch.save(sam.state_dict(), path)
    return sam


def test_eval_of_a_sam_checkpoint_scores_sampredictors_masks_as_the_binary_baseline(
    synthetic, tmp_path: Path
) -> None:
    # The paper's SAM rows, as the evaluation code released with ZIM computes them: SamPredictor's masks
    # (multimask_output=False) for each instance's points, then for its box.
    from segment_anything import SamPredictor

    sam = _stock_sam_checkpoint(tmp_path / "sam_tiny.pth")
    out = tmp_path / "eval"
    argv = [
        "--model",
        "tiny",
        "--sam-checkpoint",
        str(tmp_path / "sam_tiny.pth"),
        "--data",
        str(synthetic.micromat),
    ]
    argv += ["--format", "micromat", "--out", str(out), "--save-predictions", "--baselines", "binary"]
    assert main([*argv, "--grid-count", "0", "--accelerator", "cpu", "--num-workers", "0"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["sam_checkpoint"] == str(tmp_path / "sam_tiny.pth") and doc["checkpoint"] is None
    assert "SAM checkpoint `" in (out / "report.md").read_text()

    root, predictor, coverage = synthetic.micromat, SamPredictor(sam), []
    for image, matte, prompt_file, _ in _data_list(root):
        predictor.set_image(np.asarray(Image.open(root / image).convert("RGB")))
        prompt = json.loads((root / prompt_file).read_text())
        points = np.asarray(prompt["point"], dtype=np.float64)
        for mode, given in (
            ("point", {"point_coords": points[:, :2], "point_labels": points[:, 2]}),
            ("box", {"box": np.asarray(prompt["bbox"], dtype=np.float64)}),
        ):
            masks, _, _ = predictor.predict(multimask_output=False, **given)
            saved = _read_png(out / "baselines/binary/predictions" / mode / matte, 65535.0)
            np.testing.assert_array_equal(saved, masks[0].astype(np.float64), err_msg=f"{matte} {mode}")
            coverage.append(masks[0].mean())
    assert 0.0 < min(coverage) and max(coverage) < 1.0  # masks with an edge: the comparison means something


def test_sam_checkpoint_options_that_cannot_run_sam_are_usage_errors(
    synthetic, tmp_path: Path, capsys
) -> None:
    sam_path = tmp_path / "sam_tiny.pth"
    _stock_sam_checkpoint(sam_path)
    data = ["--data", str(synthetic.micromat), "--format", "micromat", "--out", str(tmp_path / "out")]

    def refused(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *data])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "--sam-checkpoint needs --model" in refused(["--sam-checkpoint", str(sam_path)])
    assert "--pixel-decoder hierarchical would leave that decoder with random weights" in refused(
        ["--model", "tiny", "--sam-checkpoint", str(sam_path), "--pixel-decoder", "hierarchical"]
    )
    missing = tmp_path / "sam_vit_b.pth"
    assert f"--sam-checkpoint {str(missing)!r} does not exist" in refused(
        ["--model", "tiny", "--sam-checkpoint", str(missing)]
    )
    assert "not allowed with argument --checkpoint" in refused(
        ["--model", "tiny", "--checkpoint", str(sam_path), "--sam-checkpoint", str(sam_path)]
    )
    # a checkpoint of another size: the loader's error, as a usage message naming the file
    assert f"SAM checkpoint {str(sam_path)!r} does not match" in refused(
        ["--model", "vit_b", "--sam-checkpoint", str(sam_path)]
    )


@pytest.mark.parametrize("devices", ["abc", "0", "-2"])
def test_bad_devices_are_a_usage_error(synthetic, tmp_path: Path, capsys, devices: str) -> None:
    argv = [
        "--model",
        "tiny",
        "--data",
        str(synthetic.micromat),
        "--format",
        "micromat",
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--devices", devices])
    assert exit_info.value.code == 2 and "--devices: expected a positive number" in capsys.readouterr().err


def test_write_grids_with_count_zero_writes_nothing_and_rejects_unknown_metrics(tmp_path: Path) -> None:
    # count 0 must return before touching the module or the dataset (None here would raise).
    assert write_grids(tmp_path, None, None, count=0, saved=False) == []
    assert not (tmp_path / "grids").exists()
    with pytest.raises(ValueError, match="count must be >= 0"):
        write_grids(tmp_path, None, None, count=-1, saved=False)
    with pytest.raises(ValueError, match="rank_by must be one of"):
        write_grids(tmp_path, None, None, count=1, saved=False, rank_by="psnr")


def test_the_worst_grid_shows_the_instances_with_the_largest_error(tmp_path: Path) -> None:
    import torch

    predicted = {0: 0.1, 1: 0.9}  # instance 1 has the larger SAD, and a bright matte

    class Module:
        # per instance: index, then sad, mse, mae, grad, conn
        instance_rows = {"zim": {"box": {"all": torch.tensor([[0, 1.0, 0, 0, 0, 0], [1, 9.0, 0, 0, 0, 0]])}}}

        def predict_instance(self, item, methods):
            return {"zim": {"box": torch.full((8, 8), predicted[item["index"]], dtype=torch.float64)}}

    dataset = [
        {
            "index": i,
            "key": f"k{i}",
            "matte_relpath": f"matte/k{i}.png",
            "image": np.zeros((8, 8, 3), np.uint8),
            "alpha": np.zeros((8, 8)),
            "prompt": {"box": np.array([1, 1, 6, 6], np.float32)},
        }
        for i in (0, 1)
    ]
    paths = write_grids(tmp_path, Module(), dataset, count=1, saved=False)
    brightness = {p.stem: np.asarray(Image.open(p)).mean() for p in paths}
    assert brightness["zim_box_worst"] > brightness["zim_box_best"] + 20


def test_grids_read_saved_predictions_however_faint(tmp_path: Path) -> None:
    import cv2
    import torch

    from zim_lightning.evaluate import prediction_path

    class Module:
        instance_rows = {"zim": {"box": {"all": torch.tensor([[0, 1.0, 0, 0, 0, 0]])}}}

    item = {"index": 0, "key": "k0", "matte_relpath": "matte/k0.png", "image": np.zeros((8, 8, 3), np.uint8)}
    item |= {"alpha": np.zeros((8, 8)), "prompt": {"box": np.array([1, 1, 6, 6], np.float32)}}
    path = prediction_path(tmp_path, "zim", "box", item["matte_relpath"])
    path.parent.mkdir(parents=True)
    cv2.imwrite(str(path), np.full((8, 8), 200, np.uint16))  # alpha 0.003 everywhere: a model's output
    assert [p.stem for p in write_grids(tmp_path, Module(), [item], count=1, saved=True)] == [
        "zim_box_best",
        "zim_box_worst",
    ]


@pytest.mark.slow
def test_eval_dim_protocol_on_aim500_uses_the_trimap(synthetic, tmp_path: Path) -> None:
    out = tmp_path / "dim"
    code = main(
        [
            "--model", "tiny",
            "--data", str(synthetic.aim500),
            "--format", "aim500",
            "--prompt", "box",
            "--protocol", "dim",
            "--out", str(out),
            "--save-predictions",
            "--grid-count", "0",
            "--accelerator", "cpu",
            "--num-workers", "0",
        ]
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert (
        doc["protocol"] == "dim" and set(doc["results"]) == {"all"} and set(doc["results"]["all"]) == {"box"}
    )
    sads, mses = [], []
    for mask in sorted((synthetic.aim500 / "mask").iterdir()):
        p = _read_png(out / "predictions/box/mask" / mask.name, 65535.0)
        g = _read_png(mask, 255.0)
        unknown = np.asarray(Image.open(synthetic.aim500 / "trimap" / mask.name)) == 128
        sads.append(np.abs(p - g)[unknown].sum() / 1000)
        mses.append(((p - g) ** 2)[unknown].mean())
    assert doc["results"]["all"]["box"]["sad"] == pytest.approx(np.mean(sads), rel=1e-9)
    assert doc["results"]["all"]["box"]["mse"] == pytest.approx(np.mean(mses), rel=1e-9)
    assert not (out / "grids").exists()
    assert "| Paper | Prompt |" not in (out / "report.md").read_text()  # MicroMat-3K figures, paper protocol


def test_eval_on_folders_scores_as_on_the_shipped_layout(synthetic, tmp_path: Path, capsys) -> None:
    # AIM-500's folders under PPM-100-like names: the same instances, prompts, predictions and metrics
    root = tmp_path / "renamed"
    for old, new in {"original": "image", "mask": "matte", "trimap": "tri"}.items():
        shutil.copytree(synthetic.aim500 / old, root / new)
    common = ["--model", "tiny", "--prompt", "both", "--protocol", "dim", "--save-predictions"]
    common += ["--grid-count", "0", "--accelerator", "cpu", "--num-workers", "0"]
    shipped, folders = tmp_path / "shipped", tmp_path / "folders"
    assert main([*common, "--data", str(synthetic.aim500), "--format", "aim500", "--out", str(shipped)]) == 0
    argv = [*common, "--data", str(root), "--format", "folders", "--out", str(folders)]
    assert main([*argv, "--layout", "image", "matte", "tri"]) == 0
    ours, theirs = (json.loads((out / "metrics.json").read_text()) for out in (folders, shipped))
    assert ours["results"] == theirs["results"] and ours["buckets"] == theirs["buckets"]
    assert ours["format"] == "folders" and ours["layout"] == ["image", "matte", "tri"]
    for mask in sorted((synthetic.aim500 / "mask").iterdir()):
        saved = (folders / "predictions/box/matte" / mask.name).read_bytes()
        assert saved == (shipped / "predictions/box/mask" / mask.name).read_bytes()
    # the layout is the folders format's, and that format needs it: usage errors before anything runs
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--out", str(tmp_path / "none")])
    assert "format 'folders' needs its layout" in capsys.readouterr().err
    shipped_argv = [*common, "--data", str(synthetic.aim500), "--format", "aim500", "--out"]
    with pytest.raises(SystemExit):
        main([*shipped_argv, str(tmp_path / "none"), "--layout", "original", "mask"])
    assert "layout is for format 'folders' only" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_dim_protocol_refuses_trimaps_for_only_some_instances(synthetic, tmp_path: Path, capsys) -> None:
    root = tmp_path / "aim500"
    shutil.copytree(synthetic.aim500, root)
    missing = sorted((root / "trimap").iterdir())[0]
    missing.unlink()
    argv = ["--model", "tiny", "--data", str(root), "--format", "aim500", "--prompt", "box", "--out"]
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "o"), "--protocol", "dim"])
    assert f"1 of 2 instances have no trimap (e.g. {missing.stem})" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # every trimap again, one without an unknown region: refused before anything runs
    shutil.copy(synthetic.aim500 / "trimap" / missing.name, missing)
    Image.fromarray(np.full((64, 80), 255, np.uint8)).save(missing)
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "o"), "--protocol", "dim"])
    assert f"--protocol dim: aim500 instance '{missing.stem}': trimap" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_eval_on_more_ranks_than_instances_scores_and_saves_each_once(synthetic, tmp_path: Path) -> None:
    # One AIM-500 image on two ranks: rank 1 has no instance of its own, so it repeats rank 0's (an
    # empty loader on one rank of two is refused by Lightning and stalls the other rank's metric sync).
    root = tmp_path / "aim500"
    stem = sorted(p.stem for p in (synthetic.aim500 / "mask").iterdir())[0]
    for folder in ("original", "mask", "trimap"):
        for path in (synthetic.aim500 / folder).glob(f"{stem}.*"):
            (root / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / folder / path.name)
    out = tmp_path / "out"
    # Lightning starts the second rank by rerunning this command, so eval runs as a command
    command = [sys.executable, "-m", "zim_lightning", "eval", "--model", "tiny", "--data", str(root)]
    command += ["--format", "aim500", "--prompt", "box", "--out", str(out), "--save-predictions"]
    command += ["--grid-count", "0", "--num-workers", "0", "--accelerator", "cpu", "--devices", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["results"]["all"]["box"]["n"] == 1
    with open(out / "instances.csv", newline="") as handle:
        assert [row["key"] for row in csv.DictReader(handle)] == [stem]
    assert [p.name for p in (out / "predictions/box/mask").iterdir()] == [f"{stem}.png"]


@pytest.mark.slow  # an evaluation in a subprocess, stopped by a signal
def test_an_eval_stopped_by_sigterm_to_its_process_group_exits_143_and_writes_no_metrics(
    synthetic, tmp_path: Path
) -> None:
    # SLURM's preemption, `timeout` and `kill -- -PGID` signal the DataLoader workers too, and PyTorch's
    # check for dead workers then fails the evaluation (exit 1). The signal is sent from the first test
    # step, so it lands mid-evaluation every time.
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--data", str(synthetic.micromat), "--format", "micromat", "--out", str(out)]
    argv += ["--accelerator", "cpu", "--num-workers", "1", "--grid-count", "0"]
    script = (
        "import os, signal, sys\n"
        "from zim_lightning.evaluate import main\n"
        "from zim_lightning.lit.eval_module import EvalModule\n"
        "step = EvalModule.test_step\n"
        "def preempted(self, batch, batch_idx):\n"
        "    if batch_idx == 0:\n"
        "        handler = signal.getsignal(signal.SIGTERM)\n"
        "        print('wrapped:', getattr(handler, 'expects_worker_deaths', False), file=sys.stderr)\n"
        "        os.killpg(os.getpgid(0), signal.SIGTERM)\n"
        "    return step(self, batch, batch_idx)\n"
        "EvalModule.test_step = preempted\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        start_new_session=True,
    )
    assert result.returncode == 143, result.stderr[-3000:]
    assert "stopped by SIGTERM" in result.stderr and not (out / "metrics.json").exists()
    assert "wrapped: True" in result.stderr  # the dead-worker check stops on the signal (preemption.py)


def test_an_eval_failing_after_a_sigterm_stops_as_preempted_and_other_failures_raise(
    synthetic, tmp_path: Path, monkeypatch
) -> None:
    # After the signal, the evaluation can fail in other ways than Lightning's stop: on the DataLoader
    # workers it killed (a RuntimeError, a ConnectionResetError), or on a rank it stopped.
    import lightning as L

    def failing(received_sigterm: bool):
        def test(self, *args, **kwargs):
            self._signal_connector.received_sigterm = received_sigterm
            raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")

        return test

    out = tmp_path / "out"
    argv = ["--model", "tiny", "--data", str(synthetic.micromat), "--format", "micromat", "--out", str(out)]
    argv += ["--accelerator", "cpu", "--num-workers", "0", "--grid-count", "0"]
    monkeypatch.setattr(L.Trainer, "test", failing(received_sigterm=False))
    with pytest.raises(RuntimeError, match="exited unexpectedly"):  # no SIGTERM: a failure as it is
        main(argv)
    monkeypatch.setattr(L.Trainer, "test", failing(received_sigterm=True))
    assert main(argv) == 143 and not (out / "metrics.json").exists()


def test_eval_names_the_instance_of_a_missing_file(synthetic, tmp_path: Path, capsys) -> None:
    root = tmp_path / "micromat"
    root.mkdir()
    (root / "data_list.txt").write_text((synthetic.micromat / "data_list.txt").read_text())
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--data", str(root), "--format", "micromat", "--out", str(tmp_path / "o")])
    assert "data_list.txt line 1: img/0001.png does not exist" in capsys.readouterr().err


def test_a_run_that_fails_midway_names_the_file_and_leaves_no_earlier_figures(
    synthetic, tmp_path: Path
) -> None:
    from zim_lightning.data.micromat import EvalDataError

    root = tmp_path / "micromat"
    shutil.copytree(synthetic.micromat, root)
    first_image = root / (root / "data_list.txt").read_text().split()[0]
    first_image.write_bytes(first_image.read_bytes()[:-40])  # its header still reads
    out = tmp_path / "out"
    out.mkdir()
    earlier = ("metrics.json", "instances.csv", "report.md", "baselines/binary/x.png", "grids/box_worst.png")
    for name in earlier:  # an earlier run's figures
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("earlier")
    argv = ["--model", "tiny", "--data", str(root), "--format", "micromat", "--out", str(out)]
    with pytest.raises(EvalDataError, match=rf"line 1: cannot decode image {first_image.name}"):
        main([*argv, "--prompt", "box", "--num-workers", "0", "--accelerator", "cpu"])
    assert not [name for name in earlier if (out / name).exists()]
    assert not (out / "baselines").exists() and not (out / "grids").exists()


@pytest.mark.parametrize(("devices", "strategy"), [("1", "SingleDeviceStrategy"), ("2", "DDPStrategy")])
def test_eval_runs_ddp_only_on_several_devices(tmp_path: Path, devices: str, strategy: str) -> None:
    from zim_lightning.evaluate import _datamodule_and_trainer, _parser

    parser = _parser()
    args = parser.parse_args(
        ["--model", "tiny", "--data", str(tmp_path), "--format", "micromat", "--out", str(tmp_path / "out")]
        + ["--accelerator", "cpu", "--devices", devices]
    )
    _, trainer = _datamodule_and_trainer(parser, args, [])
    assert type(trainer.strategy).__name__ == strategy


def test_a_second_eval_into_an_out_that_a_running_one_holds_is_refused_and_deletes_nothing(
    synthetic, tmp_path: Path, capsys
) -> None:
    from zim_lightning.output_lock import OutputLock

    out = tmp_path / "out"
    running = OutputLock(
        out, job="eval"
    )  # a running evaluation's rank 0 (another open file: flock conflicts)
    assert running.acquire() is None
    prediction = out / "predictions" / "box" / "matte" / "fine" / "0001_1.png"
    prediction.parent.mkdir(parents=True)
    prediction.write_bytes(b"the running evaluation's")
    argv = ["--model", "tiny", "--data", str(synthetic.micromat), "--format", "micromat", "--out", str(out)]
    argv += ["--prompt", "box", "--num-workers", "0", "--accelerator", "cpu", "--grid-count", "0"]
    try:
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2
        assert f'another eval is writing into {out} (holder: {{"host"' in capsys.readouterr().err
        assert prediction.read_bytes() == b"the running evaluation's"
    finally:
        running.release()
    build = OutputLock(out)  # once it has ended (a build's lock is another job's: no obstacle)
    assert build.acquire() is None
    try:
        assert main(argv) == 0
    finally:
        build.release()
    assert not prediction.exists() and (out / "metrics.json").is_file()
    (out / "metrics.json").unlink()
    (out / "metrics.json").mkdir()  # an earlier result that cannot be removed: every rank stops, none waits
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2 and "cannot remove an earlier run's results" in capsys.readouterr().err


def test_closed_form_baseline_keeps_the_masks_foreground_as_foreground() -> None:
    from zim_lightning.lit.eval_module import closed_form_alpha

    image = np.zeros((24, 24, 3), np.uint8)
    image[:, :12] = 255
    mask = np.zeros((24, 24), bool)
    mask[:, :12] = True
    alpha = closed_form_alpha(image, mask, radius=2, max_side=None)
    assert alpha[:, :8].mean() > 0.95 and alpha[:, 16:].mean() < 0.05


@pytest.fixture(scope="module")
def instance_and_predictor():
    """A MicroMat-style instance (an asymmetric point prompt with a negative point, and a box) and the
    predictor of the tiny random network it is evaluated with."""
    from zim_lightning.models import zim_model_registry
    from zim_lightning.predictor import ZimPredictor

    torch.manual_seed(0)
    net = zim_model_registry["tiny"]().eval()
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    image[8:30, 10:40] = (200, 40, 40)
    alpha = np.zeros((40, 56), np.float64)
    alpha[:, :28] = 1.0  # half the image: the instance's size bucket is by this, not the prediction
    item = {
        "image": image,
        "alpha": alpha,
        "trimap": None,
        "prompt": {
            "points": np.array([[30.0, 12.0, 1.0], [5.0, 35.0, 0.0]], np.float32),  # (X, Y, label)
            "box": np.array([6.0, 9.0, 45.0, 33.0], np.float32),  # (x1, y1, x2, y2)
        },
        "subset": "all",
        "key": "k0",
        "matte_relpath": "m/k0.png",
        "index": 7,
    }
    predictor = ZimPredictor(net)
    predictor.set_image(image)
    return net, predictor, item


def test_eval_predicts_what_the_predictor_gives_for_the_instances_prompts(instance_and_predictor) -> None:
    from zim_lightning.lit.eval_module import EvalModule

    net, predictor, item = instance_and_predictor
    out = EvalModule(net=net, baselines=["binary"], quantize_bits=0).predict_instance(item)
    points = item["prompt"]["points"]
    expected = {
        "point": predictor.predict(points[:, :2], points[:, 2], multimask_output=False)[0][0],
        "box": predictor.predict(box=item["prompt"]["box"], multimask_output=False)[0][0],
    }
    for prompt, alpha in expected.items():
        np.testing.assert_allclose(out["zim"][prompt].numpy(), alpha, atol=1e-6)
        # the binary baseline is SAM's mask: alpha > 0.5
        np.testing.assert_array_equal(out["binary"][prompt].numpy(), (alpha > 0.5).astype(np.float64))


def test_eval_sizes_instances_by_the_ground_truth(instance_and_predictor) -> None:
    from zim_lightning.lit.eval_module import EvalModule
    from zim_lightning.metrics import foreground_fraction

    net, _, item = instance_and_predictor
    module = EvalModule(net=net, baselines=[], quantize_bits=0)
    module.on_test_epoch_start()
    module.test_step([item], 0)
    rows = module.metrics["zim__box__all"].instances()
    assert rows[:, 0].tolist() == [7.0]  # the instance's index
    assert rows[0, -1].item() == foreground_fraction(torch.from_numpy(item["alpha"])) == 0.5
