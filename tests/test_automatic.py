"""Automatic matting (ZimAutomaticMatteGenerator and `zim-lightning matte-all`) with the tiny ZIM.

Random weights predict low IoUs and unstable mattes, so the tests set the IoU and stability thresholds
to 0: every grid prompt then yields candidates, and the filtering that remains (NMS) is what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.amg import generate_crop_boxes
from skimage import data
from torchvision.ops import batched_nms, box_iou

from zim_lightning.automatic import (
    PRESETS,
    ZimAutomaticMatteGenerator,
    _soft_edge_of,
    default_preset,
    main,
    write_results,
)
from zim_lightning.models.build import zim_model_registry
from zim_lightning.predictor import ZimPredictor

NO_FILTER = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
# Random weights give alphas within about 0.1 of 0.5, so the default offset (0.1) would score every
# matte 0; a narrow offset spreads the stability scores and makes their threshold testable.
STABILITY_OFFSET = 0.02


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return zim_model_registry["tiny"]().eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """scikit-image's coffee cup, a real photograph, at a third of its size (200x134)."""
    return np.ascontiguousarray(data.coffee()[::3, ::3])


def xyxy(records: list[dict]) -> torch.Tensor:
    """The records' boxes as the pixels they cover (``bbox`` is SAM's: w and h one less), as NMS compares them."""
    return torch.tensor(
        [[x, y, x + w + 1, y + h + 1] for x, y, w, h in (r["bbox"] for r in records)], dtype=torch.float
    )


def max_pairwise_iou(boxes: torch.Tensor) -> float:
    if len(boxes) < 2:
        return 0.0
    iou = box_iou(boxes, boxes)
    iou.fill_diagonal_(0.0)
    return float(iou.max())


def _grid_without_nms(model: torch.nn.Module, **thresholds: float) -> ZimAutomaticMatteGenerator:
    """A 2x2 grid (4 mask tokens each) whose NMS at 1.0 suppresses nothing."""
    return ZimAutomaticMatteGenerator(
        model,
        points_per_side=2,
        points_per_batch=4,
        box_nms_thresh=1.0,
        stability_score_offset=STABILITY_OFFSET,
        **thresholds,
    )


@pytest.fixture(scope="module")
def unsuppressed(model: torch.nn.Module, photo: np.ndarray) -> list[dict]:
    """Every candidate of a 2x2 grid: no filter, and NMS at 1.0 suppresses nothing."""
    return _grid_without_nms(model, **NO_FILTER).generate(photo)


def candidate_key(record: dict) -> tuple:
    return record["predicted_iou"], tuple(record["point_coords"][0])


def test_outputs_have_the_documented_shapes_and_ranges(unsuppressed: list[dict], photo: np.ndarray) -> None:
    height, width = photo.shape[:2]
    assert len(unsuppressed) > 4, "with thresholds at 0 the grid must yield mattes"
    grid = {(x, y) for x in (width / 4, 3 * width / 4) for y in (height / 4, 3 * height / 4)}
    for record in unsuppressed:
        alpha = record["alpha"]
        assert alpha.shape == (height, width) and alpha.dtype == np.float32
        assert alpha.min() >= 0.0 and alpha.max() <= 1.0
        foreground = alpha > 0.5
        assert record["area"] == int(foreground.sum()) > 0
        ys, xs = np.nonzero(foreground)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert 0.0 <= record["stability_score"] <= 1.0
        assert isinstance(record["predicted_iou"], float)
        assert record["crop_box"] == [0, 0, width, height]
        ((x, y),) = record["point_coords"]
        assert any(abs(x - gx) < 1e-3 and abs(y - gy) < 1e-3 for gx, gy in grid)
    areas = [r["area"] for r in unsuppressed]
    assert areas == sorted(areas, reverse=True)


def test_filters_and_nms(model: torch.nn.Module, photo: np.ndarray, unsuppressed: list[dict]) -> None:
    """IoU and stability thresholds, then box NMS: exactly the candidates that should survive do."""
    # a random IoU head predicts values either side of 0, and a cut <= 0 keeps all
    ious = sorted(r["predicted_iou"] for r in unsuppressed if r["predicted_iou"] > 0)
    iou_cut = ious[len(ious) // 4]  # drops the negative ones and the lowest quarter of the rest
    stability_cut = float(np.quantile([r["stability_score"] for r in unsuppressed], 0.1))
    assert iou_cut > 0.0 and stability_cut > 0.0, "seeded candidates must allow active thresholds"
    generator = ZimAutomaticMatteGenerator(
        model,
        points_per_side=2,
        points_per_batch=4,
        box_nms_thresh=0.7,
        pred_iou_thresh=iou_cut,
        stability_score_thresh=stability_cut,
        stability_score_offset=STABILITY_OFFSET,
    )
    kept = generator.generate(photo)

    passing = [
        r for r in unsuppressed if r["predicted_iou"] > iou_cut and r["stability_score"] >= stability_cut
    ]
    # Random weights give many near-identical mattes: overlaps above the threshold exist before NMS ...
    assert max_pairwise_iou(xyxy(passing)) > 0.7
    # ... none remains after it, and the survivors are what NMS by predicted IoU keeps.
    assert 0 < len(kept) < len(passing)
    assert max_pairwise_iou(xyxy(kept)) <= 0.7
    expected = batched_nms(
        xyxy(passing), torch.tensor([r["predicted_iou"] for r in passing]), torch.zeros(len(passing)), 0.7
    )
    assert {candidate_key(r) for r in kept} == {candidate_key(passing[i]) for i in expected.tolist()}


@pytest.mark.parametrize("which", ["iou", "stability"])
def test_each_threshold_alone_keeps_exactly_the_candidates_above_it(
    model: torch.nn.Module, photo: np.ndarray, unsuppressed: list[dict], which: str
) -> None:
    # without NMS (1.0), so that neither filter's work can be hidden by NMS removing the same mattes
    ious = sorted(r["predicted_iou"] for r in unsuppressed)
    cut = (
        ious[len(ious) // 2]
        if which == "iou"
        else float(np.median([r["stability_score"] for r in unsuppressed]))
    )
    thresholds = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    thresholds["pred_iou_thresh" if which == "iou" else "stability_score_thresh"] = cut
    kept = {candidate_key(r) for r in _grid_without_nms(model, **thresholds).generate(photo)}
    expected = {
        candidate_key(r)
        for r in unsuppressed
        if (r["predicted_iou"] > cut if which == "iou" else r["stability_score"] >= cut)
    }
    assert 0 < len(expected) < len(unsuppressed) and kept == expected


def test_mask_iou_dedupe(model: torch.nn.Module, unsuppressed: list[dict]) -> None:
    generator = ZimAutomaticMatteGenerator(model, points_per_side=1, mask_dedupe_iou_thresh=0.5, **NO_FILTER)
    alphas = [torch.from_numpy(np.round(r["alpha"] * 255).astype(np.uint8)) for r in unsuppressed]
    scores = torch.tensor([r["predicted_iou"] for r in unsuppressed])
    kept = generator._dedupe_by_mask_iou(alphas, scores)
    assert 0 < len(kept) < len(alphas)
    masks = [alphas[i] > 127 for i in kept]
    for i, a in enumerate(masks):
        for b in masks[i + 1 :]:
            assert (a & b).sum() / (a | b).sum() <= 0.5
    assert int(torch.argmax(scores)) in kept  # the best matte always survives


def test_small_regions_are_removed_and_holes_filled(model: torch.nn.Module) -> None:
    generator = ZimAutomaticMatteGenerator(model, points_per_side=1, min_mask_region_area=20, **NO_FILTER)
    alpha = torch.zeros(40, 40, dtype=torch.uint8)
    alpha[5:30, 5:30] = 230  # the object
    alpha[15:17, 15:17] = 10  # a 4-pixel hole
    alpha[35:37, 35:37] = 250  # a 4-pixel island
    (cleaned,), boxes, kept = generator._clean_regions([alpha], torch.tensor([[5.0, 5.0, 36.0, 36.0]]))
    assert kept == [0]
    assert (cleaned[15:17, 15:17] == 255).all() and (cleaned[35:37, 35:37] == 0).all()
    assert torch.equal(cleaned[5:15, 5:30], alpha[5:15, 5:30])  # the rest of the matte is untouched
    assert boxes[0].tolist() == [5.0, 5.0, 29.0, 29.0]


def test_a_removed_island_goes_with_its_soft_edge(model: torch.nn.Module) -> None:
    generator = ZimAutomaticMatteGenerator(model, points_per_side=1, min_mask_region_area=50, **NO_FILTER)
    yy, xx = np.mgrid[:60, :60]

    def soft_disc(cy: float, cx: float, radius: float) -> np.ndarray:
        return np.clip(radius + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1) * 255 * 0.98

    object_, island = soft_disc(20, 20, 12), soft_disc(48, 48, 3)
    alpha = torch.from_numpy(np.maximum(object_, island).round().astype(np.uint8))
    (cleaned,), _, _ = generator._clean_regions([alpha], torch.tensor([[8.0, 8.0, 51.0, 51.0]]))
    assert (cleaned[40:, 40:] == 0).all()  # the island's soft edge too, not only its pixels above 0.5
    assert torch.equal(cleaned[:36, :36], alpha[:36, :36])  # the object keeps its own soft edge

    # an island whose soft edge runs into the object's: split by the nearest foreground pixel
    def ramp(cy: float, cx: float, radius: float) -> np.ndarray:
        return np.clip((radius - np.hypot(yy - cy, xx - cx)) / 6 + 0.5, 0, 1) * 250

    alpha = torch.from_numpy(np.maximum(ramp(20, 20, 12), ramp(20, 39, 2)).round().astype(np.uint8))
    assert (alpha[20, 30:40] > 0).all()  # one soft support from the object to the island
    (cleaned,), _, _ = generator._clean_regions([alpha], torch.tensor([[5.0, 5.0, 45.0, 35.0]]))
    assert (cleaned[:, 37:] == 0).all()  # the island and the soft pixels nearest to it
    assert torch.equal(cleaned[:, :33], alpha[:, :33])  # the object and its edge on its side
    # an island's soft tail that passes near the object without touching it goes whole
    support, removed, kept = (np.zeros((40, 40), bool) for _ in range(3))
    kept[20:30, 20:30], support[18:32, 18:32] = True, True  # the object and its soft edge
    removed[2:4, 2:4], support[1:5, 1:5] = True, True  # the island and its soft edge
    support[2, 2:37], support[2:38, 36] = True, True  # the tail: along row 2, then down past the object
    object_part = np.zeros_like(support)
    object_part[18:32, 18:32] = True
    assert np.array_equal(_soft_edge_of(removed, kept, support), support & ~object_part)


def test_presets_and_bad_settings(model: torch.nn.Module) -> None:
    fast = ZimAutomaticMatteGenerator.from_preset(model, "fast", points_per_batch=8)
    assert len(fast.point_grids[0]) == PRESETS["fast"].points_per_side ** 2 and fast.points_per_batch == 8
    quality = ZimAutomaticMatteGenerator.from_preset(model, "quality")
    assert len(quality.point_grids) == PRESETS["quality"].crop_n_layers + 1
    assert quality.predictor.precision == "fp32"
    assert (
        ZimAutomaticMatteGenerator.from_preset(model, "fast", precision="bf16").predictor.precision == "bf16"
    )
    with pytest.raises(ValueError, match="precision must be one of"):
        ZimAutomaticMatteGenerator(model, precision="fp16")
    with pytest.raises(ValueError, match="preset"):
        ZimAutomaticMatteGenerator.from_preset(model, "best")
    with pytest.raises(ValueError, match="points_per_side"):
        ZimAutomaticMatteGenerator(model, points_per_side=0)
    for name, value in (("box_nms_thresh", -0.1), ("pred_iou_thresh", 1.5), ("mask_dedupe_iou_thresh", 2.0)):
        with pytest.raises(ValueError, match=rf"{name}: expected in \[0, 1\], got {value}"):
            ZimAutomaticMatteGenerator(model, **{name: value})
    for settings, message in (
        ({"min_mask_region_area": -1}, "min_mask_region_area: expected an integer >= 0"),
        ({"points_per_side": 2.5}, "points_per_side: expected an integer >= 1, got 2.5"),
        ({"points_per_side": 100_000}, "points_per_side: expected at most 1024"),
        ({"crop_n_layers": 30}, "crop_n_layers: expected at most 5"),  # 4**30 crops: a hang
        ({"crop_n_points_downscale_factor": 0}, "crop_n_points_downscale_factor: expected an integer >= 1"),
        ({"points_per_side": 4, "crop_n_layers": 1, "crop_n_points_downscale_factor": 8}, "no point"),
        ({"crop_overlap_ratio": -1.0}, r"crop_overlap_ratio: expected in \[0, 1\)"),  # empty crops
        ({"crop_overlap_ratio": 5.0}, r"crop_overlap_ratio: expected in \[0, 1\)"),  # negative origins
    ):
        with pytest.raises(ValueError, match=message):
            ZimAutomaticMatteGenerator(model, **settings)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        fast.generate(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="HxWx3 uint8"):  # a list is read as an array, not .ndim'd
        fast.generate([[0, 0, 0]])


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 50, 3)])
def test_mattes_one_pixel_thin_are_suppressed_as_duplicates(model: torch.nn.Module, shape: tuple) -> None:
    # a one-pixel-thin box has no area to torchvision (it takes max as exclusive): its IoU with an
    # identical box was NaN, so no duplicate of it was ever dropped
    generator = ZimAutomaticMatteGenerator(model, points_per_side=3, points_per_batch=9, **NO_FILTER)
    records = generator.generate(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    assert records and len({tuple(r["bbox"]) for r in records}) == len(records)


def test_patches_are_placed_in_the_full_frame(model: torch.nn.Module) -> None:
    """Candidates are kept as patches of their support; a crop's patch lands at the crop's offset."""
    generator = ZimAutomaticMatteGenerator(model, points_per_side=1, crop_n_layers=1)
    crops, layers = generate_crop_boxes((60, 90), 1, generator.crop_overlap_ratio)
    assert len(generator.point_grids) == 2 and layers == [0, 1, 1, 1, 1]
    x0, y0, x1, y1 = crops[4]  # the bottom-right crop
    patch = torch.randint(1, 256, (7, 5), dtype=torch.uint8)
    full = generator._place(patch, (x0 + 3, y0 + 2), 60, 90)
    assert full.shape == (60, 90) and torch.equal(full[y0 + 2 : y0 + 9, x0 + 3 : x0 + 8], patch)
    assert int(full.sum()) == int(patch.sum())  # zero elsewhere
    whole = torch.randint(0, 256, (60, 90), dtype=torch.uint8)
    assert generator._place(whole, (0, 0), 60, 90) is whole


def test_crop_layers_on_a_one_pixel_tall_image_skip_the_empty_crops(model: torch.nn.Module) -> None:
    # segment-anything's crop boxes of a 1-pixel-tall image include some with no rows
    crops, _ = generate_crop_boxes((1, 50), 1, 512 / 1500)
    assert any(y1 <= y0 for _, y0, _, y1 in crops)
    generator = ZimAutomaticMatteGenerator(model, points_per_side=2, crop_n_layers=1)
    records = generator.generate(np.full((1, 50, 3), 128, np.uint8))
    assert isinstance(records, list)


DISC_RADIUS = 60.0  # pixels of the 1024 frame


def _disc_decoder(net: torch.nn.Module, radius: float = DISC_RADIUS) -> torch.nn.Module:
    """The tiny network with a decoder that mattes a disc around each prompt's first point.

    Random weights give mattes that fill the frame, which the crop-edge filter drops, so no crop layer's
    matte would reach the output; a disc shows where each stage put the prompt.
    """

    def decode(image_embeddings, feats, point_coords, point_labels, attn_mask=None, multimask_output=False):
        side = net.image_size // net.output_stride
        centres = (torch.arange(side, dtype=torch.float32) + 0.5) * net.output_stride
        dy = centres[None, :, None] - point_coords[:, 0, 1, None, None]
        dx = centres[None, None, :] - point_coords[:, 0, 0, None, None]
        logits = (radius - (dx.square() + dy.square()).sqrt()).clamp(-10, 10)[:, None]
        count = 4 if multimask_output else 1
        return logits.expand(-1, count, -1, -1), torch.ones(len(logits), count)

    net.decode = decode
    return net


def _crop_layer_records(
    radius: float = DISC_RADIUS, crop_nms_thresh: float = 1.0
) -> tuple[list[dict], int, int]:
    """matte-all over the full-size coffee photo (400x600: crops big enough for the edge filter) and one
    crop layer, with the disc decoder: every candidate, nothing suppressed but by the crop-edge filter."""
    torch.manual_seed(0)
    photo = np.ascontiguousarray(data.coffee())
    generator = ZimAutomaticMatteGenerator(
        _disc_decoder(zim_model_registry["tiny"]().eval(), radius),
        points_per_side=2,
        crop_n_layers=1,
        multimask_output=False,
        box_nms_thresh=1.0,
        crop_nms_thresh=crop_nms_thresh,
        **NO_FILTER,
    )
    return generator.generate(photo), photo.shape[0], photo.shape[1]


def test_across_crops_nms_keeps_the_matte_of_the_smaller_crop() -> None:
    # SAM's rule: where mattes of different crops overlap, the one from the smaller crop (finer detail)
    # wins. Discs of radius 300 (frame pixels) overlap across the layers.
    everything, _, _ = _crop_layer_records(300.0)
    kept, _, _ = _crop_layer_records(300.0, crop_nms_thresh=0.3)
    assert 0 < len(kept) < len(everything)

    def area(record: dict) -> float:
        return record["crop_box"][2] * record["crop_box"][3]

    overlap = box_iou(xyxy(kept), xyxy(everything))
    beaten = [
        (i, j)
        for i in range(len(kept))
        for j in range(len(everything))
        if overlap[i, j] > 0.3 and area(everything[j]) < area(kept[i])
    ]
    assert not beaten, "a kept matte overlaps a candidate of a smaller crop, which should have won"


def test_every_layers_mattes_land_on_their_prompt_in_the_full_image() -> None:
    records, height, width = _crop_layer_records()
    crop_boxes = {tuple(r["crop_box"]) for r in records}
    assert (0, 0, width, height) in crop_boxes and len(crop_boxes) == 5  # the image and its 4 crops
    for record in records:
        (px, py), (x, y, w, h) = record["point_coords"][0], record["crop_box"]
        assert x <= px < x + w and y <= py < y + h
        ys, xs = np.nonzero(record["alpha"] > 0.5)
        # the disc's centre is the prompt (original pixels), its radius the 1024 frame's in the crop's scale
        assert abs(xs.mean() - px) < 1.5 and abs(ys.mean() - py) < 1.5, (record["crop_box"], px, py)
        radius = DISC_RADIUS * max(w, h) / 1024
        assert len(xs) == pytest.approx(np.pi * radius**2, rel=0.1)


def test_crop_mattes_cut_by_an_inner_crop_edge_are_dropped() -> None:
    # discs of radius 800 in a crop's 1024 frame reach past the crop's inner edges from every grid point
    records, height, width = _crop_layer_records(radius=800.0)
    assert records and {tuple(r["crop_box"]) for r in records} == {(0, 0, width, height)}


def test_stability_score_is_the_alphas_and_cleanup_and_dedupe_run_in_generate() -> None:
    torch.manual_seed(0)
    photo = np.ascontiguousarray(data.coffee()[::2, ::2])
    generator = ZimAutomaticMatteGenerator(
        _disc_decoder(zim_model_registry["tiny"]().eval()),
        points_per_side=3,
        multimask_output=True,  # four identical discs per point: the dedupe keeps one
        box_nms_thresh=1.0,
        stability_score_offset=0.3,
        min_mask_region_area=20,
        mask_dedupe_iou_thresh=0.9,
        **NO_FILTER,
    )
    records = generator.generate(photo)
    assert len(records) == 9  # one per grid point
    for record in records:
        alpha = record["alpha"]
        expected = (alpha > 0.8).sum() / (alpha > 0.2).sum()  # SAM's score at 0.5 +- the offset
        assert record["stability_score"] == pytest.approx(expected, abs=0.02)
        ys, xs = np.nonzero(alpha > 0.5)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


def test_cli_writes_mattes_and_a_matching_index(tmp_path: Path, photo: np.ndarray) -> None:
    image_path = tmp_path / "coffee.jpg"
    Image.fromarray(photo).save(image_path, quality=95)
    out = tmp_path / "out"
    argv = [
        str(image_path),
        "--model",
        "tiny",
        "--out",
        str(out),
        "--points-per-side",
        "2",
        "--points-per-batch",
        "4",
    ]
    argv += ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--precision", "bf16"]
    assert main(argv) == 0

    index = json.loads((out / "index.json").read_text())
    assert index["precision"] == "bf16"
    height, width = photo.shape[:2]
    assert (index["width"], index["height"], index["model"], index["image"]) == (
        width,
        height,
        "tiny",
        "coffee.jpg",
    )
    objects = index["objects"]
    assert objects and sorted(p.name for p in out.glob("matte_*.png")) == sorted(o["file"] for o in objects)
    for entry in objects:
        alpha = Image.open(out / entry["file"])
        assert alpha.mode == "L" and alpha.size == (width, height)
        foreground = np.asarray(alpha) > 127
        assert entry["area"] == int(foreground.sum())
        ys, xs = np.nonzero(foreground)
        assert entry["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert {"predicted_iou", "stability_score", "point_coords", "crop_box"} <= set(entry)
    overlay = Image.open(out / "overlay.png")
    assert overlay.size == (width, height) and overlay.mode == "RGB"
    assert not np.array_equal(np.asarray(overlay), photo)  # the mattes are drawn on it


def test_write_results_leaves_no_mattes_of_an_earlier_run(tmp_path: Path, photo: np.ndarray) -> None:
    alpha = np.zeros(photo.shape[:2], np.float32)
    record = {
        "alpha": alpha,
        "bbox": [0, 0, 1, 1],
        "area": 0,
        "predicted_iou": 1.0,
        "stability_score": 1.0,
        "point_coords": [[0, 0]],
        "crop_box": [0, 0, 1, 1],
    }
    # the user's own files in the folder, one of them perhaps the input image: never touched
    for name in ("matte_photo.png", "matte_01.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"the user's")
    write_results(tmp_path, photo, [record, record, record], {"image": "a.png"})
    (tmp_path / ".matte-all-killed").mkdir()  # a killed run's staging folder
    index = write_results(tmp_path, photo, [record], {"image": "b.png"})
    assert [o["file"] for o in index["objects"]] == ["matte_000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index.json", "matte_000.png", "matte_01.png", "matte_photo.png", "notes.txt", "overlay.png"
    ]  # fmt: skip
    assert all((tmp_path / n).read_bytes() == b"the user's" for n in ("matte_photo.png", "matte_01.png"))


def test_an_input_that_an_output_would_replace_is_refused(tmp_path: Path, capsys) -> None:
    image = tmp_path / "overlay.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        main([str(image), "--model", "tiny", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "replaced by an output" in capsys.readouterr().err


def test_an_interrupted_rerun_leaves_the_earlier_results_whole(
    tmp_path: Path, photo: np.ndarray, monkeypatch
) -> None:
    def record(x: int) -> dict:
        alpha = np.zeros(photo.shape[:2], np.float32)
        alpha[10:20, x : x + 10] = 1.0
        return {"alpha": alpha, "bbox": [x, 10, 9, 9], "area": 100, "predicted_iou": 1.0,
                "stability_score": 1.0, "point_coords": [[x, 10]], "crop_box": [0, 0, 1, 1]}  # fmt: skip

    write_results(tmp_path, photo, [record(0), record(30), record(60)], {"image": "a.png"})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = Image.Image.save
    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, photo, [record(100), record(120)], {"image": "b.png"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no staging folder left either


def test_cli_rejects_bad_settings_with_a_usage_error(tmp_path: Path, photo: np.ndarray, capsys) -> None:
    image_path = tmp_path / "photo.png"
    Image.fromarray(photo).save(image_path)
    with pytest.raises(SystemExit) as exc:
        main([str(image_path), "--model", "tiny", "--out", str(tmp_path / "out"), "--points-per-side", "0"])
    assert exc.value.code == 2 and "points_per_side" in capsys.readouterr().err


def test_the_default_preset_follows_the_network_also_from_a_run_config() -> None:
    from zim_lightning.models.build import ZIM_VARIANTS, variant_of
    from zim_lightning.models.zim import Zim

    # a run config builds the network without a registry name: its sizes tell the preset
    assert variant_of(Zim(**ZIM_VARIANTS["tiny"], image_size=256)) == "tiny"
    assert default_preset(variant_of(Zim(**ZIM_VARIANTS["tiny"], image_size=256))) == "fast"
    assert default_preset(None) == "quality"


def test_cli_rejects_a_missing_image(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.png"), "--model", "tiny", "--out", str(tmp_path / "out")])


STUB_SIDE = 64


def _stub_disc(cx: float, cy: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(STUB_SIDE), torch.arange(STUB_SIDE), indexing="ij")
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).float()


def _generate_from(
    model: torch.nn.Module, alphas: list[torch.Tensor], ious: list[float], **settings
) -> list[dict]:
    """matte-all on a 64x64 image, one batch of 4 grid points whose decoder outputs are ``alphas``."""
    from zim_lightning.automatic import ZimAutomaticMatteGenerator

    settings = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, **settings}
    generator = ZimAutomaticMatteGenerator(
        model, points_per_side=2, points_per_batch=4, multimask_output=False, **settings
    )
    generator._decode_points = lambda points: (torch.stack(alphas)[:, None], torch.tensor(ious)[:, None])
    return generator.generate(np.zeros((STUB_SIDE, STUB_SIDE, 3), np.uint8))


def test_a_matte_whose_binarised_mask_is_empty_is_dropped(model: torch.nn.Module) -> None:
    zero = torch.zeros(STUB_SIDE, STUB_SIDE)
    records = _generate_from(
        model, [_stub_disc(32, 32, 10), torch.full((STUB_SIDE, STUB_SIDE), 0.45), zero, zero], [1.0] * 4
    )
    assert len(records) == 1 and all(r["area"] > 0 for r in records)


def test_a_matte_keeps_its_soft_edge_beyond_the_binarised_box(model: torch.nn.Module) -> None:
    zero = torch.zeros(STUB_SIDE, STUB_SIDE)
    soft = torch.maximum(_stub_disc(32, 32, 6), 0.3 * _stub_disc(32, 32, 12))
    records = _generate_from(model, [soft, zero, zero, zero], [1.0] * 4)
    assert len(records) == 1
    assert int((records[0]["alpha"] > 0).sum()) == int((soft > 0).sum())


def _repaired_and_clean(model: torch.nn.Module, crop_nms_thresh: float) -> list[dict]:
    # A: a disc of radius 11 and a 9-pixel island (removed by the cleanup, which then shrinks its box
    # onto B's); B: a disc of radius 10, nothing to repair. Before the cleanup their boxes barely overlap.
    repaired = _stub_disc(32, 32, 11)
    repaired[2:5, 2:5] = 1.0
    zero = torch.zeros(STUB_SIDE, STUB_SIDE)
    return _generate_from(
        model,
        [repaired, _stub_disc(32, 32, 10), zero, zero],
        [0.9, 0.8, 1.0, 1.0],
        min_mask_region_area=20,
        box_nms_thresh=0.7,
        crop_nms_thresh=crop_nms_thresh,
    )


def test_after_the_cleanup_a_matte_that_needed_no_repair_wins(model: torch.nn.Module) -> None:
    records = _repaired_and_clean(model, crop_nms_thresh=0.7)
    assert len(records) == 1 and records[0]["predicted_iou"] == pytest.approx(0.8)


def test_the_cleanup_nms_uses_the_larger_of_the_two_thresholds(model: torch.nn.Module) -> None:
    # box IoU of the cleaned pair is about 0.83: kept both at max(0.7, 0.9) = 0.9, as SAM does
    assert len(_repaired_and_clean(model, crop_nms_thresh=0.9)) == 2


def _square(x: int, y: int, side: int = 6) -> torch.Tensor:
    alpha = torch.zeros(64, 64)
    alpha[y : y + side, x : x + side] = 1.0
    return alpha


def test_stability_is_measured_around_half_and_alpha_is_rounded_to_uint8(model: torch.nn.Module) -> None:
    alpha = torch.zeros(64, 64)
    alpha[0:10] = 1.0
    alpha[10:20] = 0.55
    alpha[20:30] = 0.45  # 114.75 levels: rounds to 115 (truncation would give 114)
    zero = torch.zeros(64, 64)
    (record,) = _generate_from(model, [alpha, zero, zero, zero], [1.0] * 4, box_nms_thresh=1.0)
    # offset 0.1: (alpha > 0.6) / (alpha > 0.4) = 10 rows / 30 rows (a centre of 0.4 would give 20 / 30)
    assert record["stability_score"] == pytest.approx(1 / 3)
    np.testing.assert_array_equal(record["alpha"], np.round(alpha.numpy() * 255) / np.float32(255))


def test_a_pred_iou_thresh_of_zero_keeps_every_matte(model: torch.nn.Module) -> None:
    squares = [_square(2, 2), _square(30, 2), _square(2, 30), _square(30, 30)]
    records = _generate_from(model, squares, [0.0, -0.2, 0.5, 1.0], box_nms_thresh=1.0)
    assert sorted(r["predicted_iou"] for r in records) == pytest.approx([-0.2, 0.0, 0.5, 1.0])


def test_the_mask_dedupe_drops_only_overlaps_above_its_threshold(model: torch.nn.Module) -> None:
    generator = ZimAutomaticMatteGenerator(model, points_per_side=1, mask_dedupe_iou_thresh=0.5)
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


def test_multimask_output_false_gives_one_matte_per_point(model: torch.nn.Module) -> None:
    for multimask, expected in ((False, 1), (True, 4)):
        generator = ZimAutomaticMatteGenerator(
            model,
            points_per_side=1,
            multimask_output=multimask,
            box_nms_thresh=1.0,
            pred_iou_thresh=0.0,
            stability_score_thresh=0.0,
        )
        calls = _disc_predict_torch(generator.predictor)
        assert len(generator.generate(np.zeros((40, 50, 3), np.uint8))) == expected
        assert calls == [multimask]


def test_crop_layer_mattes_have_their_bbox_in_image_pixels(model: torch.nn.Module) -> None:
    generator = ZimAutomaticMatteGenerator(
        model,
        points_per_side=2,
        crop_n_layers=1,
        box_nms_thresh=1.0,
        crop_nms_thresh=1.0,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        multimask_output=False,
    )
    _disc_predict_torch(generator.predictor)
    records = generator.generate(np.zeros((300, 400, 3), np.uint8))
    inner = [r for r in records if r["crop_box"][:2] != [0, 0]]
    assert inner, "crops away from the image's corner must give mattes"
    for record in records:
        ys, xs = np.nonzero(record["alpha"] > 0.5)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
