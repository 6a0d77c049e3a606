"""Arguments every command checks the same way before any work (command_checks.py): an output folder
that cannot be one, a device this machine does not have, and what an early refusal must keep."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zim_lightning.automatic import main as matte_all
from zim_lightning.command_checks import out_folder_problem
from zim_lightning.data.pack import main as pack_shards
from zim_lightning.data.synthetic import generate
from zim_lightning.evaluate import main as evaluate
from zim_lightning.export import main as export_onnx
from zim_lightning.matte_cli import main as matte
from zim_lightning.serve.server import main as serve


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """An image, an alpha folder pair for pack-shards, and a plain file where a folder is expected."""
    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    (tmp_path / "alphas").mkdir()
    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(tmp_path / "alphas" / "photo.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return {"image": image, "images": tmp_path, "alphas": tmp_path / "alphas", "file": blocker}


def test_out_folder_problem_names_the_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert out_folder_problem(tmp_path / "new" / "deeper") is None  # made when missing
    assert out_folder_problem(tmp_path) is None
    assert "is a file; expected a folder" in out_folder_problem(blocker)
    assert f"{str(blocker)!r} is a file" in out_folder_problem(blocker / "sub" / "out")


COMMANDS = {
    "matte": lambda i, out: matte([str(i["image"]), "--box", "1,1,20,20", "--model", "tiny", "--out", out]),
    "matte-all": lambda i, out: matte_all([str(i["image"]), "--model", "tiny", "--out", out]),
    "export-onnx": lambda i, out: export_onnx(["--model", "tiny", "--out", out]),
    "pack-shards": lambda i, out: pack_shards(["--images", str(i["images"]), "--alphas", str(i["alphas"]), "--out", out]),
    "eval": lambda i, out: evaluate(["--model", "tiny", "--data", str(i["images"]), "--format", "micromat", "--out", out]),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_out_under_a_file_is_a_usage_error_naming_it(inputs, command: str, capsys) -> None:
    for out in (inputs["file"], inputs["file"] / "sub"):
        with pytest.raises(SystemExit) as exit_info:
            COMMANDS[command](inputs, str(out))
        assert exit_info.value.code == 2
        assert str(inputs["file"]) in capsys.readouterr().err
    assert inputs["file"].read_text() == "not a folder"


@pytest.mark.parametrize("command", ["matte", "matte-all", "serve"])
@pytest.mark.parametrize("device", ["nonsense", "cuda:7"])
def test_a_device_this_machine_lacks_is_a_usage_error(
    inputs, tmp_path, command: str, device: str, capsys
) -> None:
    out = str(tmp_path / "out")
    run = {
        "matte": lambda: matte([str(inputs["image"]), "--box", "1,1,20,20", "--model", "tiny", "--out", out, "--device", device]),
        "matte-all": lambda: matte_all([str(inputs["image"]), "--model", "tiny", "--out", out, "--device", device]),
        "serve": lambda: serve(["--model", "tiny", "--port", "0", "--device", device]),
    }[command]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    assert f"--device {device!r}: not a device this machine can run on" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_serve_on_a_taken_port_is_a_usage_error(capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            serve(["--model", "tiny", "--port", str(port), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert f"--host 127.0.0.1 --port {port}: cannot listen there" in capsys.readouterr().err


@pytest.fixture(scope="module")
def micromat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sizes = {
        "num_shards": 1,
        "num_images": 1,
        "matting_train": 1,
        "matting_val": 1,
        "seg": 1,
        "shard_size": 1,
    }
    return generate(
        tmp_path_factory.mktemp("synth"), micromat=2, eval_images=1, image_size=(64, 64), **sizes
    ).micromat


def test_eval_refused_for_a_bad_trainer_option_keeps_the_earlier_results(micromat, tmp_path, capsys) -> None:
    # the Trainer's own checks (precision, accelerator, nodes) and the datamodule's run before an
    # earlier run's figures in --out are cleared, not after
    out = tmp_path / "eval"
    (out / "grids").mkdir(parents=True)
    earlier = {
        name: f"earlier {name}" for name in ("metrics.json", "instances.csv", "report.md", "grids/a.png")
    }
    for name, text in earlier.items():
        (out / name).write_text(text)
    for bad in (
        ["--precision", "foo"],
        ["--accelerator", "foo"],
        ["--num-nodes", "0"],
        ["--num-workers", "-1"],
    ):
        argv = ["--model", "tiny", "--data", str(micromat), "--format", "micromat", "--out", str(out)]
        with pytest.raises(SystemExit) as exit_info:
            evaluate([*argv, *bad])
        assert exit_info.value.code == 2, bad
        assert "Traceback" not in capsys.readouterr().err
        assert {name: (out / name).read_text() for name in earlier} == earlier
