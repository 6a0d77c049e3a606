"""Edges of the user-facing inference contracts (found unguarded by a mutation round): the predictor's
prompt validation at its edges, mixed box / point batches and integer images; the ONNX export's literal
output names, dynamic output batch, re-declared inputs and default opset. (The automatic generator's are in
tests/test_automatic.py.) All fast: the tiny network encodes one small image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import zim_lightning.export as export_module
from zim_lightning.models.build import zim_model_registry
from zim_lightning.predictor import ZimPredictor

HEIGHT, WIDTH = 60, 90


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return zim_model_registry["tiny"]().eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    img[0, 0] = 255  # an integer copy of it then holds the value 255
    return img


@pytest.fixture(scope="module")
def predictor(net, image) -> ZimPredictor:
    p = ZimPredictor(net)
    p.set_image(image)
    return p


# ------------------------------------------------------------------------------------------ predictor
def test_box_edges_and_forms(predictor: ZimPredictor) -> None:
    # x2 >= x1 is the rule: a zero-width (or zero-height) box is a valid prompt
    assert predictor.predict(box=np.array([10, 10, 10, 40]), multimask_output=False)[0].shape == (
        1,
        HEIGHT,
        WIDTH,
    )
    assert predictor.predict(box=np.array([10, 20, 40, 20]), multimask_output=False)[0].shape == (
        1,
        HEIGHT,
        WIDTH,
    )
    # inclusive pixel boxes: x2 = 0 still covers column 0; x1 = W or y1 = H covers no pixel
    predictor.predict(box=np.array([-10, -10, 0, 0]), multimask_output=False)
    for box in ([WIDTH, 0, WIDTH + 10, 10], [0, HEIGHT, 10, HEIGHT + 10]):
        with pytest.raises(ValueError, match="outside"):
            predictor.predict(box=np.array(box))
    # segment-anything's box[None, :] form is the same prompt
    box = np.array([10, 5, 70, 50])
    np.testing.assert_array_equal(
        predictor.predict(box=box[None], multimask_output=False)[0],
        predictor.predict(box=box, multimask_output=False)[0],
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"point_coords": np.array([[10.0, np.nan]]), "point_labels": np.array([1])}, "finite"),
        ({"point_coords": np.array([[np.inf, 10.0]]), "point_labels": np.array([1])}, "finite"),
        ({"box": np.array([10.0, 10.0, np.nan, 40.0])}, "finite"),
        ({"box": np.array([10.0, 10.0, np.inf, 40.0])}, "finite"),
        ({"point_coords": np.zeros((0, 2)), "point_labels": np.zeros(0)}, "N >= 1"),
    ],
)
def test_non_finite_or_empty_prompts_are_refused(predictor: ZimPredictor, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        predictor.predict(**kwargs)


def test_box_rows_batch_with_point_rows_that_hold_only_filler(predictor: ZimPredictor) -> None:
    # row 0: a point and a box; row 1: a box alone, its point slot absent (-2)
    boxes = torch.tensor([[100.0, 80.0, 600.0, 500.0], [200.0, 100.0, 900.0, 600.0]])
    coords = torch.tensor([[[300.0, 200.0]], [[0.0, 0.0]]])
    labels = torch.tensor([[1.0], [-2.0]])
    masks, iou, _ = predictor.predict_torch(coords, labels, boxes, multimask_output=False)
    alone, alone_iou, _ = predictor.predict_torch(None, None, boxes[1:], multimask_output=False)
    torch.testing.assert_close(masks[1:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(iou[1:], alone_iou, atol=1e-5, rtol=0)


def test_an_integer_image_up_to_255_is_the_uint8_image(predictor: ZimPredictor, image: np.ndarray) -> None:
    other = ZimPredictor(predictor.model)
    other.set_image(image.astype(np.int16))
    assert torch.equal(other.get_image_embedding(), predictor.get_image_embedding())


# ------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def exported(net, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    export_module.export_onnx(net, out)
    return out


def _shape(value: onnx.ValueInfoProto) -> list:  # dims, symbolic ones by name
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_official_output_names_hold_the_official_tensors(net, exported: Path) -> None:
    """Read by name (as any runner but the official one, which reads by position, does): each official
    name holds its tensor, and both decoder outputs declare the prompt batch dynamic."""
    import onnxruntime as ort

    from zim_lightning.models.attention_mask import attention_map_from_prompts

    def session(name: str) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        return ort.InferenceSession(str(exported / name), options, providers=["CPUExecutionProvider"])

    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding, feats = net.encode_preprocessed(image)
    names = ["image_embeddings", "feat_D0", "feat_D1", "feat_D2"]
    encoder = session("encoder.onnx")
    assert [o.name for o in encoder.get_outputs()] == names
    for name, got, want in zip(
        names, encoder.run(names, {"image": image.numpy()}), (embedding, *feats), strict=True
    ):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, err_msg=name)

    coords = torch.tensor([[[300.0, 200.0], [-0.5, -0.5]], [[600.0, 700.0], [-0.5, -0.5]]])
    labels = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    attn = attention_map_from_prompts(coords, labels)
    with torch.no_grad():
        masks, iou = net.decode(embedding, feats, coords, labels, attn_mask=attn, multimask_output=True)
    feeds = {"feat_D0": feats[0], "feat_D1": feats[1], "feat_D2": feats[2], "image_embeddings": embedding,
             "attn_mask": attn, "point_coords": coords, "point_labels": labels}  # fmt: skip
    decoder = session("decoder.onnx")
    assert [o.name for o in decoder.get_outputs()] == ["masks", "iou_predictions"]
    got_masks, got_iou = decoder.run(["masks", "iou_predictions"], {k: v.numpy() for k, v in feeds.items()})
    np.testing.assert_allclose(got_masks, masks.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_iou, iou.numpy(), atol=1e-4)
    declared = {o.name: o.shape[0] for o in decoder.get_outputs()}
    assert declared == {"masks": "num_prompts", "iou_predictions": "num_prompts"}


def test_redeclared_inputs_keep_their_dynamic_axes(tmp_path: Path) -> None:
    # an input that the exporter dropped (e.g. attn_mask without masked attention) comes back with its
    # batch axis dynamic, or onnxruntime refuses a batch of prompts for it
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["a"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    export_module._restore_inputs(
        path,
        ("a", "attn_mask"),
        (torch.zeros(1, 2), torch.zeros(1, 64, 64)),
        {"attn_mask": {0: "num_prompts"}},
    )
    inputs = {v.name: _shape(v) for v in onnx.load(str(path)).graph.input}
    assert inputs == {"a": [1, 2], "attn_mask": ["num_prompts", 64, 64]}


def test_the_cli_exports_at_opset_17_by_default(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_export(model, out, *, opset):
        seen["opset"] = opset
        return Path(out) / "encoder.onnx", Path(out) / "decoder.onnx"

    monkeypatch.setattr(export_module, "export_onnx", fake_export)
    assert export_module.main(["--model", "tiny", "--out", str(tmp_path)]) == 0
    assert seen == {"opset": 17}
