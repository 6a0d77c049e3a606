"""Tests of the ONNX export in the official layout (export.py), run with onnxruntime and with the
official ``zim_anything`` package."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import zim_lightning.export as export_module
from zim_lightning.export import (
    DECODER_FILE,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    export_onnx,
    main,
)
from zim_lightning.models.attention_mask import attention_map_from_prompts
from zim_lightning.models.build import ZIM_VARIANTS, zim_model_registry
from zim_lightning.models.zim import Zim

ATOL = 1e-4


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A seeded random tiny ZIM, exported through the CLI from a checkpoint file."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = zim_model_registry["tiny"]().eval()
    checkpoint = root / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    out = root / "onnx"
    killed = out / ".export-x1y2z3"  # what an export killed while writing leaves (SIGKILL: no clean-up)
    killed.mkdir(parents=True)
    (killed / ENCODER_FILE).write_bytes(b"half an encoder")
    (out / "notes").mkdir()  # a folder of the user's, which stays
    assert main(["--model", "tiny", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return model, out


def _image(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, 700, 1024), generator=gen, dtype=torch.uint8)


def test_layout_names_and_checker(exported) -> None:
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [DECODER_FILE, ENCODER_FILE, "notes"]  # no staging folder
    for path, inputs, outputs in (
        (out / ENCODER_FILE, ENCODER_INPUTS, ENCODER_OUTPUTS),
        (out / DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS),
    ):
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert tuple(value.name for value in model.graph.input) == inputs
        assert tuple(value.name for value in model.graph.output) == outputs
    image = onnx.load(str(out / ENCODER_FILE)).graph.input[0]
    assert [d.dim_value for d in image.type.tensor_type.shape.dim] == [1, 3, 1024, 1024]


def test_encoder_and_decoder_match_torch(exported) -> None:
    model, out = exported
    with torch.no_grad():
        x = model.preprocess(_image())
        embedding, feats = model.encode_preprocessed(x)
    encoder = _session(out / ENCODER_FILE)
    onnx_outs = encoder.run(None, {"image": x.numpy()})
    for name, ours, theirs in zip(ENCODER_OUTPUTS, (embedding, *feats), onnx_outs, strict=True):
        np.testing.assert_allclose(theirs, ours.numpy(), atol=ATOL, err_msg=name)

    decoder = _session(out / DECODER_FILE)
    # a box (2 corners), then two prompt sets of points with SAM's padding point (N = 3)
    prompts = [
        (torch.tensor([[[100.0, 150.0], [800.0, 600.0]]]), torch.tensor([[2.0, 3.0]])),
        (
            torch.tensor(
                [[[300.0, 200.0], [700.0, 650.0], [-0.5, -0.5]], [[50.0, 60.0], [0, 0], [-0.5, -0.5]]]
            ),
            torch.tensor([[1.0, 0.0, -1.0], [1.0, -1.0, -1.0]]),
        ),
    ]
    for coords, labels in prompts:
        attn = attention_map_from_prompts(coords, labels)
        with torch.no_grad():
            masks, iou = model.decode(embedding, feats, coords, labels, attn_mask=attn, multimask_output=True)
        feeds = {
            "feat_D0": feats[0].numpy(),
            "feat_D1": feats[1].numpy(),
            "feat_D2": feats[2].numpy(),
            "image_embeddings": embedding.numpy(),
            "attn_mask": attn.numpy(),
            "point_coords": coords.numpy(),
            "point_labels": labels.numpy(),
        }
        onnx_masks, onnx_iou = decoder.run(None, feeds)
        assert onnx_masks.shape == (coords.shape[0], 4, 512, 512)
        np.testing.assert_allclose(onnx_masks, masks.numpy(), atol=ATOL)
        np.testing.assert_allclose(onnx_iou, iou.numpy(), atol=ATOL)


@pytest.mark.slow
def test_sam_decoder_variant_keeps_all_seven_inputs(tmp_path) -> None:
    torch.manual_seed(1)
    model = zim_model_registry["tiny"](pixel_decoder="sam", masked_attention=False).eval()
    _, decoder_path = export_onnx(model, tmp_path)
    graph = onnx.load(str(decoder_path)).graph
    assert tuple(value.name for value in graph.input) == DECODER_INPUTS
    with torch.no_grad():
        embedding, feats = model.encode_image(_image(1))
    coords = torch.tensor([[[400.0, 300.0], [-0.5, -0.5]]])
    labels = torch.tensor([[1.0, -1.0]])
    attn = attention_map_from_prompts(coords, labels)
    with torch.no_grad():
        masks, _ = model.decode(embedding, feats, coords, labels, multimask_output=True)
    feeds = dict(zip(DECODER_INPUTS, (*feats, embedding, attn, coords, labels), strict=True))
    onnx_masks, _ = _session(decoder_path).run(None, {k: v.numpy() for k, v in feeds.items()})
    assert onnx_masks.shape == (1, 4, 256, 256)
    np.testing.assert_allclose(onnx_masks, masks.numpy(), atol=ATOL)


def test_flex_attention_exports_as_sdpa_fold_and_the_model_is_left_as_it_was(tmp_path) -> None:
    torch.manual_seed(2)
    model = zim_model_registry["tiny"](attention="flex").train()
    encoder_path, _ = export_onnx(model, tmp_path)
    assert model.training and {m.backend for m in model.modules() if hasattr(m, "backend")} == {"flex"}
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding, _ = model.eval().encode_preprocessed(image)
    onnx_embedding = _session(encoder_path).run(["image_embeddings"], {"image": image.numpy()})[0]
    np.testing.assert_allclose(onnx_embedding, embedding.numpy(), atol=ATOL)


def test_a_frame_the_official_runner_cannot_feed_is_rejected(tmp_path) -> None:
    with pytest.raises(
        ValueError, match="feeds 1024x1024 images; this model's frame is 256.*data.init_args.image_size=1024"
    ):
        export_onnx(Zim(**ZIM_VARIANTS["tiny"], image_size=256), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("opset", [13, 21, 0, "17"])
def test_an_opset_the_exporter_cannot_write_is_rejected_before_tracing(tmp_path, opset) -> None:
    # 13 has no scaled-dot-product attention; the TorchScript exporter writes up to 20
    with pytest.raises(ValueError, match=f"opset: expected an integer from 14 to 20, got {opset!r}"):
        export_onnx(Zim(**ZIM_VARIANTS["tiny"]), tmp_path / "out", opset=opset)
    assert not list(tmp_path.iterdir())


def test_attention_maps_other_than_the_runners_are_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"sigma, cell size and grid \(21, 16, 64\).* uses \(5, 16, 64\)"):
        export_onnx(Zim(**ZIM_VARIANTS["tiny"], attention_sigma=5), tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_failed_export_leaves_the_earlier_pair_as_it_was(tmp_path, monkeypatch) -> None:
    earlier = {name: f"earlier {name}".encode() for name in ("encoder.onnx", "decoder.onnx")}
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)

    def fail(*args, **kwargs):
        raise RuntimeError("decoder tracing failed")

    monkeypatch.setattr(export_module, "_dummy_decoder_inputs", fail)  # after the encoder is written
    with pytest.raises(RuntimeError, match="decoder tracing failed"):
        export_onnx(zim_model_registry["tiny"](), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == earlier  # no new encoder, no leftovers


def test_cli_rejects_an_out_that_is_a_file(tmp_path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--out", str(taken)])
    assert exc.value.code == 2 and "is a file; expected a folder" in capsys.readouterr().err


def test_cli_rejects_missing_checkpoint(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_official_runner_matches_our_predictor(exported) -> None:
    """The exported folder runs unchanged in the official zim_anything package, with our alphas."""
    from skimage.data import astronaut
    from zim_anything import ZimPredictor as OfficialPredictor
    from zim_anything import zim_model_registry as official_registry
    from zim_anything.modeling.decoder import ZIM_Decoder
    from zim_anything.modeling.encoder import ZIM_Encoder
    from zim_anything.modeling.zim import Zim as OfficialZim

    from zim_lightning.predictor import ZimPredictor

    model, out = exported
    image = np.ascontiguousarray(astronaut()[:, 40:])  # 512x472 RGB: non-square, upscaled to 1024
    # The documented entry point loads the folder ...
    assert official_registry["vit_b"](checkpoint=str(out)).num_mask_tokens == 4
    # ... and predictions run through the same official classes, built with this machine's core count:
    # the registry's hard-coded 16 onnxruntime threads make a 2-core box several times slower.
    threads = os.cpu_count() or 1
    official = OfficialPredictor(
        OfficialZim(
            ZIM_Encoder(str(out / ENCODER_FILE), num_threads=threads),
            ZIM_Decoder(str(out / DECODER_FILE), num_threads=threads),
        )
    )
    official.set_image(image)
    ours = ZimPredictor(model)
    ours.set_image(image)

    box = np.array([100, 50, 400, 480], dtype=np.float32)
    points = np.array([[200, 200], [300, 400]], dtype=np.float32)
    labels = np.array([1, 0], dtype=np.float32)
    alphas = []
    for prompt in ({"box": box}, {"point_coords": points, "point_labels": labels}):
        theirs, _, _ = official.predict(**prompt, multimask_output=False)
        mine, _, _ = ours.predict(**prompt, multimask_output=False)
        assert theirs.shape == mine.shape == (1, *image.shape[:2])
        np.testing.assert_allclose(mine, theirs, atol=1e-3)
        alphas.append(mine)
    # the comparison is not vacuous: the two prompts give different mattes
    assert np.abs(alphas[0] - alphas[1]).max() > 1e-2


def test_export_leaves_an_eval_model_in_eval_mode(tmp_path: Path) -> None:
    from zim_lightning.export import export_onnx
    from zim_lightning.models.build import zim_model_registry

    torch.manual_seed(0)
    model = zim_model_registry["tiny"]().eval()
    export_onnx(model, tmp_path)
    assert not model.training and not any(m.training for m in model.modules())


# ---------------------------------------------------------------- speed / lit
