"""SA-1B / SA1B-Matte tar reading: decoders, RLE validation, truncated tars (and the tar writers the other
data tests use)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from zim_lightning.data.decode import jpeg_reduction, scale_16_bit
from zim_lightning.data.matting import decode_matting, decode_segmentation
from zim_lightning.data.sa1b import (
    CorruptSample,
    check_decoded_size,
    decode_gray,
    decode_image,
    decode_mask,
    decode_matte,
    iter_sa1b,
    iter_tar,
    parse_annotations,
    rle_counts,
    sa1b_record,
    tar_samples,
)
from zim_lightning.data.skips import SkipCounter, SkipTally

# ----------------------------------------------------------------------------- writers (real formats)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], *, compress: bool = False) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A random image with one soft-edged ellipse; returns (image HxWx3 uint8, alpha HxW uint8)."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.15, 0.3) * width
    distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    alpha = np.clip((1.15 - distance) / 0.3, 0, 1)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return image, (alpha * 255).astype(np.uint8)


def small_sa1b_members(count: int) -> list[tuple[str, bytes]]:
    """``count`` SA-1B samples sa_0, sa_1, ... of 32x32 images with one mask each (seeded)."""
    rng = np.random.default_rng(4)
    members = []
    for i in range(count):
        image, alpha = scene(rng, 32, 32)
        members += sa1b_members(f"sa_{i}", image, [alpha > 127])
    return members


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": encoded["counts"].decode("ascii")}


def sa1b_members(
    key: str, image: np.ndarray, masks: list[np.ndarray], *, first_id: int = 0
) -> list[tuple[str, bytes]]:
    height, width = image.shape[:2]
    annotations = [
        {
            "id": first_id + i,
            "segmentation": rle(m),
            "bbox": [0, 0, width, height],
            "area": int(m.sum()),
            "predicted_iou": 0.9,
            "point_coords": [[0, 0]],
            "crop_box": [0, 0, width, height],
            "stability_score": 0.9,
        }
        for i, m in enumerate(masks)
    ]
    record = {
        "image": {"image_id": 1, "width": width, "height": height, "file_name": f"{key}.jpg"},
        "annotations": annotations,
    }
    return [(f"{key}.jpg", jpeg(image)), (f"{key}.json", json.dumps(record).encode())]


def sa1b_matte_members(key: str, image: np.ndarray, alphas: list[np.ndarray]) -> list[tuple[str, bytes]]:
    """SA1B-Matte sample: SA-1B json + per annotation a matte entry and the alpha of its box."""
    members = dict(sa1b_members(key, image, [a > 127 for a in alphas]))
    record = json.loads(members[f"{key}.json"])
    extra = []
    for annotation, alpha in zip(record["annotations"], alphas, strict=True):
        ys, xs = np.nonzero(alpha)
        x, y, w, h = int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        member = f"matte_{annotation['id']}.png"
        annotation["matte"] = {"member": member, "box": [x, y, w, h]}
        extra.append((f"{key}.{member}", png(alpha[y : y + h, x : x + w])))
    return [(f"{key}.jpg", members[f"{key}.jpg"]), (f"{key}.json", json.dumps(record).encode()), *extra]


def matting_members(key: str, image: np.ndarray, alpha: np.ndarray) -> list[tuple[str, bytes]]:
    meta = json.dumps({"kind": "fine", "source": "test"}).encode()
    return [(f"{key}.alpha.png", png(alpha)), (f"{key}.jpg", jpeg(image)), (f"{key}.json", meta)]


def seg_members(key: str, image: np.ndarray, mask: np.ndarray) -> list[tuple[str, bytes]]:
    meta = json.dumps({"kind": "solid", "source": "test"}).encode()
    return [(f"{key}.jpg", jpeg(image)), (f"{key}.mask.png", png(mask)), (f"{key}.json", meta)]


# ----------------------------------------------------------------------------- tests


def test_rle_counts_agree_with_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = rng.integers(1, 120, size=2)
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        encoded = mask_utils.encode(np.asfortranarray(mask))
        runs = rle_counts(encoded["counts"])
        assert runs.sum() == height * width
        assert runs[1::2].sum() == mask.sum()
        if mask.any():
            annotation = {
                "id": 1,
                "segmentation": {"size": [int(height), int(width)], "counts": encoded["counts"].decode()},
            }
            np.testing.assert_array_equal(decode_mask(annotation, key="k"), mask)


@pytest.mark.parametrize(
    ("segmentation", "image_size", "reason"),
    [
        ({"size": [4, 5], "counts": "2"}, None, "bad_rle"),  # runs cover 2 of 20 pixels
        ({"size": [4, 5], "counts": "zzzz"}, None, "bad_rle"),  # outside the RLE alphabet
        ({"size": [4, 5], "counts": "52207"}, (5, 4), "bad_rle"),  # wrong size for the image
        ({"size": [4, 5], "counts": "d0"}, None, "empty_mask"),  # one background run of 20
        ({"size": [4], "counts": "d0"}, None, "bad_rle"),
    ],
)
def test_decode_mask_rejects_malformed_rle_wrong_size_and_empty(segmentation, image_size, reason):
    with pytest.raises(CorruptSample, match="sa_7") as caught:
        decode_mask({"id": 3, "segmentation": segmentation}, key="sa_7", image_size=image_size)
    assert caught.value.reason == reason


def test_parse_annotations_validates_structure():
    rng = np.random.default_rng(1)
    image, alpha = scene(rng, 40, 60)
    members = dict(sa1b_members("sa_1", image, [alpha > 127]))
    record = parse_annotations(members["sa_1.json"], key="sa_1")
    assert record["image"]["width"] == 60 and len(record["annotations"]) == 1
    broken = json.loads(members["sa_1.json"])
    broken["annotations"].append("not an object")
    for bad in (
        b"{not json",
        b"[]",
        json.dumps({"image": {"width": 1}}).encode(),
        json.dumps(broken).encode(),
        b"[" * 100_000,  # nested past the parser's depth: a RecursionError, not a skip, before
        json.dumps({"image": {"width": 10**6, "height": 10**6}, "annotations": []}).encode(),  # no such jpg
    ):
        with pytest.raises(CorruptSample, match="sa_1") as caught:
            parse_annotations(bad, key="sa_1")
        assert caught.value.reason == "bad_json"


def test_decode_image_reduces_large_jpegs_and_rejects_corrupt_ones():
    rng = np.random.default_rng(2)
    image, _ = scene(rng, 300, 520)
    data = jpeg(image)
    assert decode_image(data, key="a").shape == (300, 520, 3)
    reduced = decode_image(data, key="a", max_side=128)  # 520 >= 4 * 128: DCT scale 1/4
    assert reduced.shape == (75, 130, 3)
    check_decoded_size(reduced, (300, 520), key="a", max_side=128)
    with pytest.raises(CorruptSample):
        check_decoded_size(reduced, (310, 520), key="a", max_side=128)
    # a smaller image is a bad pair wherever no reduced decode was asked for, or not this one
    with pytest.raises(CorruptSample, match="image is 130x75, its labels say 520x300"):
        check_decoded_size(reduced, (300, 520), key="a")
    check_decoded_size(reduced, (300, 520), key="a", max_side=64)  # 1/8 asked, Pillow may stop at 1/4
    with pytest.raises(CorruptSample):
        check_decoded_size(reduced, (300, 520), key="a", max_side=200)  # at most 1/2 asked
    assert decode_image(data, key="a", max_side=300).shape == (300, 520, 3)  # under 2x: full decode
    # a side shorter than the reduction (a 4096x3 strip for the 1024 frame) still decodes
    strip = decode_image(jpeg(np.zeros((3, 4096, 3), np.uint8)), key="strip", max_side=1024)
    check_decoded_size(strip, (3, 4096), key="strip", max_side=1024)
    odd = decode_image(jpeg(np.zeros((1501, 2251, 3), np.uint8)), key="odd", max_side=1024)
    assert odd.shape == (751, 1126, 3)  # exactly the 1/2 scale asked for, odd sides too
    with pytest.raises(CorruptSample, match="broken") as caught:
        decode_image(data[: len(data) // 2], key="broken")
    assert caught.value.reason == "corrupt_image"


def test_decode_image_scales_16_bit_grayscale_and_refuses_floating_point():
    # pack-shards stores a dataset's PNG images byte for byte; Pillow's convert("RGB") clips 16-bit
    # values at 255, which made such an image white
    ramp16 = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(3, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(ramp16).save(buffer, format="PNG")  # mode I;16
    image = decode_image(buffer.getvalue(), key="a")
    assert image.shape == (3, 256, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(
        image, np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, 0).repeat(3, 2)
    )
    floating = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)).save(floating, format="TIFF")
    with pytest.raises(CorruptSample, match="floating-point image, whose value range is unknown") as caught:
        decode_image(floating.getvalue(), key="f")
    assert caught.value.reason == "corrupt_image"
    gray8 = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20  # 8-bit grayscale: each channel the gray
    np.testing.assert_array_equal(decode_image(png(gray8), key="g"), gray8[..., None].repeat(3, 2))


def test_decode_gray_rescales_16_bit_and_rejects_alpha_channels():
    ramp16 = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(3, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(ramp16).save(buffer, format="PNG")  # a 16-bit grayscale PNG (mode I;16)
    np.testing.assert_array_equal(decode_gray(buffer.getvalue(), key="a")[0], np.arange(256))
    rgb = io.BytesIO()
    Image.fromarray(np.full((4, 5, 3), 77, np.uint8)).save(rgb, format="PNG")  # an alpha saved as RGB
    np.testing.assert_array_equal(decode_gray(rgb.getvalue(), key="a"), np.full((4, 5), 77))
    rgba = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(rgba, format="PNG")
    with pytest.raises(CorruptSample, match="mode RGBA with an alpha channel") as caught:
        decode_gray(rgba.getvalue(), key="a")
    assert caught.value.reason == "corrupt_image"
    narrow = io.BytesIO()  # 8-bit values widened to 16 bits without scaling: alpha 0.004 at most
    Image.fromarray(np.arange(256, dtype=np.uint16)[None].repeat(2, axis=0)).save(narrow, format="PNG")
    with pytest.raises(CorruptSample, match="8-bit values .* in a 16-bit file") as caught:
        decode_gray(narrow.getvalue(), key="a")
    assert caught.value.reason == "corrupt_image"
    floating = io.BytesIO()  # a float TIFF in [0, 1]: Pillow's 8-bit conversion would truncate it to 0 / 1
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)).save(floating, format="TIFF")
    with pytest.raises(CorruptSample, match="floating-point image, whose value range is unknown") as caught:
        decode_gray(floating.getvalue(), key="a")
    assert caught.value.reason == "corrupt_image"
    empty = io.BytesIO()  # an all-zero 16-bit label is not refused here (the readers skip empty ones)
    Image.fromarray(np.zeros((2, 3), np.uint16)).save(empty, format="PNG")
    assert not decode_gray(empty.getvalue(), key="a").any()


def test_decode_matte_pastes_the_box(tmp_path):
    rng = np.random.default_rng(3)
    image, alpha = scene(rng, 48, 64)
    members = dict(sa1b_matte_members("sa_2", image, [alpha]))
    record = parse_annotations(members["sa_2.json"], key="sa_2")
    sample = {name.split(".", 1)[1]: data for name, data in members.items()}
    np.testing.assert_array_equal(
        decode_matte(sample, record["annotations"][0], key="sa_2", image_size=(48, 64)), alpha
    )
    with pytest.raises(CorruptSample) as caught:
        decode_matte({}, record["annotations"][0], key="sa_2", image_size=(48, 64))
    assert caught.value.reason == "missing_member"


@pytest.mark.parametrize("compress", [False, True])
def test_iter_tar_stops_at_truncation_and_counts_it(tmp_path, compress):
    members = small_sa1b_members(6)
    full = write_tar(tmp_path / "full.tar", members, compress=compress)
    complete = list(iter_tar(str(full)))
    assert [s["__key__"] for s in complete] == [f"sa_{i}" for i in range(6)]
    data = full.read_bytes()
    for cut in (len(data) // 3, len(data) // 2):
        truncated = tmp_path / "cut.tar"
        truncated.write_bytes(data[:cut])
        counter = SkipCounter()
        partial = list(iter_tar(str(truncated), counter=counter))
        assert counter.counts()["truncated_tar"] == 1
        assert 0 < len(partial) < 6
        # the samples before the damage are complete and unchanged (only their url differs)
        for got, expected in zip(partial, complete, strict=False):
            assert {k: v for k, v in got.items() if k != "__url__"} == {
                k: v for k, v in expected.items() if k != "__url__"
            }


def test_a_sample_skipped_again_is_counted_again_and_logged_once(caplog):
    counter = SkipCounter()
    with caplog.at_level("WARNING", logger="zim_lightning.data.skips"):
        for key in ("sa_1", "sa_2", "sa_1", "sa_1"):  # resampled shards bring sa_1 back
            counter.skip("empty_mask", key, "the matte vanishes at the training resolution")
    assert counter.counts()["empty_mask"] == 4
    assert [r.getMessage().split(" ")[1] for r in caplog.records] == ["sa_1", "sa_2"]


def test_skips_are_logged_up_to_a_limit_per_reason_and_counted_past_it(caplog):
    from zim_lightning.data.skips import LOGGED_PER_REASON, SkipTally

    many = LOGGED_PER_REASON + 5
    for sink, counted_in in ((SkipCounter(), "data/skipped_empty_mask"), (SkipTally(), "manifest")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="zim_lightning.data.skips"):
            for i in range(many):  # a run over SA-1B meets thousands of vanishing mattes
                sink.skip("empty_mask", f"sa_{i}", "the matte vanishes at the training resolution")
            sink.skip("bad_rle", "sa_0", "truncated counts")  # another reason still gets its line
        counts = sink.counts() if isinstance(sink, SkipCounter) else sink.counts
        assert counts["empty_mask"] == many and counts["bad_rle"] == 1
        lines = [r.getMessage() for r in caplog.records]
        assert [line.split(" ")[1] for line in lines[:LOGGED_PER_REASON]] == [
            f"sa_{i}" for i in range(LOGGED_PER_REASON)
        ]
        assert len(lines) == LOGGED_PER_REASON + 2
        assert "later ones are counted in" in lines[-2] and counted_in in lines[-2]
        assert lines[-1].startswith("skipped sa_0 (bad_rle)")


def test_iter_tar_counts_a_corrupt_header_mid_shard(tmp_path):
    members = small_sa1b_members(5)
    data = bytearray(write_tar(tmp_path / "full.tar", members).read_bytes())
    with tarfile.open(tmp_path / "full.tar") as archive:
        offset = next(m.offset for m in archive.getmembers() if m.name.startswith("sa_3."))
    data[offset : offset + 512] = b"\xff" * 512  # the header of sa_3's first member: bad checksum
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    counter = SkipCounter()
    keys = [s["__key__"] for s in iter_tar(str(tmp_path / "bad.tar"), counter=counter)]
    assert keys == ["sa_0", "sa_1", "sa_2"] and counter.counts()["truncated_tar"] == 1


def test_iter_tar_counts_a_failing_pipe_command(tmp_path):
    shard = write_tar(tmp_path / "one.tar", small_sa1b_members(1))
    for url in (f"pipe:cat {tmp_path / 'absent.tar'}", f"pipe:cat {shard}; exit 3"):
        counter = SkipCounter()
        samples = list(iter_tar(url, counter=counter))  # a failed download: counted once, not raised
        assert counter.counts()["truncated_tar"] == 1, url
        # (where the exit status surfaces, in a member's read or at the close, decides whether the
        # sample read before it is kept)
        assert [s["__key__"] for s in samples] in ([], ["sa_0"])


def test_a_pipe_left_early_by_its_reader_is_no_damage(tmp_path):
    members = small_sa1b_members(3)
    shard = write_tar(tmp_path / "three.tar", members)
    counter = SkipCounter()
    # Like curl, the command fails (23) once its reader is gone; it cannot end before that (an endless
    # tail after the shard), so the failure is always the reader's doing, never a race with the reads.
    samples = iter_tar(f"pipe:cat {shard}; cat /dev/zero || exit 23", counter=counter)
    assert next(samples)["__key__"] == "sa_0"
    samples.close()  # the reader stops (an epoch's end): the command's status says nothing of the data
    assert counter.total() == 0


def test_iter_tar_reads_pipe_urls_and_iter_sa1b_skips_corrupt_samples(tmp_path):
    rng = np.random.default_rng(5)
    members = []
    for i in range(4):
        image, alpha = scene(rng, 32, 48)
        members += sa1b_members(f"sa_{i}", image, [alpha > 127])
    members[2] = ("sa_1.jpg", b"\xff\xd8 not a jpeg")
    members[5] = ("sa_2.json", b"{broken")
    shard = write_tar(tmp_path / "sa_000000.tar", members, compress=True)
    assert [s["__key__"] for s in iter_tar(f"pipe:cat {shard}")] == ["sa_0", "sa_1", "sa_2", "sa_3"]
    counter = SkipCounter()
    decoded = list(iter_sa1b(str(shard), counter=counter))
    assert [s["key"] for s in decoded] == ["sa_0", "sa_3"]
    assert counter.counts()["corrupt_image"] == 1 and counter.counts()["bad_json"] == 1
    assert decoded[0]["image"].shape == (32, 48, 3)


# ----------------------------------------------------------------------------- mutation round 9b: readers, skips


def compressed(runs: list[int]) -> str:
    """COCO compressed RLE of ``runs`` (pycocotools' rleToString), negative runs included."""
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_rle_counts_refuses_negative_runs_long_numbers_and_foreign_characters():
    mask = np.zeros((4, 5), np.uint8)
    mask[1:3, 2:4] = 1
    assert compressed(rle_counts(mask_utils.encode(np.asfortranarray(mask))["counts"]).tolist()) == (
        mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
    )
    with pytest.raises(ValueError, match="negative run"):  # runs 10, -2, 12 still add up to 4 x 5
        rle_counts(compressed([10, -2, 12]))
    with pytest.raises(ValueError, match="60 bits"):  # a 13-character (65-bit) number
        rle_counts("P" * 12 + "1")
    with pytest.raises(ValueError, match="outside the compressed alphabet"):  # 'p' is 48 + 64
        rle_counts("p")
    with pytest.raises(CorruptSample) as caught:
        decode_mask({"id": 1, "segmentation": {"size": [4, 5], "counts": compressed([10, -2, 12])}}, key="k")
    assert caught.value.reason == "bad_rle"


@pytest.mark.parametrize(
    "image",
    [
        {"width": True, "height": 4},
        {"width": 5, "height": 0},
        {"width": 0, "height": 4},
        {"width": 5, "height": False},
    ],
)
def test_parse_annotations_needs_positive_integer_sizes(image):
    # what a break looks like: (a bool passes as an int), (a zero side)
    with pytest.raises(CorruptSample, match="positive integer width and height") as caught:
        parse_annotations(json.dumps({"image": image, "annotations": []}).encode(), key="sa_1")
    assert caught.value.reason == "bad_json"


def test_member_suffixes_are_lower_cased_and_keys_keep_their_folder(tmp_path):
    # what a break looks like: (suffix case), (folder dropped from the key), ("__" keys are metadata, not samples)
    rng = np.random.default_rng(0)
    image, alpha = scene(rng, 24, 32)
    members = [("__meta__.json", b"{}")]
    members += [
        (n.replace(".jpg", ".JPG").replace("alpha.png", "Alpha.PNG"), d)
        for n, d in matting_members("up", image, alpha)
    ]
    members += [(f"a/{n}", d) for n, d in matting_members("x", image, alpha)]
    members += [(f"b/{n}", d) for n, d in matting_members("x", image, alpha)]
    matte = sa1b_matte_members("sa_5", image, [alpha])
    record = json.loads(matte[1][1])
    record["annotations"][0]["matte"]["member"] = "Matte_0.PNG"
    members += [matte[0], ("sa_5.json", json.dumps(record).encode()), ("sa_5.Matte_0.PNG", matte[2][1])]
    samples = list(iter_tar(str(write_tar(tmp_path / "s.tar", members))))
    assert [s["__key__"] for s in samples] == ["up", "a/x", "b/x", "sa_5"]
    assert {"jpg", "alpha.png", "json"} <= set(samples[0])
    np.testing.assert_array_equal(decode_matting(samples[0])[1], alpha)
    sa5 = samples[3]
    got = decode_matte(
        sa5, parse_annotations(sa5["json"], key="sa_5")["annotations"][0], key="sa_5", image_size=(24, 32)
    )
    np.testing.assert_array_equal(got, alpha)


def _matte_sample(region: np.ndarray, box: list[int]) -> tuple[dict, dict]:
    annotation = {"id": 1, "matte": {"member": "matte_1.png", "box": box}}
    return {"__key__": "sa_1", "matte_1.png": png(region)}, annotation


@pytest.mark.parametrize(
    ("region", "box", "reason"),
    [
        (
            np.full((4, 8), 200, np.uint8),
            [10, 0, 8, 4],
            "bad_json",
        ),  # runs past the right edge (x + w > W)
        (np.full((4, 8), 200, np.uint8), [0, 9, 8, 4], "bad_json"),  # runs past the bottom edge
        (
            np.full((6, 4), 200, np.uint8),
            [0, 0, 6, 4],
            "bad_json",
        ),  # a transposed PNG (6x4 for a 4x6 box)
        (np.zeros((4, 6), np.uint8), [0, 0, 6, 4], "empty_mask"),  # an all-zero matte
    ],
)
def test_decode_matte_refuses_boxes_off_the_image_transposed_and_empty_mattes(region, box, reason):
    sample, annotation = _matte_sample(region, box)
    with pytest.raises(CorruptSample) as caught:
        decode_matte(sample, annotation, key="sa_1", image_size=(12, 12))
    assert caught.value.reason == reason


def test_the_empty_shard_count_restarts_at_every_shard_with_samples(tmp_path):
    # max_empty_shards counts shards *in a row* without a sample, not all shards
    rng = np.random.default_rng(1)
    image, alpha = scene(rng, 24, 24)
    shard = str(write_tar(tmp_path / "g.tar", matting_members("g", image, alpha)))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(shard, "rb").read()[:300])
    urls = [shard, str(cut), shard, str(cut), shard, shard, shard]
    counter = SkipCounter()
    keys = [
        s["__key__"] for s in tar_samples(({"url": u} for u in urls), counter=counter, max_empty_shards=2)
    ]
    assert keys == ["g"] * 5 and counter.counts()["truncated_tar"] == 2


def test_a_missing_image_member_is_a_counted_skip(tmp_path):
    # an SA-1B sample without its jpg (the damage hid it) is skipped as missing_member, not a KeyError
    members = small_sa1b_members(3)
    del members[2]  # sa_1.jpg
    counter = SkipCounter()
    assert [s["key"] for s in iter_sa1b(str(write_tar(tmp_path / "s.tar", members)), counter=counter)] == [
        "sa_0",
        "sa_2",
    ]
    assert counter.counts()["missing_member"] == 1
    with pytest.raises(CorruptSample, match="missing tar member sa_1.jpg"):
        sa1b_record({"__key__": "sa_1", "json": members[2][1]})


def test_jpeg_reduction_at_the_boundaries():
    # "at least twice max_side" is reduced; up to 1/8
    assert jpeg_reduction((1000, 2048), 1024) == 2
    assert jpeg_reduction((1000, 2047), 1024) == 1
    assert jpeg_reduction((100, 8192), 1024) == 8
    assert jpeg_reduction((100, 8191), 1024) == 4
    assert jpeg_reduction((100, 100000), 1024) == 8


def test_scale_16_bit_clips_values_outside_16_bits():
    # wider integer images (mode I) must not wrap around
    np.testing.assert_array_equal(scale_16_bit(np.array([70000, -5, 65535])), [255, 0, 255])


def test_matting_and_segmentation_decoders_refuse_empty_labels_and_mismatched_sizes():
    rng = np.random.default_rng(3)
    image, alpha = scene(rng, 40, 56)
    mask = np.where(alpha > 127, 255, 0).astype(np.uint8)
    cases = [
        (decode_matting, {"jpg": jpeg(image), "alpha.png": png(np.zeros_like(alpha))}, "empty_mask"),
        (decode_matting, {"jpg": jpeg(image), "alpha.png": png(alpha[:, :50])}, "corrupt_image"),
        (decode_segmentation, {"png": png(image), "mask.png": png(mask[:30])}, "corrupt_image"),
        (decode_segmentation, {"png": png(image), "mask.png": png(np.zeros_like(mask))}, "empty_mask"),
    ]
    for decode, members, reason in cases:
        with pytest.raises(CorruptSample) as caught:
            decode({"__key__": "k", **members})
        assert caught.value.reason == reason, (decode.__name__, reason)


def test_decode_matting_decodes_large_jpegs_reduced_and_keeps_the_alpha_full_size():
    rng = np.random.default_rng(4)
    image, alpha = scene(rng, 300, 520)
    got_image, got_alpha = decode_matting(
        {"__key__": "k", "jpg": jpeg(image), "alpha.png": png(alpha)}, max_side=128
    )
    assert got_image.shape == (75, 130, 3) and got_alpha.shape == (300, 520)


@pytest.mark.parametrize("sink", [SkipCounter, SkipTally])
def test_an_unknown_reason_is_counted_as_other(sink):
    # a reason outside SKIP_REASONS must be counted, not crash the reader
    s = sink()
    s.skip("no_such_reason", "sa_1", "why")
    counts = s.counts() if isinstance(s, SkipCounter) else s.counts
    assert counts["other"] == 1 and sum(counts.values()) == 1


def test_worker_i_counts_in_row_i_plus_1_and_an_unsized_worker_is_refused(monkeypatch):
    # row 0 is the main process's, row i + 1 worker i's; a worker past max_workers is an error
    counter = SkipCounter(max_workers=2)
    counter.skip("empty_mask", "main", "x")
    for worker in (0, 1):
        monkeypatch.setattr(
            torch.utils.data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=2)
        )
        counter.skip("empty_mask", f"w{worker}", "x")
    assert counter.table[:, 3].tolist() == [1, 1, 1]
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=2, num_workers=3))
    with pytest.raises(RuntimeError, match="larger max_workers"):
        counter.skip("empty_mask", "w2", "x")


def test_reset_zeroes_every_lane():
    counter = SkipCounter(lanes=2)
    counter.skip("bad_json", "a", "x")
    counter.lane(1).skip("bad_json", "b", "x")
    assert counter.total() == 2
    counter.reset()
    assert counter.total() == 0 and sum(counter.counts().values()) == 0


def test_the_handler_reraises_what_is_not_bad_data():
    # a bug (any exception but CorruptSample) must not be skipped as corrupt data
    counter = SkipCounter()
    handler = counter.handler()
    assert handler(CorruptSample("bad", key="k", reason="bad_json")) is True
    with pytest.raises(TypeError, match="a bug"):
        handler(TypeError("a bug"))
    assert counter.total() == 1
