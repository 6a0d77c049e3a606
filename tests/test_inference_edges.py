"""Edges of the user-facing inference contracts (found unguarded by a mutation round): the predictor's
prompt validation at its edges, mixed box / point batches and integer images; the automatic generator's
stability centre, alpha rounding, "0 keeps all", the dedupe's strict threshold, multimask_output=False and
crop-layer boxes; the ONNX export's literal output names, dynamic output batch, re-declared inputs and
default opset.

All fast: the tiny network encodes one small image; the generator tests replace its decoder with given
mattes (as tests/test_automatic.py does), so that the filters see known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import zim_lightning.export as export_module
from zim_lightning.automatic import ZimAutomaticMatteGenerator
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


# ------------------------------------------------------------------------------------------ matte-all
def _no_network(generator: ZimAutomaticMatteGenerator) -> ZimAutomaticMatteGenerator:
    """set_image only records the sizes (no encoder run)."""
    predictor = generator.predictor

    def set_image(crop: np.ndarray) -> None:
        predictor.original_size = crop.shape[:2]
        predictor.input_size = predictor.transform.get_preprocess_shape(*crop.shape[:2], 1024)
        predictor.is_image_set = True

    predictor.set_image = set_image
    return generator


def _stubbed(net, alphas: list[torch.Tensor], ious: list[float], **settings) -> list[dict]:
    """matte-all on a 64x64 image: one batch of 4 grid points whose decoder outputs are ``alphas``."""
    settings = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0, **settings}
    generator = _no_network(
        ZimAutomaticMatteGenerator(
            net, points_per_side=2, points_per_batch=4, multimask_output=False, **settings
        )
    )
    generator._decode_points = lambda points: (torch.stack(alphas)[:, None], torch.tensor(ious)[:, None])
    return generator.generate(np.zeros((64, 64, 3), np.uint8))


def _square(x: int, y: int, side: int = 6) -> torch.Tensor:
    alpha = torch.zeros(64, 64)
    alpha[y : y + side, x : x + side] = 1.0
    return alpha


def test_stability_is_measured_around_half_and_alpha_is_rounded_to_uint8(net) -> None:
    alpha = torch.zeros(64, 64)
    alpha[0:10] = 1.0
    alpha[10:20] = 0.55
    alpha[20:30] = 0.45  # 114.75 levels: rounds to 115 (truncation would give 114)
    zero = torch.zeros(64, 64)
    (record,) = _stubbed(net, [alpha, zero, zero, zero], [1.0] * 4)
    # offset 0.1: (alpha > 0.6) / (alpha > 0.4) = 10 rows / 30 rows (a centre of 0.4 would give 20 / 30)
    assert record["stability_score"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(record["alpha"], np.round(alpha.numpy() * 255) / np.float32(255))


def test_a_pred_iou_thresh_of_zero_keeps_every_matte(net) -> None:
    squares = [_square(2, 2), _square(30, 2), _square(2, 30), _square(30, 30)]
    records = _stubbed(net, squares, [0.0, -0.2, 0.5, 1.0])
    assert sorted(r["predicted_iou"] for r in records) == pytest.approx([-0.2, 0.0, 0.5, 1.0])


def test_the_mask_dedupe_drops_only_overlaps_above_its_threshold(net) -> None:
    generator = ZimAutomaticMatteGenerator(net, points_per_side=1, mask_dedupe_iou_thresh=0.5)
    big = torch.zeros(8, 8, dtype=torch.uint8)
    big[0, :8] = 255
    big[1, :2] = 255  # 10 pixels
    half = torch.zeros(8, 8, dtype=torch.uint8)
    half[0, :5] = 255  # 5 of them: IoU exactly 0.5, not above it
    assert generator._dedupe_by_mask_iou([big, half], torch.tensor([0.9, 0.8])) == [0, 1]
    generator.mask_dedupe_iou_thresh = 0.49
    assert generator._dedupe_by_mask_iou([big, half], torch.tensor([0.9, 0.8])) == [0]


def _disc_predict_torch(predictor: ZimPredictor, radius: float = 3.0):
    """predict_torch's stand-in: K identical discs of ``radius`` pixels (of the set image) at each prompt."""
    calls = []

    def predict_torch(coords, labels, boxes=None, *, multimask_output=True, return_logits=False):
        calls.append(multimask_output)
        height, width = predictor.original_size
        scale = max(height, width) / 1024  # approximately: the frame rounds the short side
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        centres = coords[:, 0] * scale
        dist = (
            (xx[None] - centres[:, 0, None, None]) ** 2 + (yy[None] - centres[:, 1, None, None]) ** 2
        ).sqrt()
        alpha = (dist <= radius).float()[:, None]
        count = 4 if multimask_output else 1
        return alpha.expand(-1, count, -1, -1), torch.ones(len(coords), count), None

    predictor.predict_torch = predict_torch
    return calls


def test_multimask_output_false_gives_one_matte_per_point(net) -> None:
    for multimask, expected in ((False, 1), (True, 4)):
        generator = _no_network(
            ZimAutomaticMatteGenerator(
                net,
                points_per_side=1,
                multimask_output=multimask,
                box_nms_thresh=1.0,
                pred_iou_thresh=0.0,
                stability_score_thresh=0.0,
            )  # fmt: skip
        )
        calls = _disc_predict_torch(generator.predictor)
        assert len(generator.generate(np.zeros((40, 50, 3), np.uint8))) == expected
        assert calls == [multimask]


def test_crop_layer_mattes_have_their_bbox_in_image_pixels(net) -> None:
    generator = _no_network(
        ZimAutomaticMatteGenerator(
            net,
            points_per_side=2,
            crop_n_layers=1,
            box_nms_thresh=1.0,
            crop_nms_thresh=1.0,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
            multimask_output=False,
        )  # fmt: skip
    )
    _disc_predict_torch(generator.predictor)
    records = generator.generate(np.zeros((300, 400, 3), np.uint8))
    inner = [r for r in records if r["crop_box"][:2] != [0, 0]]
    assert inner, "crops away from the image's corner must give mattes"
    for record in records:
        ys, xs = np.nonzero(record["alpha"] > 0.5)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


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
