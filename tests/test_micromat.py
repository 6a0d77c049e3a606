"""MicroMat-3K / AM-2K / AIM-500 readers on tiny folders written here in the real layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zim_lightning.data.micromat import EvalDataError, build_eval_dataset, check_trimaps, read_trimap


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.clip(r - np.hypot(yy - cy, xx - cx), 0, 1)


def write_micromat(root: Path, *, size: tuple[int, int] = (24, 32)) -> list[str]:
    """Two images, three instances (fine, coarse, fine); returns the data_list lines."""
    h, w = size
    rng = np.random.default_rng(0)
    lines = []
    for n, (subset, k) in enumerate([("fine", 1), ("coarse", 2), ("fine", 3)]):
        stem = f"{n // 2 + 1:04d}"
        _save(root / "img" / f"{stem}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        alpha = _disc(h, w, h / 2, w / 2 + k, 4 + k)
        _save(root / "matte" / subset / f"{stem}_{k}.png", np.round(alpha * 255).astype(np.uint8))
        _save(root / "seg" / subset / f"{stem}_{k}.png", np.where(alpha > 0.5, 255, 0).astype(np.uint8))
        prompt = {"point": [[w // 2 + k, h // 2, 1], [1, 1, 0]], "bbox": [2, 3, w - 3, h - 2]}
        (root / "prompt" / subset).mkdir(parents=True, exist_ok=True)
        (root / "prompt" / subset / f"{stem}_{k}.json").write_text(json.dumps(prompt))
        lines.append(
            f"img/{stem}.png matte/{subset}/{stem}_{k}.png prompt/{subset}/{stem}_{k}.json seg/{subset}/{stem}_{k}.png"
        )
    (root / "data_list.txt").write_text("\n".join(lines) + "\n")
    return lines


def write_matting_folder(folder: Path, *, count: int = 2, size: tuple[int, int] = (20, 28)) -> None:
    """AM-2K validation / AIM-500 layout: original/*.jpg, mask/*.png, trimap/*.png."""
    h, w = size
    rng = np.random.default_rng(1)
    for i in range(count):
        alpha = _disc(h, w, h / 2, w / 2, 5 + i)
        _save(folder / "original" / f"s_{i}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _save(folder / "mask" / f"s_{i}.png", np.round(alpha * 255).astype(np.uint8))
        trimap = np.where(alpha >= 1, 255, np.where(alpha <= 0, 0, 128)).astype(np.uint8)
        _save(folder / "trimap" / f"s_{i}.png", trimap)


def test_micromat_instances_subsets_and_prompts(tmp_path: Path) -> None:
    lines = write_micromat(tmp_path)
    ds = build_eval_dataset(tmp_path, format="micromat", prompt="both")
    assert len(ds) == 3 and ds.subsets == ["fine", "coarse"]
    item = ds[1]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (24, 32, 3)
    assert item["alpha"].dtype == np.float64 and item["alpha"].shape == (24, 32)
    expected = np.asarray(Image.open(tmp_path / "matte/coarse/0001_2.png"), dtype=np.float64) / 255
    np.testing.assert_array_equal(item["alpha"], expected)
    assert item["subset"] == "coarse" and item["matte_relpath"] == lines[1].split()[1]
    np.testing.assert_array_equal(item["prompt"]["points"], [[18, 12, 1], [1, 1, 0]])
    np.testing.assert_array_equal(item["prompt"]["box"], [2, 3, 29, 22])
    assert item["trimap"] is None and item["index"] == 1

    fine_box = build_eval_dataset(tmp_path, format="micromat", prompt="box", subset="fine")
    assert [it["key"] for it in fine_box] == ["matte/fine/0001_1", "matte/fine/0002_3"]
    assert set(fine_box[0]["prompt"]) == {"box"}
    assert set(build_eval_dataset(tmp_path, format="micromat", prompt="point")[0]["prompt"]) == {"points"}
    assert ds.collate([ds[0], ds[2]])[1]["key"] == "matte/fine/0002_3"


def test_sixteen_bit_mattes_read_exactly(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    values = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 85
    Image.fromarray(values).save(tmp_path / "matte/fine/0001_1.png")
    alpha = build_eval_dataset(tmp_path, format="micromat", prompt="box")[0]["alpha"]
    np.testing.assert_array_equal(alpha, values / 65535.0)


def test_a_16_bit_matte_holding_8_bit_values_is_refused_not_read_as_almost_empty(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    matte = np.asarray(Image.open(tmp_path / "matte/fine/0001_1.png"))
    Image.fromarray(matte.astype(np.uint16)).save(tmp_path / "matte/fine/0001_1.png")
    dataset = build_eval_dataset(tmp_path, format="micromat", prompt="box")
    with pytest.raises(EvalDataError, match=r"0001_1.png' is a 16-bit image whose values only reach 255"):
        dataset[0]
    # a trimap too (it would read as 0 / 1, and then fail the trimap check with a misleading message)
    write_matting_folder(tmp_path / "aim")
    trimap = np.asarray(Image.open(tmp_path / "aim/trimap/s_0.png"))
    Image.fromarray(trimap.astype(np.uint16)).save(tmp_path / "aim/trimap/s_0.png")
    dataset = build_eval_dataset(tmp_path / "aim", format="aim500", prompt="box")
    with pytest.raises(EvalDataError, match=r"s_0.png' is a 16-bit image whose values only reach 255"):
        dataset[0]


def test_a_floating_point_matte_is_refused_not_truncated_to_almost_nothing(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    path = tmp_path / "matte/fine/0001_1.png"
    matte = np.asarray(Image.open(path)).astype(np.float32) / 255  # in [0, 1]
    Image.fromarray(matte).save(path, format="TIFF")  # Pillow reads the content, whatever the name
    dataset = build_eval_dataset(tmp_path, format="micromat", prompt="box")
    with pytest.raises(EvalDataError, match=r"0001_1.png' is a 32-bit floating-point image"):
        dataset[0]
    # a trimap in [0, 1] likewise (8-bit conversion would leave only 0 and 1: no unknown region)
    trimap = tmp_path / "trimap.tif"
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.5]], np.float32)).save(trimap)
    with pytest.raises(EvalDataError, match=r"trimap '.*trimap.tif' is a 32-bit floating-point image"):
        read_trimap(trimap)


def test_a_matte_with_an_alpha_channel_is_refused_not_read_as_opaque(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    matte = np.asarray(Image.open(tmp_path / "matte/fine/0001_1.png"))
    Image.fromarray(np.dstack([np.full_like(matte, 255), matte]), mode="LA").save(
        tmp_path / "matte/fine/0001_1.png"
    )
    dataset = build_eval_dataset(tmp_path, format="micromat", prompt="box")
    with pytest.raises(EvalDataError, match="has an alpha channel"):
        dataset[0]


def _renamed_copy(src: Path, dst: Path, names: dict[str, str]) -> None:
    for old, new in names.items():
        shutil.copytree(src / old, dst / new)


def test_folders_read_any_layout_as_the_shipped_one(tmp_path: Path) -> None:
    write_matting_folder(tmp_path / "aim")
    # P3M-500's layout, one level down; and PPM-100's, without trimaps
    names = {
        "original": "P3M-500-NP/original_image",
        "mask": "P3M-500-NP/mask",
        "trimap": "P3M-500-NP/trimap",
    }
    _renamed_copy(tmp_path / "aim", tmp_path / "p3m", names)
    layout = ["P3M-500-NP/original_image", "P3M-500-NP/mask", "P3M-500-NP/trimap"]
    shipped = build_eval_dataset(tmp_path / "aim", format="aim500", prompt="both", seed=3)
    folders = build_eval_dataset(tmp_path / "p3m", format="folders", prompt="both", seed=3, layout=layout)
    assert len(folders) == len(shipped) == 2
    for ours, theirs in zip(folders, shipped, strict=True):
        assert ours["key"] == theirs["key"] and ours["subset"] == "all"
        for name in ("image", "alpha", "trimap"):
            np.testing.assert_array_equal(ours[name], theirs[name])
        for name in ("points", "box"):
            np.testing.assert_array_equal(ours["prompt"][name], theirs["prompt"][name])
    assert folders[1]["matte_relpath"] == "P3M-500-NP/mask/s_1.png"
    # no trimap folder named: none read, even where a folder called trimap lies beside the others
    _renamed_copy(
        tmp_path / "aim", tmp_path / "ppm", {"original": "image", "mask": "matte", "trimap": "trimap"}
    )
    plain = build_eval_dataset(tmp_path / "ppm", format="folders", prompt="box", layout=["image", "matte"])
    assert plain[0]["trimap"] is None and plain[0]["matte_relpath"] == "matte/s_0.png"


@pytest.mark.parametrize(
    "format, layout, message",
    [
        ("folders", None, "format 'folders' needs its layout"),
        ("folders", ["image"], "format 'folders' needs its layout"),
        ("folders", ["image", "matte", "trimap", "more"], "format 'folders' needs its layout"),
        ("folders", ["image", "../matte"], "inside the dataset folder"),
        ("folders", ["/data/image", "matte"], "inside the dataset folder"),
        ("folders", ["original", "mask/../../up/mask"], "inside the dataset folder"),
        ("folders", ["", "mask"], "inside the dataset folder"),  # the dataset folder itself
        ("folders", [".", "mask"], "inside the dataset folder"),
        ("folders", ["original", "mask", "../trimap"], "inside the dataset folder"),  # trimaps too
        ("folders", ["original", "mask", "/data/trimap"], "inside the dataset folder"),
        ("folders", ["original", "mask", "."], "inside the dataset folder"),
        ("aim500", ["original", "mask"], "layout is for format 'folders' only"),
    ],
)
def test_folders_layout_is_checked(
    tmp_path: Path, format: str, layout: list[str] | None, message: str
) -> None:
    write_matting_folder(tmp_path)
    with pytest.raises(ValueError, match=message):
        build_eval_dataset(tmp_path, format=format, prompt="box", layout=layout)


def test_folders_name_a_missing_folder(tmp_path: Path) -> None:
    write_matting_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="folders folder .*/alpha' does not exist"):
        build_eval_dataset(tmp_path, format="folders", prompt="box", layout=["original", "alpha"])
    # a trimap folder that is named must exist (AM-2K's and AIM-500's are read when present)
    with pytest.raises(FileNotFoundError, match="folders folder .*/trimaps' does not exist"):
        build_eval_dataset(tmp_path, format="folders", prompt="box", layout=["original", "mask", "trimaps"])
    # a missing matte is named in the layout's alpha folder
    _renamed_copy(tmp_path, tmp_path / "ppm", {"original": "image", "mask": "matte"})
    (tmp_path / "ppm" / "matte" / "s_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="folders instance 's_1': no matte matte/s_1.png"):
        build_eval_dataset(tmp_path / "ppm", format="folders", prompt="box", layout=["image", "matte"])


def test_a_box_evaluation_reads_only_the_boxes(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    (tmp_path / "prompt/fine/0002_3.json").write_text('{"point": [], "bbox": [2, 3, 20, 18]}')
    assert len(build_eval_dataset(tmp_path, format="micromat", prompt="box")) == 3
    with pytest.raises(EvalDataError, match="'point' must be"):
        build_eval_dataset(tmp_path, format="micromat", prompt="point")


@pytest.mark.parametrize("layout", ["am2k", "am2k_validation", "aim500"])
def test_matting_folders_derive_deterministic_prompts(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "validation" if layout.startswith("am2k") else tmp_path
    write_matting_folder(folder)
    root = folder if layout == "am2k_validation" else tmp_path
    fmt = "aim500" if layout == "aim500" else "am2k"
    ds = build_eval_dataset(root, format=fmt, prompt="both", seed=3)
    assert len(ds) == 2 and ds.subsets == ["all"]
    item = ds[1]
    alpha = item["alpha"]
    assert item["trimap"].shape == alpha.shape and set(np.unique(item["trimap"])) <= {0, 128, 255}
    ys, xs = np.nonzero(alpha > 0)
    np.testing.assert_array_equal(item["prompt"]["box"], [xs.min(), ys.min(), xs.max(), ys.max()])
    points = item["prompt"]["points"]
    assert (points[:, 2] == 1).sum() == 3 and (points[:, 2] == 0).sum() == 2
    at = alpha[points[:, 1].astype(int), points[:, 0].astype(int)]
    assert (at[points[:, 2] == 1] >= 0.5).all() and (at[points[:, 2] == 0] == 0).all()
    # Same seed: the same points, whatever the order of reading; another seed: others.
    again = build_eval_dataset(root, format=fmt, prompt="point", seed=3)
    np.testing.assert_array_equal(again[1]["prompt"]["points"], points)
    other = build_eval_dataset(root, format=fmt, prompt="point", seed=4)[1]["prompt"]["points"]
    assert not np.array_equal(other, points)
    assert item["matte_relpath"] == "mask/s_1.png"


@pytest.mark.parametrize("value", [127, 255])
def test_a_trimap_without_a_128_unknown_region_names_the_file(tmp_path: Path, value: int) -> None:
    write_matting_folder(tmp_path)
    trimap = np.asarray(Image.open(tmp_path / "trimap/s_1.png"))
    _save(tmp_path / "trimap/s_1.png", np.where(trimap == 128, value, trimap).astype(np.uint8))
    dataset = build_eval_dataset(tmp_path, format="aim500", prompt="box")
    assert dataset[1]["trimap"] is not None  # read as it is (the paper protocol ignores trimaps)
    with pytest.raises(EvalDataError, match=r"'s_1'.*trimap s_1.png must hold 0 .*128 .*255"):
        check_trimaps(dataset.records)
    check_trimaps(dataset.records[:1])
    trimap = tmp_path / "trimap/s_1.png"
    trimap.write_bytes(trimap.read_bytes()[:-40])  # truncated: its header still reads
    with pytest.raises(EvalDataError, match=r"'s_1'.*cannot decode trimap s_1.png"):
        check_trimaps(dataset.records)


def test_missing_file_names_the_instance(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    (tmp_path / "matte/coarse/0001_2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 2: matte/coarse/0001_2.png does not exist"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")


def test_missing_matte_in_matting_folder(tmp_path: Path) -> None:
    write_matting_folder(tmp_path)
    (tmp_path / "mask/s_0.png").unlink()
    with pytest.raises(FileNotFoundError, match="'s_0'.*mask/s_0.png"):
        build_eval_dataset(tmp_path, format="aim500", prompt="box")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid json"),
        ('{"bbox": [1, 2, 3, 4]}', "'point' must be"),
        ('{"point": [[1, 2]], "bbox": [1, 2, 3, 4]}', "'point' must be"),
        ('{"point": [[1, 2, 5]], "bbox": [1, 2, 3, 4]}', "labels must be 1"),
        ('{"point": [[1, 2, 1]], "bbox": [5, 2, 3, 4]}', "'bbox' must be"),
        ("[" * 100_000, "not valid json"),  # nested past the parser's depth
    ],
)
def test_malformed_prompt_json_names_the_instance(tmp_path: Path, content: str, message: str) -> None:
    write_micromat(tmp_path)
    (tmp_path / "prompt/fine/0002_3.json").write_text(content)
    with pytest.raises(EvalDataError, match=rf"line 3 \(prompt/fine/0002_3.json\).*{message}"):
        build_eval_dataset(tmp_path, format="micromat", prompt="both")


def test_size_mismatch_names_the_instance(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    _save(tmp_path / "matte/fine/0002_3.png", np.zeros((24, 30), dtype=np.uint8))
    with pytest.raises(
        EvalDataError,
        match=r"line 3: image 0002.png is 32x24 \(WxH\) but matte matte/fine/0002_3.png is 30x24",
    ):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")


def test_a_truncated_image_names_its_instance_when_it_is_decoded(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    image = tmp_path / "img/0002.png"
    image.write_bytes(image.read_bytes()[:-40])  # the header passes the indexing checks
    dataset = build_eval_dataset(tmp_path, format="micromat", prompt="box")
    broken = [i for i, r in enumerate(dataset.records) if r.image == image]
    with pytest.raises(EvalDataError, match=r"line \d+: cannot decode image 0002.png or matte matte/"):
        dataset[broken[0]]


def test_bad_lines_and_arguments(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    with (tmp_path / "data_list.txt").open("a") as f:
        f.write("img/0001.png matte/fine/0001_1.png\n")
    with pytest.raises(EvalDataError, match="line 4: expected 4 paths"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")
    with pytest.raises(ValueError, match="format must be one of"):
        build_eval_dataset(tmp_path, format="p3m", prompt="box")
    with pytest.raises(ValueError, match="subset"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box", subset="all")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_eval_dataset(tmp_path / "nowhere", format="micromat", prompt="box")


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"point": [[40, 5, 1]], "bbox": [2, 3, 20, 20]}, r"point \(40, 5\) lies outside the 32x24"),
        (
            {"point": [[4, 5, 1]], "bbox": [200, 200, 300, 300]},
            r"bbox \[200.0, 200.0, 300.0, 300.0\] lies outside",
        ),
    ],
)
def test_prompts_outside_the_image_are_refused_before_any_prediction(
    tmp_path: Path, prompt: dict, message: str
) -> None:
    write_micromat(tmp_path)
    (tmp_path / "prompt/coarse/0001_2.json").write_text(json.dumps(prompt))
    with pytest.raises(EvalDataError, match=rf"line 2: prompt {message}"):
        build_eval_dataset(tmp_path, format="micromat", prompt="both")
    edge = {"point": [[32, 24, 1]], "bbox": [0, 0, 32, 24]}  # on the border: still the image's
    (tmp_path / "prompt/coarse/0001_2.json").write_text(json.dumps(edge))
    build_eval_dataset(tmp_path, format="micromat", prompt="both")


def test_a_subset_with_no_instance_is_a_clear_error(tmp_path: Path) -> None:
    lines = write_micromat(tmp_path)
    (tmp_path / "data_list.txt").write_text(lines[1] + "\n")  # the coarse instance only
    with pytest.raises(EvalDataError, match="no instance of subset 'fine'"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box", subset="fine")


def test_sixteen_bit_images_and_trimaps_are_scaled_not_clipped(tmp_path: Path) -> None:
    write_matting_folder(tmp_path, count=1)
    gray = np.linspace(0, 65535, 20 * 28).reshape(20, 28).astype(np.uint16)
    (tmp_path / "original/s_0.jpg").unlink()
    Image.fromarray(gray).save(tmp_path / "original/s_0.png")  # a 16-bit grayscale PNG
    trimap = np.asarray(Image.open(tmp_path / "trimap/s_0.png")).astype(np.uint16) * 257
    Image.fromarray(trimap).save(tmp_path / "trimap/s_0.png")
    dataset = build_eval_dataset(tmp_path, format="aim500", prompt="box")
    item = dataset[0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (20, 28, 3)
    assert item["image"][0, 0, 0] == 0 and item["image"][-1, -1, 0] == 255  # not all 255 (clipped)
    assert set(np.unique(item["trimap"])) == {0, 128, 255}
    check_trimaps(dataset.records)  # 128 * 257 reads as 128


def test_trimaps_are_left_out_where_the_protocol_does_not_score_them(tmp_path: Path) -> None:
    write_matting_folder(tmp_path)
    _save(tmp_path / "trimap/s_1.png", np.zeros((10, 10), np.uint8))  # the wrong size
    message = r"'s_1': trimap s_1.png is 10x10 \(WxH\) but matte mask/s_1.png is 28x20"
    with pytest.raises(EvalDataError, match=message):
        check_trimaps(build_eval_dataset(tmp_path, format="aim500", prompt="box").records)
    with pytest.raises(EvalDataError, match=message):  # read without the check, as the paper protocol
        build_eval_dataset(tmp_path, format="aim500", prompt="box")[1]
    paper = build_eval_dataset(tmp_path, format="aim500", prompt="box", trimaps=False)
    assert all(record.trimap is None for record in paper.records)
    assert paper[1]["trimap"] is None  # read without the trimap: a paper run is not stopped by it


@pytest.mark.parametrize(
    ("matte", "words"),
    [
        ("matte/fine/../../../elsewhere/0001_1.png", "without '..'"),
        ("/abs/matte/fine/0001_1.png", "without '..'"),
        ("matte/fine/0001_1.jpg", "again"),  # 0001_1.png is listed too: one prediction file for both
    ],
)
def test_matte_paths_that_would_put_predictions_elsewhere_are_refused(
    tmp_path: Path, matte: str, words: str
) -> None:
    lines = write_micromat(tmp_path)
    img, _, prompt, seg = lines[0].split()
    if matte.endswith(".jpg"):
        Image.open(tmp_path / "matte/fine/0001_1.png").save(tmp_path / matte)
    (tmp_path / "data_list.txt").write_text("\n".join([*lines, f"{img} {matte} {prompt} {seg}"]) + "\n")
    with pytest.raises(EvalDataError, match=rf"line 4: .*{words}"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")


def test_a_data_list_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    lines = write_micromat(tmp_path)
    (tmp_path / "data_list.txt").write_bytes("\n".join(lines).encode() + "\n\xe9t\xe9.png".encode("latin-1"))
    with pytest.raises(EvalDataError, match="data_list.txt' is not UTF-8 text"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")


def test_a_data_list_line_with_more_than_four_paths_is_refused(tmp_path: Path) -> None:
    lines = write_micromat(tmp_path)
    (tmp_path / "data_list.txt").write_text("\n".join([lines[0] + " extra.png", *lines[1:]]) + "\n")
    with pytest.raises(EvalDataError, match="line 1: expected 4 paths"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")


def test_a_matte_outside_the_fine_and_coarse_folders_is_refused(tmp_path: Path) -> None:
    lines = write_micromat(tmp_path)
    img, matte, prompt, seg = lines[0].split()
    (tmp_path / "matte/medium").mkdir()
    shutil.copy(tmp_path / matte, tmp_path / "matte/medium/0001_1.png")
    (tmp_path / "data_list.txt").write_text(f"{img} matte/medium/0001_1.png {prompt} {seg}\n")
    with pytest.raises(EvalDataError, match="is not matte/fine/... or matte/coarse/"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")


def test_blank_lines_in_the_data_list_are_ignored(tmp_path: Path) -> None:
    lines = write_micromat(tmp_path)
    (tmp_path / "data_list.txt").write_text("\n" + "\n\n".join(lines) + "\n\n  \n")
    assert len(build_eval_dataset(tmp_path, format="micromat", prompt="box")) == 3


def test_a_box_left_of_or_above_the_image_is_refused(tmp_path: Path) -> None:
    write_micromat(tmp_path)
    (tmp_path / "prompt/coarse/0001_2.json").write_text(
        json.dumps({"point": [[4, 5, 1]], "bbox": [-9, 2, -3, 8]})
    )
    with pytest.raises(EvalDataError, match="line 2: prompt bbox .* lies outside"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")
    (tmp_path / "prompt/coarse/0001_2.json").write_text(
        json.dumps({"point": [[4, 5, 1]], "bbox": [2, -9, 8, -3]})
    )
    with pytest.raises(EvalDataError, match="line 2: prompt bbox .* lies outside"):
        build_eval_dataset(tmp_path, format="micromat", prompt="box")


def test_derived_points_are_seeded_per_instance(tmp_path: Path) -> None:
    # seeded by (seed, crc32(stem)): two instances with the same matte get their own points
    write_matting_folder(tmp_path, count=1, size=(40, 48))
    for sub, suffix in (("original", ".jpg"), ("mask", ".png"), ("trimap", ".png")):
        shutil.copy(tmp_path / sub / f"s_0{suffix}", tmp_path / sub / f"t_9{suffix}")
    ds = build_eval_dataset(tmp_path, format="aim500", prompt="point")
    assert not np.array_equal(ds[0]["prompt"]["points"], ds[1]["prompt"]["points"])


def _one_instance(folder: Path, alpha: np.ndarray, stem: str) -> None:
    for sub in ("original", "mask"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*alpha.shape, 3), np.uint8)).save(folder / "original" / f"{stem}.png")
    Image.fromarray(np.round(alpha * 255).astype(np.uint8)).save(folder / "mask" / f"{stem}.png")


def test_derived_negatives_come_from_anywhere_in_the_background(tmp_path: Path) -> None:
    # near_negative_p=0: a small object's box holds a few background pixels, the image thousands
    alpha = np.zeros((64, 64))
    yy, xx = np.mgrid[:64, :64]
    alpha[np.hypot(yy - 32, xx - 32) <= 4] = 1.0
    for i in range(12):
        _one_instance(tmp_path, alpha, f"s{i:02d}")
    ds = build_eval_dataset(tmp_path, format="aim500", prompt="point")
    for item in ds:
        negatives = item["prompt"]["points"][item["prompt"]["points"][:, 2] == 0]
        inside = (
            (negatives[:, 0] >= 28)
            & (negatives[:, 0] <= 36)
            & (negatives[:, 1] >= 28)
            & (negatives[:, 1] <= 36)
        )
        assert not inside.all(), item["key"]


def test_derived_positives_are_drawn_at_alpha_0_5_and_above(tmp_path: Path) -> None:
    # DERIVED_POSITIVE_ALPHA = 0.5, not only the opaque core
    alpha = np.zeros((40, 40))
    alpha[5:35, 5:35] = 0.6
    alpha[19:21, 19:21] = 1.0
    _one_instance(tmp_path, alpha, "s")
    points = build_eval_dataset(tmp_path, format="aim500", prompt="point")[0]["prompt"]["points"]
    at = alpha[points[:, 1].astype(int), points[:, 0].astype(int)][points[:, 2] == 1]
    assert (at >= 0.5).all() and (at < 1.0).any()
