"""OnnxZim: an ONNX checkpoint in the official layout (here our own export of a seeded tiny ZIM) run with
onnxruntime behind ZIM's interface, in the predictor and in ``zim-lightning eval --onnx``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from zim_lightning.data.synthetic import generate
from zim_lightning.evaluate import main as eval_main
from zim_lightning.export import DECODER_FILE, ENCODER_FILE, export_onnx
from zim_lightning.models.build import zim_model_registry
from zim_lightning.onnx_zim import OnnxZim
from zim_lightning.predictor import ZimPredictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """A seeded random tiny ZIM, its weights and its export; the mask hypernetworks' last layers are
    scaled so that the mattes span [0, 1] (a random decoder's logits stay near 0)."""
    root = tmp_path_factory.mktemp("onnx_zim")
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = zim_model_registry["tiny"]().eval()
    torch.random.set_rng_state(state)
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
    torch.save(model.state_dict(), root / "tiny.pt")
    export_onnx(model, root / "onnx")
    return model, root / "tiny.pt", root / "onnx"


def test_the_predictor_gives_the_torch_networks_mattes_from_the_onnx_graphs(exported) -> None:
    model, _, folder = exported
    image = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    torch_predictor, onnx_predictor = ZimPredictor(model), ZimPredictor(OnnxZim(folder, threads=2))
    torch_predictor.set_image(image)
    onnx_predictor.set_image(image)
    box = {"box": np.array([50.0, 40.0, 300.0, 250.0])}
    points = {
        "point_coords": np.array([[100.0, 100.0], [200.0, 150.0]]),
        "point_labels": np.array([1.0, 0.0]),
    }
    alphas = []
    for prompt in (box, points):
        for multimask in (False, True):
            want, want_iou, want_low = torch_predictor.predict(multimask_output=multimask, **prompt)
            got, got_iou, got_low = onnx_predictor.predict(multimask_output=multimask, **prompt)
            assert got.shape == want.shape == (4 if multimask else 1, 300, 420)
            np.testing.assert_allclose(got, want, atol=1e-5)
            np.testing.assert_allclose(got_iou, want_iou, atol=1e-5)
            np.testing.assert_allclose(got_low, want_low, atol=1e-4)
        alphas.append(got[0])
    # mattes with both ends, and different for the two prompts: the comparison means something
    assert all(a.min() < 0.1 and a.max() > 0.9 for a in alphas)
    assert np.abs(alphas[0] - alphas[1]).max() > 0.1

    # a batch of boxes in one decoder call (the embedding of one image serves both)
    boxes = torch.tensor([[50.0, 40.0, 300.0, 250.0], [10.0, 10.0, 100.0, 90.0]])
    want = torch_predictor.predict_torch(
        None, None, boxes=torch_predictor.transform.apply_boxes_torch(boxes, (300, 420))
    )
    got = onnx_predictor.predict_torch(
        None, None, boxes=onnx_predictor.transform.apply_boxes_torch(boxes, (300, 420))
    )
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)


def test_prompt_sets_padded_with_absent_points_are_refused(exported) -> None:
    _, _, folder = exported
    onnx = OnnxZim(folder, threads=2)
    embedding, feats = onnx.encode_image(torch.zeros(1, 3, 64, 64))
    coords = torch.tensor([[[10.0, 10.0], [0.0, 0.0]]])
    with pytest.raises(ValueError, match="absent-point filler -2"):
        onnx.decode(embedding, feats, coords, torch.tensor([[1.0, -2.0]]))


def _eval(args: list[str], data: Path, out: Path) -> dict:
    argv = [*args, "--data", str(data), "--format", "micromat", "--out", str(out), "--baselines", "binary"]
    assert eval_main([*argv, "--grid-count", "0", "--accelerator", "cpu", "--num-workers", "0"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_eval_of_the_onnx_folder_scores_as_the_torch_network(exported, tmp_path: Path) -> None:
    _, weights, folder = exported
    data = generate(
        tmp_path / "synth", num_shards=1, num_images=1, matting_train=1, matting_val=1, seg=1, shard_size=1,
        micromat=2, eval_images=1, image_size=(64, 80),
    ).micromat  # fmt: skip
    from_onnx = _eval(["--onnx", str(folder)], data, tmp_path / "onnx")
    from_torch = _eval(["--model", "tiny", "--checkpoint", str(weights)], data, tmp_path / "torch")
    assert from_onnx["onnx"] == str(folder) and from_onnx["model"] == "ONNX onnx"
    assert "ONNX checkpoint `" in (tmp_path / "onnx" / "report.md").read_text()
    tables = [("zim", from_onnx["results"], from_torch["results"])]
    tables += [(m, from_onnx["baselines"][m], table) for m, table in from_torch["baselines"].items()]
    assert [method for method, _, _ in tables] == ["zim", "binary"]
    for method, got_table, want_table in tables:
        assert set(got_table) == set(want_table) == {"fine", "coarse"}
        for subset, prompts in want_table.items():
            assert set(prompts) == {"point", "box"}
            for prompt, want in prompts.items():
                got = got_table[subset][prompt]
                assert got["n"] == want["n"] > 0
                for name in ("sad", "mse", "mae", "grad", "conn"):
                    assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), (
                        method,
                        subset,
                        prompt,
                        name,
                    )


def test_folders_onnxruntime_cannot_run_and_other_model_options_are_usage_errors(
    exported, tmp_path: Path, capsys
) -> None:
    _, weights, folder = exported
    data = ["--data", str(tmp_path), "--format", "micromat", "--out", str(tmp_path / "out")]

    def refused(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            eval_main([*args, *data])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(folder / ENCODER_FILE, half / ENCODER_FILE)
    assert "has no decoder.onnx" in refused(["--onnx", str(half)])

    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    data_bytes = (truncated / ENCODER_FILE).read_bytes()
    (truncated / ENCODER_FILE).write_bytes(data_bytes[: len(data_bytes) // 3])
    assert f"onnxruntime cannot load {str(truncated / ENCODER_FILE)!r}" in refused(["--onnx", str(truncated)])

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(folder / DECODER_FILE, swapped / ENCODER_FILE)
    shutil.copy(folder / DECODER_FILE, swapped / DECODER_FILE)
    err = refused(["--onnx", str(swapped)])
    assert "is not a graph of the official layout: it lacks image, image_embeddings" in err

    assert "leave out --model, --checkpoint" in refused(
        ["--onnx", str(folder), "--model", "tiny", "--checkpoint", str(weights)]
    )


def test_sessions_follow_the_modules_device() -> None:
    from zim_lightning.onnx_zim import providers_for

    offered = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # each DDP rank's module sits on its own GPU: its sessions go there, not to GPU 0
    assert providers_for(torch.device("cuda", 3), offered) == [
        ("CUDAExecutionProvider", {"device_id": 3}),
        "CPUExecutionProvider",
    ]
    assert providers_for(torch.device("cuda"), offered)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert providers_for(torch.device("cpu"), offered) == ["CPUExecutionProvider"]
    # onnxruntime without CUDA (this machine's): the CPU, wherever the module is
    assert providers_for(torch.device("cuda", 1), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
