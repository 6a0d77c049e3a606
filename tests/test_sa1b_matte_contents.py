"""What the SA1B-Matte builder stores, checked exactly: each matte against its own SA-1B mask and box, the
crop geometry and the resampling both ways, the clamp, the manifests' counts, the reader's batches, the
resume and claim rules, and the command line's options and exit status.

Builds here run stand-in converters (the mask passed through, a constant matte), so that what reaches the
shards can be compared with the SA-1B masks, which a converter with random weights cannot show.
tests/test_sa1b_matte.py runs the real (tiny) converter through the same builder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from tests.test_data_sa1b import write_tar
from zim_lightning.sa1b_matte import (
    CropConfig,
    ShardClaims,
    build,
    crop_square,
    matte_box,
    project_matte,
    resample_square,
    resolve_shards,
)
from zim_lightning.sa1b_matte.reading import ImageItem, ShardEnd, _shard_batches
from zim_lightning.sa1b_matte.writing import check_resumable, describe_run


class _PassThrough(torch.nn.Module):
    """A converter whose matte is its input mask: the stored matte must then reproduce the SA-1B mask."""

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"alpha": masks.clone()}


class _Constant(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.masks: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        self.masks.append(masks)
        return {"alpha": torch.full_like(masks, self.value)}


@pytest.fixture(scope="module")
def sa1b(builder_synthetic: Path) -> Path:
    return builder_synthetic / "sa1b"


def _build(sa1b: Path, out: Path, net: torch.nn.Module, config: CropConfig, **kwargs) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build(
            sa1b=[str(sa1b)],
            out=out,
            model=type(net).__name__,
            net=net,
            config=config,
            batch_size=3,
            num_workers=0,
            accelerator="cpu",
            devices=1,
            **kwargs,
        )
    finally:
        torch.set_num_threads(threads)


def _decode(annotation: dict) -> np.ndarray:
    rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
    return mask_utils.decode(rle)


def _shard_contents(shard: Path) -> tuple[list[str], dict[str, bytes]]:
    with tarfile.open(shard, "r:") as tar:
        members = tar.getmembers()
        return [m.name for m in members], {m.name: tar.extractfile(m).read() for m in members}


def _png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _far_from_the_edge(truth: np.ndarray, distance: float) -> np.ndarray:
    """Pixels more than ``distance`` from the mask's edge, the mask's pixels also from the crop's border
    (where the image may end, and the converter's square be padded with zeros)."""
    framed = np.pad(truth.astype(np.uint8), 1)  # a zero border: the mask's distance counts to it too
    inside = cv2.distanceTransform(framed, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - framed, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return ((inside > distance) | (outside > distance))[1:-1, 1:-1]


@pytest.mark.parametrize(
    "config",
    [
        CropConfig(crop_size=256, min_crop=16),  # crop mode, squares enlarged for the converter
        CropConfig(crop_size=64, min_crop=16),  # crop mode, some squares shrunk
        CropConfig(crop_size=64, mode="whole"),  # the whole image, shrunk 2x
    ],
    ids=["crop-enlarged", "crop-shrunk", "whole"],
)
def test_each_stored_matte_is_its_own_mask_in_its_own_box(
    sa1b: Path, tmp_path: Path, config: CropConfig
) -> None:
    out = tmp_path / "out"
    summary = _build(sa1b, out, _PassThrough(), config)
    assert summary["done"] == len(list(sa1b.glob("*.tar")))
    annotations_total = 0
    checked = 0
    for shard in sorted(sa1b.glob("*.tar")):
        names, data = _shard_contents(out / shard.name)
        manifest = json.loads((out / "manifest" / f"{shard.stem}.json").read_text())
        keys = list(dict.fromkeys(n.split(".")[0] for n in names))
        expected_order = []
        annotations = 0
        for key in keys:
            record = json.loads(data[f"{key}.json"])
            annotations += len(record["annotations"])
            expected_order += [f"{key}.jpg", f"{key}.json"]
            height, width = record["image"]["height"], record["image"]["width"]
            for annotation in record["annotations"]:
                entry = annotation["matte"]
                expected_order.append(f"{key}.{entry['member']}")
                x, y, w, h = entry["box"]
                mask = _decode(annotation)
                # the box is the mask's box grown by the margin (at least 2 px), clipped to the image
                mx, my, mw, mh = (
                    int(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))
                )
                m = max(2, int(np.ceil(config.margin * max(mw, mh))))
                assert (x, y) == (max(mx - m, 0), max(my - m, 0))
                assert (x + w, y + h) == (min(mx + mw + m, width), min(my + mh + m, height))
                matte = _png(data[f"{key}.{entry['member']}"])
                truth = mask[y : y + h, x : x + w]
                # the converter returned its input: the stored matte is the mask, resampled to the
                # converter's square and back, so it may differ only within a few of the square's pixels
                # (in image pixels) of an edge
                side = crop_square((mx, my, mw, mh), (height, width), config)[2]
                far = _far_from_the_edge(truth, 2 * max(1.0, side / config.crop_size) + 1)
                np.testing.assert_array_equal(
                    matte[far] > 127, truth[far] > 0, err_msg=f"{key} {annotation['id']}"
                )
                checked += int(far.sum())
        # per image: jpg, json, then its mattes in annotation order
        assert names == expected_order
        assert manifest["annotations"] == annotations and manifest["samples"] == len(keys)
        annotations_total += annotations
    assert checked > 1000 and summary["annotations"] == annotations_total  # pixels compared


def test_the_clamp_keeps_the_margin_band_and_zeroes_beyond_it(sa1b: Path, tmp_path: Path) -> None:
    config = CropConfig(crop_size=256, min_crop=16, margin=0.1)
    for clamp in (True, False):
        out = tmp_path / f"clamp_{clamp}"
        _build(sa1b, out, _Constant(1.0), dataclasses.replace(config, clamp=clamp))
        far_pixels = 0
        for shard in sorted(sa1b.glob("*.tar")):
            names, data = _shard_contents(out / shard.name)
            for name in names:
                if not name.endswith(".json"):
                    continue
                for annotation in json.loads(data[name])["annotations"]:
                    x, y, w, h = annotation["matte"]["box"]
                    mask = _decode(annotation)
                    _, _, mw, mh = cv2.boundingRect(mask)
                    m = max(2, int(np.ceil(config.margin * max(mw, mh))))
                    distance = cv2.distanceTransform(
                        (mask == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
                    )
                    distance = distance[y : y + h, x : x + w]
                    matte = _png(data[f"{name.split('.')[0]}.{annotation['matte']['member']}"])
                    if not clamp:
                        assert (matte == 255).all()
                        continue
                    assert (matte[distance <= m - 1] == 255).all()  # the mask and most of the margin band
                    assert (matte[distance > m + 1] == 0).all()  # nothing beyond the band
                    far_pixels += int((distance > m + 1).sum())
        assert far_pixels > 0 or not clamp


def test_matte_box_and_crop_square_exact_values() -> None:
    # margin: ceil(0.1 * 41) = 5 px on each side
    assert matte_box((10, 20, 30, 41), (100, 100), 0.1) == (5, 15, 40, 51, 5)
    # at least 2 px, clipped to the image at 0
    assert matte_box((1, 1, 5, 5), (100, 100), 0.1) == (0, 0, 8, 8, 2)
    # clipped at the far edges
    assert matte_box((90, 90, 8, 8), (100, 100), 0.1) == (88, 88, 12, 12, 2)
    # the matte box's extent plus a pixel when that beats the context: 10 + 2 * 2 + 1
    assert crop_square((50, 50, 10, 10), (200, 200), CropConfig(context=0.1, margin=0.1, min_crop=1))[2] == 15
    # a square larger than the image side is capped at the image's longer side, and centred where it is
    # larger than the image (padding split on both sides)
    assert crop_square((10, 10, 40, 30), (50, 60), CropConfig(context=0.5, min_crop=1)) == (0, -5, 60)
    # centred on the box to the nearest pixel: x start 1.5 -> 2, y start 4.5 -> 4 (round half to even)
    assert crop_square((10, 10, 5, 11), (200, 200), CropConfig(context=0.5, min_crop=1)) == (2, 4, 22)
    # whole mode: the image at the top left of its longer side's square (SAM's padding, bottom / right)
    assert crop_square((3, 4, 5, 6), (96, 128), CropConfig(mode="whole")) == (0, 0, 128)


def test_resample_square_shrinks_by_area_average() -> None:
    array = np.zeros((64, 64), np.uint8)
    array[::4, ::4] = 255  # one lit pixel per 4x4 block: area average 16, point sampling 0
    small = resample_square(array, 0, 0, 64, 16)
    assert np.abs(small.astype(int) - 16).max() <= 1


def test_project_matte_maps_back_with_the_resampling_conventions() -> None:
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    # the converter's square was enlarged (side 32 -> 64): back by 2x2 averages
    blocks = alpha.reshape(32, 2, 32, 2).astype(np.float64).mean(axis=(1, 3))
    back = project_matte(alpha, (10, 20, 32), (13, 25, 12, 9))
    assert back.shape == (9, 12)
    assert np.abs(back.astype(int) - np.round(blocks[5:14, 3:15])).max() <= 1
    # the square was shrunk (side 128 -> 64): bilinear with pixel centres, as cv2.resize
    up = cv2.resize(alpha, (128, 128), interpolation=cv2.INTER_LINEAR)
    back = project_matte(alpha, (-4, 6, 128), (7, 10, 50, 40))
    assert np.abs(back.astype(int) - up[4:44, 11:61].astype(int)).max() <= 1


def test_the_reader_counts_every_sample_skips_a_size_mismatch_and_bounds_batches(
    sa1b: Path, tmp_path: Path
) -> None:
    with tarfile.open(sorted(sa1b.glob("*.tar"))[0], "r:*") as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".")[0] for n in data})
    good, bad = keys[:2]
    record = json.loads(data[f"{bad}.json"])
    record["image"]["width"] += 1  # the json's size no longer matches its JPEG
    members = [(f"{good}.jpg", data[f"{good}.jpg"]), (f"{good}.json", data[f"{good}.json"])]
    members += [(f"{bad}.jpg", data[f"{bad}.jpg"]), (f"{bad}.json", json.dumps(record).encode())]
    shard = write_tar(tmp_path / "sa_000200.tar", members)
    batches = list(_shard_batches(shard, CropConfig(crop_size=64, min_crop=16), batch_size=2))
    items = [item for batch in batches for item in batch["items"]]
    assert [i.key for i in items if isinstance(i, ImageItem)] == [good]
    (end,) = [i for i in items if isinstance(i, ShardEnd)]
    assert end.samples == 2 and end.skipped.get("corrupt_image") == 1
    sizes = [batch["image"].shape[0] for batch in batches]
    assert max(sizes) == 2  # masks per converter forward: never more than batch_size


@pytest.mark.parametrize(
    "field, other",
    [
        ("mode", "whole"),
        ("crop_size", 96),
        ("context", 0.3),
        ("min_crop", 64),
        ("margin", 0.2),
        ("clamp", False),
    ],
)
def test_a_resume_with_any_other_crop_option_is_refused(tmp_path: Path, field: str, other) -> None:
    shard = tmp_path / "in" / "sa_000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"input")
    out = tmp_path / "out"
    (out / "manifest").mkdir(parents=True)
    (out / shard.name).write_bytes(b"finished")
    built = describe_run(CropConfig(), "m", None, "32-true")
    (out / "manifest" / "sa_000000.json").write_text(json.dumps({"input_bytes": 5, "build": built}))
    check_resumable(out, [shard], built)  # the same options resume
    with pytest.raises(ValueError, match=f"built differently .*{field}"):
        check_resumable(out, [shard], describe_run(CropConfig(**{field: other}), "m", None, "32-true"))


def test_two_input_shards_with_one_name_are_refused(tmp_path: Path) -> None:
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "sa_000000.tar").write_bytes(b"x")
    with pytest.raises(ValueError, match="names several shards called"):
        resolve_shards([str(tmp_path / "a"), str(tmp_path / "b")])


def test_claiming_a_shard_removes_both_of_its_stale_temporary_files(tmp_path: Path) -> None:
    shard = tmp_path / "in" / "sa_000000.tar"
    out = tmp_path / "out"
    (out / "manifest").mkdir(parents=True)
    stale = [out / "sa_000000.tar.partial", out / "manifest" / "sa_000000.json.partial"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    claims = ShardClaims(out=out, run_id="run")
    claims.begin()
    assert claims.claim(shard)
    assert not any(p.exists() for p in stale)


def test_the_command_line_reaches_build_and_sets_the_exit_code(tmp_path: Path, monkeypatch) -> None:
    from zim_lightning.sa1b_matte import cli

    calls: list[dict] = []
    result: dict = {}

    def fake_build(**kwargs):
        calls.append(kwargs)
        if "error" in result:
            raise result["error"]
        return result["summary"]

    monkeypatch.setattr(cli, "build", fake_build)
    args = ["--sa1b", "a", "b", "--out", str(tmp_path), "--checkpoint", "c.ckpt", "--model", "converter_tiny"]
    args += [
        "--mode",
        "whole",
        "--crop-size",
        "96",
        "--context",
        "0.3",
        "--min-crop",
        "64",
        "--margin",
        "0.2",
    ]
    args += [
        "--no-clamp",
        "--batch-size",
        "5",
        "--num-workers",
        "3",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
    ]
    args += ["--num-nodes", "1", "--precision", "bf16-mixed", "--accept-truncated", "--channels-last"]
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result["summary"] = {"rank": 1, "missing": []}  # rank 1 prints nothing
    assert cli.main(args) == 0
    assert calls[-1] == dict(
        sa1b=["a", "b"],
        out=tmp_path,
        model="converter_tiny",
        checkpoint="c.ckpt",
        config=CropConfig(crop_size=96, mode="whole", context=0.3, min_crop=64, margin=0.2, clamp=False),
        batch_size=5,
        num_workers=3,
        accelerator="cpu",
        devices=2,
        num_nodes=1,
        precision="bf16-mixed",
        channels_last=True,
        compile=None,
        accept_truncated=True,
    )
    result["summary"] = {"rank": 1, "missing": ["sa_000001.tar"]}
    assert cli.main(args) == 1  # some shard unfinished
    result["error"] = ValueError("bad input")
    assert cli.main(args) == 2


def test_the_converter_gets_masks_in_0_1_and_out_of_range_alpha_is_clamped() -> None:
    from zim_lightning.lit.build_module import MatteBuildModule

    batch = {
        "image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
        "mask": torch.full((1, 1, 4, 4), 255, dtype=torch.uint8),
    }
    net = _Constant(0.5)
    MatteBuildModule(net=net).predict_step(batch, 0)
    assert net.masks[0].max().item() == 1.0
    for value, level in ((1.5, 255), (-0.5, 0)):
        out = MatteBuildModule(net=_Constant(value)).predict_step(batch, 0)
        assert out.unique().tolist() == [level]


def test_an_empty_batch_gives_an_empty_uint8_prediction_in_the_frame_of_a_real_one() -> None:
    # a batch of no masks (it only closes a shard) must come back as a full one does, uint8 in the same
    # frame, so the writer's numpy view and a concatenation of predictions stay 8-bit
    from zim_lightning.lit.build_module import MatteBuildModule
    from zim_lightning.models.converter import build_converter_tiny

    torch.manual_seed(0)
    module = MatteBuildModule(net=build_converter_tiny().eval())
    full = {
        "image": torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8),
        "mask": (torch.rand(1, 1, 64, 64) > 0.5).to(torch.uint8) * 255,
    }
    with torch.no_grad():
        one = module.predict_step(full, 0)
        none = module.predict_step({name: value[:0] for name, value in full.items()}, 0)
    assert one.dtype == none.dtype == torch.uint8
    assert one.shape == (1, 1, 64, 64) and none.shape == (0, 1, 64, 64)


def test_shards_finished_differently_while_waiting_for_the_lock_are_refused(
    sa1b: Path, tmp_path: Path, monkeypatch
) -> None:
    """The first check runs before the output lock; the one under the lock must catch what a build that
    held the lock meanwhile finished with other options."""
    from zim_lightning.sa1b_matte import job

    config = CropConfig(crop_size=64, min_crop=16)
    other = tmp_path / "other"
    _build(sa1b, other, _PassThrough(), CropConfig(crop_size=96, min_crop=16))
    out = tmp_path / "out"
    first = sorted(sa1b.glob("*.tar"))[0]
    acquire = job.OutputLock.acquire

    def acquire_after_another_build(self):
        problem = acquire(self)
        (out / "manifest").mkdir(parents=True, exist_ok=True)
        shutil.copy(other / first.name, out / first.name)
        shutil.copy(other / "manifest" / f"{first.stem}.json", out / "manifest" / f"{first.stem}.json")
        return problem

    monkeypatch.setattr(job.OutputLock, "acquire", acquire_after_another_build)
    with pytest.raises(ValueError, match=r"built differently .*crop_size 96 \(now 64\)"):
        _build(sa1b, out, _PassThrough(), config)


def test_the_manifest_counts_annotations_left_without_a_matte(sa1b: Path, tmp_path: Path) -> None:
    with tarfile.open(sorted(sa1b.glob("*.tar"))[0], "r:*") as tar:
        data = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = sorted({n.split(".")[0] for n in data})[0]
    record = json.loads(data[f"{key}.json"])
    good = len(record["annotations"])
    size = [record["image"]["height"], record["image"]["width"]]
    record["annotations"].append(
        dict(record["annotations"][0], id=900001, segmentation={"size": size, "counts": "!!"})
    )
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(
        inputs / "sa_000300.tar",
        [(f"{key}.jpg", data[f"{key}.jpg"]), (f"{key}.json", json.dumps(record).encode())],
    )
    summary = _build(inputs, tmp_path / "out", _PassThrough(), CropConfig(crop_size=64, min_crop=16))
    (manifest,) = summary["per_shard"]
    assert manifest["masks"] == good and manifest["skipped"]["bad_rle"] == 1
    assert manifest["annotations"] == good + 1 == summary["annotations"]  # every annotation of the json
