"""`zim-lightning pack-shards` (data/pack.py): folders of images and alphas or masks -> shards the
converter stage reads."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zim_lightning.data.datamodule import ZimDataModule
from zim_lightning.data.decode import scale_16_bit
from zim_lightning.data.matting import decode_matting, decode_segmentation
from zim_lightning.data.pack import main, pack
from zim_lightning.data.sa1b import iter_tar
from zim_lightning.data.tar_writer import encode_png


def _scene(seed: int, height: int = 40, width: int = 56) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = np.zeros((height, width), np.uint8)
    alpha[8:30, 10:40] = rng.integers(1, 256, (22, 30), dtype=np.uint8)
    return image, alpha


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A dataset as public matting sets ship: images/ and alphas/ sharing stems, with their quirks."""
    images, alphas = tmp_path / "images", tmp_path / "alphas"
    images.mkdir()
    alphas.mkdir()
    truth = {}
    image, alpha = _scene(0)
    Image.fromarray(image).save(images / "a.jpg", quality=95)
    Image.fromarray(alpha).save(alphas / "a.png")
    truth["a"] = (np.asarray(Image.open(images / "a.jpg").convert("RGB")), alpha)
    image, alpha = _scene(1)
    Image.fromarray(image).save(images / "b.png")  # a PNG image, stored as it is
    Image.fromarray(alpha.astype(np.uint16) * 257).save(alphas / "b.png")  # a 16-bit alpha
    truth["b"] = (image, alpha)
    image, alpha = _scene(2)
    Image.fromarray(image).save(images / "c.v2.JPG", quality=95)  # dots in the stem, upper-case suffix
    Image.fromarray(np.dstack([alpha] * 3)).save(alphas / "c.v2.png")  # an alpha saved as RGB
    truth["c_v2"] = (np.asarray(Image.open(images / "c.v2.JPG").convert("RGB")), alpha)
    image, alpha = _scene(3)
    Image.fromarray(image).save(images / "d.jpg")  # no alpha
    Image.fromarray(alpha).save(alphas / "e.png")  # no image
    Image.fromarray(image).save(images / "f.jpg")
    Image.fromarray(alpha[:20]).save(alphas / "f.png")  # another size: skipped
    Image.fromarray(image).save(images / "g.jpg", quality=95)
    jpeg = (images / "g.jpg").read_bytes()
    (images / "g.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # a truncated download: skipped
    Image.fromarray(alpha).save(alphas / "g.png")
    return images, alphas, truth


def test_pairs_are_packed_into_shards_the_readers_decode(folders, tmp_path) -> None:
    images, alphas, truth = folders
    summary = pack(images=images, labels=alphas, out=tmp_path / "out", shard_size=2)
    assert [p.name for p in summary.shards] == ["matting-000000.tar", "matting-000001.tar"]
    assert summary.samples == 3 and [s.split()[0] for s in summary.skipped] == ["f.jpg", "g.jpg"]
    assert "f.png is 56x20, its image 56x40" in summary.skipped[0]
    assert "cannot decode image g.jpg" in summary.skipped[1]  # verify() alone would have packed it
    assert summary.unmatched_images == ["d.jpg"] and summary.unmatched_labels == ["e.png"]
    decoded = {}
    for shard in summary.shards:
        for sample in iter_tar(str(shard)):
            decoded[sample["__key__"]] = decode_matting(sample)
    assert sorted(decoded) == ["a", "b", "c_v2"]
    for key, (image, alpha) in truth.items():
        np.testing.assert_array_equal(decoded[key][0], image)  # the image's own bytes
        np.testing.assert_array_equal(decoded[key][1], alpha)  # 16-bit and RGB alphas as 8-bit
    # the same input gives the same bytes
    again = pack(images=images, labels=alphas, out=tmp_path / "again", shard_size=2)
    assert [p.read_bytes() for p in again.shards] == [p.read_bytes() for p in summary.shards]
    # and the converter stage trains on them
    data = ZimDataModule(
        stage="converter",
        val_shards=[str(p) for p in summary.shards],
        batch_size=3,
        num_workers=0,
        crop_size=32,
    )
    batch = next(iter(data.val_dataset(rank=0, world_size=1)))
    assert sorted(batch["key"]) == ["a", "b", "c_v2"] and data.skips.total() == 0


def test_masks_make_segmentation_shards(folders, tmp_path) -> None:
    images, alphas, _ = folders
    summary = pack(images=images, labels=alphas, out=tmp_path / "seg", masks=True)
    assert [p.name for p in summary.shards] == ["seg-000000.tar"]
    for sample in iter_tar(str(summary.shards[0])):
        _, mask = decode_segmentation(sample)
        assert set(np.unique(mask)) <= {0.0, 1.0} and mask.any()


def test_bad_input_is_a_usage_error(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in (
        (["--images", str(tmp_path / "missing"), "--alphas", str(empty)], "is not a folder"),
        (["--images", str(empty), "--alphas", str(empty)], "no image in"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(tmp_path / "out")])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_keys_the_readers_keep_reruns_that_leave_no_stale_shards_and_masks_of_0_and_1(tmp_path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, stem in enumerate(["__x", "_.y", "a.b", "a_b", "ok"]):
        image, alpha = _scene(i)
        Image.fromarray(image).save(images / f"{stem}.png")
        Image.fromarray((alpha > 0).astype(np.uint8)).save(masks / f"{stem}.png")  # class indices 0 / 1
    out = tmp_path / "seg"
    first = pack(images=images, labels=masks, out=out, masks=True, shard_size=2)
    assert len(first.shards) == 3
    keys = sorted(s["__key__"] for shard in first.shards for s in iter_tar(str(shard)))
    assert keys == ["a_b", "a_b_2", "ok", "x", "y"]  # none starts with "__" (readers skip those)
    for shard in first.shards:
        for sample in iter_tar(str(shard)):
            assert decode_segmentation(sample)[1].any()  # 0 / 1 masks are not emptied
    again = pack(images=images, labels=masks, out=out, masks=True, shard_size=5)
    assert [p.name for p in again.shards] == ["seg-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["seg-000000.tar", "seg.pack.json"]


def test_shards_packed_from_other_folders_are_not_replaced_without_overwrite(
    folders, tmp_path, capsys
) -> None:
    images, alphas, _ = folders
    out = tmp_path / "out"
    first = pack(images=images, labels=alphas, out=out, shard_size=1)
    kept = {p: p.read_bytes() for p in first.shards}
    other_images, other_alphas = tmp_path / "other_images", tmp_path / "other_alphas"
    other_images.mkdir()
    other_alphas.mkdir()
    image, alpha = _scene(9)
    Image.fromarray(image).save(other_images / "z.png")
    Image.fromarray(alpha).save(other_alphas / "z.png")
    argv = ["--images", str(other_images), "--alphas", str(other_alphas), "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"packed from {images.resolve()} and {alphas.resolve()}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.glob("*.tar")} == kept  # nothing replaced or removed
    (out / "matting.pack.json").unlink()  # shards of unknown origin are not replaced either
    with pytest.raises(ValueError, match="with no matting.pack.json saying what they hold"):
        pack(images=other_images, labels=other_alphas, out=out)
    assert main([*argv, "--overwrite"]) == 0
    assert [p.name for p in sorted(out.glob("*.tar"))] == ["matting-000000.tar"]


def test_the_record_names_resolved_folders_and_the_kind_from_the_first_shard(
    folders, tmp_path, monkeypatch
) -> None:
    images, alphas, _ = folders
    out = tmp_path / "out"
    pack(images=images, labels=alphas, out=out, shard_size=100)  # a single shard
    record = json.loads((out / "matting.pack.json").read_text())
    assert record["images"] == str(images.resolve()) and record["labels"] == str(alphas.resolve())
    assert (record["complete"], record["shards"], record["samples"]) == (True, 1, 3)  # a, b and c.v2
    monkeypatch.chdir(tmp_path)  # the same folders by relative paths: a rerun, not another dataset
    pack(images=images.relative_to(tmp_path), labels=alphas.relative_to(tmp_path), out=out, shard_size=100)
    with pytest.raises(ValueError, match="already holds"):  # the same folders packed as masks: another
        pack(images=images, labels=alphas, out=out, name="matting", masks=True)


def test_nothing_is_written_when_no_pair_can_be_packed(folders, tmp_path) -> None:
    images, alphas, _ = folders
    for path in alphas.iterdir():
        Image.fromarray(np.zeros_like(np.asarray(Image.open(path)))).save(path)
    with pytest.raises(ValueError, match="none of the 5 pairs could be packed: .*empty"):
        pack(images=images, labels=alphas, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_16_bit_alphas_round_to_the_nearest_8_bit_level():
    # exact multiples of 257 hide truncation: these do not
    np.testing.assert_array_equal(scale_16_bit(np.array([128, 129, 65534, 65535])), [0, 1, 255, 255])


def test_segmentation_masks_are_split_at_the_midpoint():
    # a lossily encoded mask has values between 0 and 255 along its edges: only those above half count
    image = io.BytesIO()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(image, format="PNG")
    mask = np.array([[0, 100], [200, 255]], np.uint8)
    _, decoded = decode_segmentation({"__key__": "k", "png": image.getvalue(), "mask.png": encode_png(mask)})
    np.testing.assert_array_equal(decoded, [[0, 0], [1, 1]])


def _pair(images: Path, labels: Path, stem: str, seed: int, *, image_suffix: str = ".png") -> np.ndarray:
    """One image / alpha pair of :func:`_scene` saved under ``stem``; returns the alpha."""
    image, alpha = _scene(seed)
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    Image.fromarray(image).save(images / f"{stem}{image_suffix}", quality=95)
    Image.fromarray(alpha).save(labels / f"{stem}.png")
    return alpha


def _samples(shards: list[Path]) -> dict[str, dict]:
    return {s["__key__"]: s for shard in shards for s in iter_tar(str(shard))}


def test_each_sample_records_its_kind_and_source_file(tmp_path) -> None:
    # a wrong default kind or source would silently mislabel every sample the converter trains on
    images, labels = tmp_path / "AM-2K-original", tmp_path / "AM-2K-mask"
    _pair(images, labels, "a", 0)
    alpha = pack(images=images, labels=labels, out=tmp_path / "m")
    assert json.loads(_samples(alpha.shards)["a"]["json"]) == {
        "kind": "fine",
        "source": "AM-2K-original/a.png",
    }
    seg = pack(images=images, labels=labels, out=tmp_path / "s", masks=True)
    assert json.loads(_samples(seg.shards)["a"]["json"])["kind"] == "solid"
    named = pack(images=images, labels=labels, out=tmp_path / "n", kind="solid", source="mine")
    assert json.loads(_samples(named.shards)["a"]["json"]) == {"kind": "solid", "source": "mine/a.png"}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"kind": "hair"}, "kind must be one of"),
        ({"shard_size": 0}, "shard_size must be >= 1"),
        ({"name": "set[1]"}, "name must start with a letter or digit"),  # a glob pattern, not a name
        ({"name": "../up"}, "name must start with a letter or digit"),
        ({"name": "a{0..3}"}, "name must start with a letter or digit"),  # breaks the brace pattern
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, option: dict, message: str) -> None:
    images, labels = tmp_path / "images", tmp_path / "alphas"
    _pair(images, labels, "a", 0)
    with pytest.raises(ValueError, match=message):
        pack(images=images, labels=labels, out=tmp_path / "out", **option)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alphas", "images"]


def test_a_jpeg_suffix_is_stored_as_the_jpg_member_the_readers_decode(tmp_path) -> None:
    images, labels = tmp_path / "images", tmp_path / "alphas"
    alpha = _pair(images, labels, "a", 0, image_suffix=".jpeg")
    sample = _samples(pack(images=images, labels=labels, out=tmp_path / "out").shards)["a"]
    assert set(sample) >= {"jpg", "alpha.png", "json"}
    image, decoded = decode_matting(sample)
    np.testing.assert_array_equal(decoded, alpha)
    assert image.shape == (*alpha.shape, 3)


def test_a_stem_with_several_files_takes_the_first_suffix_in_order(tmp_path) -> None:
    # images: .jpg before .png; labels: .png before .tif (a folder holding both must not pick at random)
    images, labels = tmp_path / "images", tmp_path / "alphas"
    alpha = _pair(images, labels, "a", 0, image_suffix=".jpg")
    Image.fromarray(_scene(7)[0]).save(images / "a.png")
    Image.fromarray(np.full_like(alpha, 255)).save(labels / "a.tif")
    sample = _samples(pack(images=images, labels=labels, out=tmp_path / "out").shards)["a"]
    assert "png" not in sample and sample["jpg"] == (images / "a.jpg").read_bytes()
    np.testing.assert_array_equal(decode_matting(sample)[1], alpha)


def test_shards_of_another_name_sharing_the_prefix_are_left_alone(tmp_path) -> None:
    # "matting-val-000000.tar" is not one of the "matting" shards: a rerun must neither delete it
    # as stale nor count it as shards of "matting" packed from other folders
    out = tmp_path / "out"
    _pair(tmp_path / "val_images", tmp_path / "val_alphas", "v", 1)
    val = pack(images=tmp_path / "val_images", labels=tmp_path / "val_alphas", out=out, name="matting-val")
    _pair(tmp_path / "images", tmp_path / "alphas", "a", 0)
    pack(images=tmp_path / "images", labels=tmp_path / "alphas", out=out, name="matting")
    assert val.shards[0].is_file()
    assert sorted(p.name for p in out.glob("*.tar")) == ["matting-000000.tar", "matting-val-000000.tar"]


def test_shards_are_plain_uncompressed_tars(tmp_path) -> None:
    images, labels = tmp_path / "images", tmp_path / "alphas"
    _pair(images, labels, "a", 0)
    summary = pack(images=images, labels=labels, out=tmp_path / "out")
    assert summary.shards[0].read_bytes()[:2] != b"\x1f\x8b"
    with tarfile.open(summary.shards[0], "r:") as tar:
        assert sorted(tar.getnames()) == ["a.alpha.png", "a.json", "a.png"]


def test_an_unreadable_record_is_reported_as_shards_of_unknown_origin(tmp_path) -> None:
    # a damaged <name>.pack.json must give the usual refusal, not a JSON parser error
    images, labels = tmp_path / "images", tmp_path / "alphas"
    _pair(images, labels, "a", 0)
    out = tmp_path / "out"
    pack(images=images, labels=labels, out=out)
    (out / "matting.pack.json").write_text("{not json")
    with pytest.raises(ValueError, match="with no matting.pack.json saying what they hold"):
        pack(images=images, labels=labels, out=out)
    assert pack(images=images, labels=labels, out=out, overwrite=True).samples == 1


def test_a_folder_named_like_an_image_is_not_a_sample(tmp_path) -> None:
    images, labels = tmp_path / "images", tmp_path / "alphas"
    _pair(images, labels, "a", 0)
    (images / "b.png").mkdir()
    (labels / "b.png").mkdir()
    summary = pack(images=images, labels=labels, out=tmp_path / "out")
    assert summary.samples == 1 and summary.skipped == []
    assert summary.unmatched_images == [] and summary.unmatched_labels == []


def test_a_run_stopped_part_way_says_so_and_a_rerun_completes_it_without_a_killed_runs_leftovers(
    tmp_path,
) -> None:
    images, labels = tmp_path / "images", tmp_path / "alphas"
    for stem in "abc":
        _pair(images, labels, stem, ord(stem))
    big = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(big).save(images / "d.png")  # the last shard: far over the size limit below
    Image.fromarray(big[..., 0]).save(labels / "d.png")
    reference = pack(images=images, labels=labels, out=tmp_path / "reference", shard_size=1)
    out = tmp_path / "out"
    # A full disk while the last shard is written, as a file size limit
    limit = max(p.stat().st_size for p in reference.shards[:-1]) + 1
    assert reference.shards[-1].stat().st_size > limit
    command = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "from zim_lightning.data.pack import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["--images", str(images), "--alphas", str(labels), "--out", str(out), "--shard-size", "1"]
    assert subprocess.run([sys.executable, "-c", command, *args], capture_output=True, timeout=120).returncode
    record = json.loads((out / "matting.pack.json").read_text())
    assert record["complete"] is False
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.shards[:-1]) + [
        "matting.pack.json"
    ]
    (out / ".matting-000009.tar.partial").write_bytes(b"a write that SIGKILL stopped")
    (out / ".other-000000.tar.partial").write_bytes(b"another name's: not this run's to remove")
    assert main(args) == 0  # the same folders: no --overwrite needed
    record = json.loads((out / "matting.pack.json").read_text())
    assert (record["complete"], record["shards"], record["samples"]) == (True, 4, 4)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
        p.name: p.read_bytes() for p in reference.shards
    }
    assert sorted(p.name for p in out.glob(".*")) == [".other-000000.tar.partial"]
