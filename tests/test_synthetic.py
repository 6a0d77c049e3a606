"""The synthetic dataset: every format reads back with independent readers, alpha is exact, bytes repeat."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from zim_lightning.data.synthetic import SyntheticLayout, generate, main
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
SMALL_ARGS = [
    "--num-shards", "2", "--num-images", "3", "--image-size", "96x128", "--matting-train", "8",
    "--matting-val", "2", "--seg", "4", "--shard-size", "4", "--micromat", "5", "--eval-images", "3",
]  # fmt: skip


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


def _sa1b_records(layout: SyntheticLayout) -> list[tuple[dict, tuple[int, int]]]:
    """(json record, (H, W) of the decoded jpeg) for every SA-1B image, read with gzip + tarfile only."""
    records = []
    for shard in layout.sa1b_shards:
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
    records = _sa1b_records(layout)
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
    for record, (h, w) in _sa1b_records(layout):
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
    from zim_lightning.data.synthetic import _parser

    assert _parser().parse_args(["--out", "x", "--sa1b-full-size"]).sa1b_full_size
    assert _parser().parse_args(["--out", "x", "--sa1b-size"]).sa1b_full_size
    assert not _parser().parse_args(["--out", "x"]).sa1b_full_size
