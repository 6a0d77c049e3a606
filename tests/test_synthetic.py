"""The synthetic dataset: every format reads back with independent readers, alpha is exact, bytes repeat."""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from zim_lightning.data.synthetic import (
    MIN_MASK_AREA,
    SA1B_FULL_SIZE,
    SyntheticLayout,
    _parser,
    _prompt,
    generate,
    is_complete,
    main,
)
from zim_lightning.data.tar_writer import write_tar

SMALL = {
    "num_shards": 2,
    "num_images": 3,
    "image_size": (96, 128),
    "matting_train": 8,
    "matting_val": 2,
    "seg": 4,
    "shard_size": 4,
    "micromat": 5,
    "eval_images": 3,
}


def _flags(sizes: dict) -> list[str]:
    """The command line that asks for ``sizes`` (``generate``'s keyword arguments)."""
    flags = []
    for name, value in sizes.items():
        flags += [
            f"--{name.replace('_', '-')}",
            "x".join(map(str, value)) if name == "image_size" else str(value),
        ]
    return flags


SMALL_ARGS = _flags(SMALL)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> SyntheticLayout:
    return generate(tmp_path_factory.mktemp("synth") / "data", seed=3, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _gray(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "L"
    return np.asarray(image)


def _sa1b_records(shards: list[Path]) -> list[tuple[dict, tuple[int, int]]]:
    """(json record, (H, W) of the decoded jpeg) for every SA-1B image, read with gzip + tarfile only."""
    records = []
    for shard in shards:
        with gzip.open(shard, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        stems = {name.rsplit(".", 1)[0] for name in members}
        assert set(members) == {f"{s}.{ext}" for s in stems for ext in ("jpg", "json")}
        for stem in sorted(stems):
            image = Image.open(io.BytesIO(members[f"{stem}.jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB"
            records.append((json.loads(members[f"{stem}.json"]), (image.height, image.width)))
    return records


def test_sa1b_shards_are_gzip_tars_with_every_field_consistent(layout: SyntheticLayout) -> None:
    assert [p.name for p in layout.sa1b_shards] == ["sa_000000.tar", "sa_000001.tar"]
    records = _sa1b_records(layout.sa1b_shards)
    assert len(records) == SMALL["num_shards"] * SMALL["num_images"]
    image_ids, ann_ids = [], []
    for record, (h, w) in records:
        info = record["image"]
        assert set(info) == {"image_id", "width", "height", "file_name"}
        assert (info["height"], info["width"]) == (h, w)
        assert info["file_name"] == f"sa_{info['image_id']}.jpg"
        image_ids.append(info["image_id"])
        assert len(record["annotations"]) >= 3
        for ann in record["annotations"]:
            assert set(ann) == {
                "id", "segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box",
                "stability_score",
            }  # fmt: skip
            ann_ids.append(ann["id"])
            rle = ann["segmentation"]
            assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert mask.shape == (h, w)
            assert ann["area"] == int(mask.sum()) > 0
            np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(rle))
            ys, xs = np.nonzero(mask)
            assert ann["bbox"][:2] == [xs.min(), ys.min()]
            [[x, y]] = ann["point_coords"]
            assert mask[int(y), int(x)] == 1
            assert len(ann["crop_box"]) == 4
            assert 0.0 < ann["predicted_iou"] < 1.1 and 0.0 < ann["stability_score"] <= 1.0
    assert len(set(image_ids)) == len(image_ids)
    assert len(set(ann_ids)) == len(ann_ids)


def test_sa1b_shards_stream_with_webdataset(layout: SyntheticLayout) -> None:
    urls = [str(p) for p in layout.sa1b_shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == SMALL["num_shards"] * SMALL["num_images"]
    for sample in samples:
        record = sample["json"]
        assert sample["__key__"] == f"sa_{record['image']['image_id']}"
        assert sample["jpg"].shape == (record["image"]["height"], record["image"]["width"], 3)


def test_sa1b_exact_alphas_lie_outside_the_tars_and_match_the_masks(layout: SyntheticLayout) -> None:
    n_alpha, coverage = 0, []
    for record, (h, w) in _sa1b_records(layout.sa1b_shards):
        folder = layout.sa1b_alpha / f"sa_{record['image']['image_id']}"
        anns = {a["id"]: a for a in record["annotations"]}
        for path in sorted(folder.glob("*.png")):
            alpha = _gray(path.read_bytes())
            assert alpha.shape == (h, w)
            mask = mask_utils.decode(
                {"size": [h, w], "counts": anns[int(path.stem)]["segmentation"]["counts"]}
            )
            # The mask binarises the object: every clearly visible alpha pixel lies inside it.
            strong = alpha > 0.3 * 255
            assert strong.any() and mask[strong].all()
            coverage.append(float((alpha > 0).mean()))
            n_alpha += 1
        # Stuff regions have no alpha: some annotations must lack one.
        assert len(anns) > len(list(folder.glob("*.png")))
    assert n_alpha >= len(layout.sa1b_shards) * SMALL["num_images"]
    # Several object scales, small objects (a few % of the image) included.
    assert min(coverage) < 0.05 and max(coverage) > 0.15, coverage


def test_fine_alpha_is_fractional_and_solid_alpha_binary(layout: SyntheticLayout) -> None:
    fractions = {"fine": [], "solid": []}
    for shard in layout.matting_train + layout.matting_val:
        members = _read_tar(shard)
        for name in members:
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            meta = json.loads(members[name])
            assert set(meta) == {"kind", "source"} and isinstance(meta["source"], str)
            alpha = _gray(members[f"{key}.alpha.png"])
            support = alpha > 0
            assert support.any()
            fractions[meta["kind"]].append(float((alpha[support] < 255).mean()))
    assert fractions["fine"] and fractions["solid"]
    assert np.mean(fractions["fine"]) > 0.25, fractions["fine"]
    assert max(fractions["solid"]) == 0.0


def test_matting_and_seg_shards_stream_with_webdataset(layout: SyntheticLayout) -> None:
    matting = list(wds.WebDataset([str(p) for p in layout.matting_train], shardshuffle=False).decode("l8"))
    assert len(matting) == SMALL["matting_train"]
    for sample in matting:
        assert {"jpg", "alpha.png", "json"} <= set(sample)
        assert sample["jpg"].shape == sample["alpha.png"].shape == SMALL["image_size"]
    seg = list(wds.WebDataset([str(p) for p in layout.seg], shardshuffle=False).decode("l8"))
    assert len(seg) == SMALL["seg"]
    for sample in seg:
        assert set(np.unique(sample["mask.png"])) == {0, 255}
        assert sample["json"]["kind"] == "solid"


def test_tar_members_sorted_with_fixed_metadata_and_gzip_without_timestamp(layout: SyntheticLayout) -> None:
    for shard in layout.sa1b_shards + layout.matting_train + layout.seg:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "", "", 0o644)
        }
    header = layout.sa1b_shards[0].read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b"  # gzip despite the .tar name
    assert header[3] & 0x08 == 0 and header[4:8] == b"\0\0\0\0"  # no file name, mtime 0
    assert not list(layout.root.rglob("*.partial"))


def test_micromat_parses_through_data_list(layout: SyntheticLayout) -> None:
    root = layout.micromat
    lines = (root / "data_list.txt").read_text().splitlines()
    assert len(lines) == SMALL["micromat"]
    subsets = set()
    for line in lines:
        img, matte, prompt, seg = line.split()
        subset = matte.split("/")[1]
        subsets.add(subset)
        assert img.startswith("img/") and all(
            p.startswith(f"{d}/{subset}/") for d, p in [("prompt", prompt), ("seg", seg)]
        )
        image = np.asarray(Image.open(root / img))
        alpha, mask = _gray((root / matte).read_bytes()), _gray((root / seg).read_bytes())
        h, w = image.shape[:2]
        assert alpha.shape == mask.shape == (h, w)
        assert set(np.unique(mask)) <= {0, 255}
        if subset == "coarse":
            assert set(np.unique(alpha)) == {0, 255}
        p = json.loads((root / prompt).read_text())
        ys, xs = np.nonzero(alpha)
        assert p["bbox"] == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert 0 <= p["bbox"][0] <= p["bbox"][2] < w and 0 <= p["bbox"][1] <= p["bbox"][3] < h
        labels = [label for _, _, label in p["point"]]
        assert 1 in labels and 0 in labels
        for x, y, label in p["point"]:
            assert 0 <= x < w and 0 <= y < h and label in (0, 1)
            assert (alpha[y, x] > 127) == (label == 1)
            if label == 0:  # "not this": never on the object's translucent parts
                assert alpha[y, x] == 0
    assert subsets == {"fine", "coarse"}


def test_am2k_and_aim500_layouts(layout: SyntheticLayout) -> None:
    for root in (layout.am2k, layout.aim500):
        stems = sorted(p.stem for p in (root / "original").glob("*.jpg"))
        assert len(stems) == SMALL["eval_images"]
        assert sorted(p.stem for p in (root / "mask").glob("*.png")) == stems
        assert sorted(p.stem for p in (root / "trimap").glob("*.png")) == stems
        for stem in stems:
            alpha = _gray((root / "mask" / f"{stem}.png").read_bytes())
            trimap = _gray((root / "trimap" / f"{stem}.png").read_bytes())
            assert set(np.unique(trimap)) <= {0, 128, 255} and 128 in trimap
            assert (alpha[trimap == 255] == 255).all() and (alpha[trimap == 0] == 0).all()
            # Every fractional pixel is unknown in the trimap.
            assert (trimap[(alpha > 0) & (alpha < 255)] == 128).all()
    assert layout.am2k.parts[-2:] == ("am2k", "validation")


def test_same_seed_same_bytes_through_the_cli_and_other_seed_differs(
    layout: SyntheticLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path / "same"), "--seed", "3", *SMALL_ARGS]) == 0
    assert "synthetic dataset" in capsys.readouterr().out
    expected = _files(layout.root)
    assert len(expected) > 40
    assert _files(tmp_path / "same") == expected
    assert main(["--out", str(tmp_path / "other"), "--seed", "4", *SMALL_ARGS]) == 0
    other = _files(tmp_path / "other")
    assert other["sa1b/sa_000000.tar"] != expected["sa1b/sa_000000.tar"]
    assert other["matting/train/matting-000000.tar"] != expected["matting/train/matting-000000.tar"]
    # Rerunning into an earlier output replaces it entirely: no file of the first seed lingers.
    assert main(["--out", str(tmp_path / "same"), "--seed", "4", *SMALL_ARGS]) == 0
    assert _files(tmp_path / "same") == other


def test_interrupted_tar_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sa_000000.tar"
    with pytest.raises(TypeError):
        write_tar(path, [("a.json", b"{}"), ("b.jpg", None)], compress=True)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_part_way_leaves_whole_files_only_and_says_it_is_incomplete(
    layout: SyntheticLayout, tmp_path: Path
) -> None:
    # A full disk, as a file size limit under the preview (the last and largest file): its write fails.
    expected = _files(layout.root)
    limit = max(len(data) for name, data in expected.items() if name != "preview.png") + 1
    assert len(expected["preview.png"]) > limit
    command = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "from zim_lightning.data.synthetic import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "data"
    args = ["--out", str(out), "--seed", "3", *SMALL_ARGS]
    failed = subprocess.run([sys.executable, "-c", command, *args], capture_output=True, timeout=300)
    assert failed.returncode != 0
    written = _files(out)
    assert "preview.png" not in written
    assert set(written) < set(expected)  # no temporary files either
    assert all(data == expected[name] for name, data in written.items() if name != "synthetic.json")
    assert not is_complete(out)  # (what `make train-zim` checks before it reuses DATA)
    assert main(args) == 0
    assert is_complete(out) and _files(out) == expected
    marker = json.loads((out / "synthetic.json").read_text())
    del marker["complete"]  # an earlier version's marker: complete or not, nothing says
    (out / "synthetic.json").write_text(json.dumps(marker))
    assert not is_complete(out) and not is_complete(tmp_path / "missing")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-size", "96by128"], "HxW"),
        (["--image-size", "16x16"], ">= 64"),
        (["--num-images", "0"], "positive integer"),
        (["--num-shards", "-2"], "positive integer"),
        (["--seed", "x"], "non-negative integer"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "x"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unwritable_or_foreign_out_returns_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["--out", str(blocker / "data")]) == 2
    err = capsys.readouterr().err
    assert "not a writable directory" in err and "a_file" in err
    assert main(["--out", str(blocker)]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"keep me")
    assert main(["--out", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    # a file that is merely named like the marker does not make a folder of real data deletable
    (foreign / "synthetic.json").write_text("{}")
    (foreign / "sa1b").mkdir()
    (foreign / "sa1b" / "sa_000000.tar").write_bytes(b"real data")
    assert main(["--out", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "sa1b" / "sa_000000.tar").read_bytes() == b"real data"
    with pytest.raises(ValueError, match="matting_train"):
        generate(tmp_path / "y", matting_train=0)


def test_the_full_size_sa1b_flag_and_its_older_name() -> None:
    assert _parser().parse_args(["--out", "x", "--sa1b-full-size"]).sa1b_full_size
    assert _parser().parse_args(["--out", "x", "--sa1b-size"]).sa1b_full_size
    assert not _parser().parse_args(["--out", "x"]).sa1b_full_size


TINY = {**dict.fromkeys(SMALL, 1), "image_size": (64, 80)}  # one of everything


def _members(shards: list[Path]) -> dict[str, bytes]:
    return {name: data for shard in shards for name, data in _read_tar(shard).items()}


def test_sa1b_images_take_their_own_size_and_the_full_size_flag_the_real_one(tmp_path: Path) -> None:
    layout = generate(tmp_path / "d", seed=1, **TINY, sa1b_size=(96, 128))
    assert [size for _, size in _sa1b_records(layout.sa1b_shards)] == [(96, 128)]
    (jpg,) = [data for name, data in _members(layout.matting_train).items() if name.endswith(".jpg")]
    assert Image.open(io.BytesIO(jpg)).size == (80, 64)
    assert main(["--out", str(tmp_path / "full"), "--sa1b-full-size", *_flags(TINY)]) == 0
    records = _sa1b_records(sorted((tmp_path / "full" / "sa1b").glob("*.tar")))
    assert [size for _, size in records] == [SA1B_FULL_SIZE]
    assert [(r["image"]["height"], r["image"]["width"]) for r, _ in records] == [SA1B_FULL_SIZE]


def test_every_split_holds_exactly_its_count_and_validation_is_not_training_data(tmp_path: Path) -> None:
    layout = generate(
        tmp_path / "d", seed=2, **{**TINY, "matting_train": 3, "matting_val": 3, "shard_size": 2}
    )
    train, val = _members(layout.matting_train), _members(layout.matting_val)
    assert [p.name for p in layout.matting_val] == ["matting-000000.tar", "matting-000001.tar"]
    train_keys = sorted(n.removesuffix(".json") for n in train if n.endswith(".json"))
    val_keys = sorted(n.removesuffix(".json") for n in val if n.endswith(".json"))
    assert train_keys == [f"synth_train_{i:06d}" for i in range(3)]
    assert val_keys == [f"synth_val_{i:06d}" for i in range(3)]
    assert sorted(n for n in _members(layout.seg) if n.endswith(".json")) == ["synth_seg_000000.json"]
    # every sample is its own draw, and no validation image or alpha repeats a training one
    train_images, val_images = [train[f"{k}.jpg"] for k in train_keys], [val[f"{k}.jpg"] for k in val_keys]
    assert len(set(train_images)) == 3 and len(set(val_images)) == 3
    assert not set(train_images) & set(val_images)
    assert not {train[f"{k}.alpha.png"] for k in train_keys} & {val[f"{k}.alpha.png"] for k in val_keys}


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"num_shards": True}, "num_shards"),
        ({"image_size": (32, 80)}, "image_size side"),
        ({"sa1b_size": (64, 32)}, "sa1b_size side"),
        ({"image_size": (64, 64, 64)}, "image_size must be (H, W)"),
    ],
)
def test_generate_refuses_bad_sizes_before_writing(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=re.escape(word)):
        generate(tmp_path / "d", **{**TINY, **kwargs})
    assert not (tmp_path / "d").exists()


def test_negative_prompt_points_never_fall_on_translucent_parts() -> None:
    # MicroMat-3K "not this" clicks must lie off the matte entirely (alpha 0), even when most of the
    # area around the object is translucent (smoke, glass)
    alpha = np.full((40, 40), 0.3, np.float32)
    alpha[15:25, 15:25] = 1.0
    alpha[0, :3] = 0.0
    for seed in range(5):
        points = _prompt(np.random.default_rng(seed), alpha)["point"]
        negatives = [(x, y) for x, y, label in points if label == 0]
        assert len(negatives) == 2 and all(alpha[y, x] == 0.0 for x, y in negatives)
        assert all(alpha[y, x] > 0.5 for x, y, label in points if label == 1)


def test_sa1b_images_carry_fine_objects_with_fractional_alpha(tmp_path: Path) -> None:
    # the SA1B-Matte builder is measured against these alphas: some must hold micro detail
    layout = generate(tmp_path / "d", seed=5, **{**TINY, "num_images": 3})
    alphas = [np.asarray(Image.open(path)) for path in sorted(layout.sa1b_alpha.rglob("*.png"))]
    assert any(((a > 0) & (a < 255)).sum() > 0.25 * (a > 0).sum() for a in alphas)


def test_sa1b_annotations_smaller_than_the_minimum_area_are_dropped(tmp_path: Path) -> None:
    # at seed 0 and 64x64, image 37 has a background region of 15 pixels: it must not become an
    # annotation (a sliver, or an empty mask whose point_coords cannot be drawn)
    layout = generate(tmp_path / "d", seed=0, **{**TINY, "num_images": 37, "image_size": (64, 64)})
    areas = [ann["area"] for record, _ in _sa1b_records(layout.sa1b_shards) for ann in record["annotations"]]
    assert len(areas) > 37 * 3 and min(areas) >= MIN_MASK_AREA
