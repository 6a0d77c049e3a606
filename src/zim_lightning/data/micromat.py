"""Evaluation sets of the ZIM paper (Sec. 4.1 and 5): MicroMat-3K, AM-2K and AIM-500 folder readers, and
one for any matting set of image and alpha folders.

Layouts read here, as the datasets ship:

- **MicroMat-3K** (``format="micromat"``): ``ROOT/data_list.txt``, one instance a line,
  ``img/0002.png matte/fine/0002_21.png prompt/fine/0002_21.json seg/fine/0002_21.png`` (paths relative to
  ``ROOT``); the subset (``fine`` / ``coarse``) is the folder after ``matte/``. The prompt json is
  ``{"point": [[x, y, label], ...], "bbox": [x1, y1, x2, y2]}``, (X, Y) pixels of the original image,
  label 1 positive and 0 negative. The ``seg`` column is not used by evaluation.
- **AM-2K** (``format="am2k"``): ``ROOT/validation/original/<stem>.jpg`` and ``ROOT/validation/mask/<stem>.png``
  (``ROOT`` may also be the ``validation`` folder itself); ``trimap/<stem>.png`` is read when present.
- **AIM-500** (``format="aim500"``): ``ROOT/original/<stem>.jpg``, ``ROOT/mask/<stem>.png`` and
  ``ROOT/trimap/<stem>.png`` (optional).
- **Any other matting set** (``format="folders"``, with ``layout=[IMAGES, ALPHAS]`` or
  ``[IMAGES, ALPHAS, TRIMAPS]``, folders under ``ROOT``): ``ROOT/IMAGES/<stem>.jpg`` (or png) and
  ``ROOT/ALPHAS/<stem>.png``, and ``ROOT/TRIMAPS/<stem>.png`` when named, as P3M-500
  (``original_image mask trimap``) or PPM-100 (``image matte``) ship.

These sets have no prompts, so they are derived from the ground truth, deterministically:

- box: the min-max box of ``alpha > 0`` (inclusive pixel coordinates);
- points: ``positive_points`` positives drawn where ``alpha >= 0.5`` (half the matte's peak if it never
  reaches 0.5) and ``negative_points`` negatives drawn where ``alpha == 0``, anywhere in the image, by
  :func:`zim_lightning.data.prompts.sample_points` with a generator seeded by ``(seed, crc32(stem))``, so
  an instance gets the same points in every run, on every rank, whatever the dataset order.

Their subset is ``"all"``. Alpha PNGs may be 8-bit (divided by 255) or 16-bit (divided by 65535).

Files and prompts are checked when the dataset is built (before any model runs): a missing file, a
malformed data list line or prompt json, or an image whose size differs from its matte's raises an
error naming the instance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from zim_lightning.data.decode import FLOAT_LABEL_PROBLEM, GRAY_16_BIT_MODES, check_16_bit_label, scale_16_bit
from zim_lightning.data.prompts import sample_points, support_box
from zim_lightning.data.samples import key_rng

FORMATS: tuple[str, ...] = ("micromat", "am2k", "aim500", "folders")
PROMPTS: tuple[str, ...] = ("point", "box", "both")
MICROMAT_SUBSETS: tuple[str, ...] = ("fine", "coarse")
#: The single subset of the datasets without fine / coarse split.
ALL_SUBSET = "all"
#: Derived prompts (AM-2K, AIM-500, folders): positives at or above this alpha, negatives at alpha <= 0.
DERIVED_POSITIVE_ALPHA = 0.5
DERIVED_SUPPORT_ALPHA = 0.0

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ALPHA_SUFFIXES = (".png",)


#: Trimap values: background, unknown (what the dim protocol scores), foreground.
TRIMAP_VALUES: tuple[int, ...] = (0, 128, 255)


class EvalDataError(ValueError):
    """An evaluation instance is missing a file, or has a malformed prompt or mismatched sizes."""


@dataclass(frozen=True)
class EvalRecord:
    """Where one instance's files are.

    Attributes:
        key: unique instance name (the matte path without its suffix).
        subset: "fine" / "coarse" (MicroMat-3K) or "all".
        image: image file.
        matte: ground-truth alpha file.
        matte_relpath: the matte's path relative to the dataset root, as data_list.txt writes it; saved
            predictions reuse it.
        prompt: the parsed prompt (``points`` Nx3 float32 (X, Y, label), ``box`` float32 (x1, y1, x2, y2));
            None for datasets whose prompts are derived from the matte when the instance is read.
        trimap: trimap file, or None.
        where: how to name the instance in errors (e.g. "data_list.txt line 3").
    """

    key: str
    subset: str
    image: Path
    matte: Path
    matte_relpath: str
    prompt: dict[str, np.ndarray] | None
    trimap: Path | None
    where: str


def collate_instances(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instances differ in size, so a batch stays a list of instance dicts."""
    return list(batch)


class EvalDataset(Dataset):
    """Map-style dataset of evaluation instances at their original size.

    Each item is a dict:

    - ``image``: uint8 HxWx3 RGB numpy array;
    - ``alpha``: float64 HxW numpy array in [0, 1];
    - ``trimap``: uint8 HxW numpy array (0 / 128 / 255) or None;
    - ``prompt``: dict with ``points`` (float32 Nx3, (X, Y, label), label 1 / 0) when the prompt mode is
      "point" or "both", and ``box`` (float32 (x1, y1, x2, y2)) when it is "box" or "both";
    - ``subset``, ``key``, ``matte_relpath``: strings; ``index``: the position in this dataset.

    Args:
        records: the instances.
        prompt: "point", "box" or "both".
        seed: seed of the derived point prompts.
        positive_points: positives of a derived point prompt.
        negative_points: negatives of a derived point prompt.
    """

    collate = staticmethod(collate_instances)

    def __init__(
        self,
        records: Sequence[EvalRecord],
        *,
        prompt: str,
        seed: int = 0,
        positive_points: int = 3,
        negative_points: int = 2,
    ) -> None:
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
        self.records = list(records)
        self.prompt = prompt
        self.seed = seed
        self.positive_points = positive_points
        self.negative_points = negative_points

    @property
    def subsets(self) -> list[str]:
        """The subsets present, in the canonical order (fine, coarse, all)."""
        present = {r.subset for r in self.records}
        return [s for s in (*MICROMAT_SUBSETS, ALL_SUBSET) if s in present]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            image = read_image(record.image)
            alpha = read_alpha(record.matte)
        except OSError as err:  # a truncated or corrupt file: the headers passed at indexing
            raise EvalDataError(
                f"{record.where}: cannot decode image {record.image.name} or matte {record.matte_relpath}: {err}"
            ) from err
        if image.shape[:2] != alpha.shape:
            raise _size_mismatch(record, f"image {record.image.name}", image.shape[:2], alpha.shape)
        trimap = None
        if record.trimap is not None:
            trimap = _trimap_of(record)
            if trimap.shape != alpha.shape:
                raise _size_mismatch(record, f"trimap {record.trimap.name}", trimap.shape, alpha.shape)
        full = record.prompt if record.prompt is not None else self._derived_prompt(record, alpha)
        wanted = {"point": ("points",), "box": ("box",), "both": ("points", "box")}[self.prompt]
        return {
            "image": image,
            "alpha": alpha,
            "trimap": trimap,
            "prompt": {name: full[name] for name in wanted},
            "subset": record.subset,
            "key": record.key,
            "matte_relpath": record.matte_relpath,
            "index": index,
        }

    def _derived_prompt(self, record: EvalRecord, alpha: np.ndarray) -> dict[str, np.ndarray]:
        if not (alpha > DERIVED_SUPPORT_ALPHA).any():
            raise EvalDataError(
                f"{record.where}: matte {record.matte_relpath} is empty; no prompt can be derived"
            )
        rng = key_rng(self.seed, record.key)
        coords, labels = sample_points(
            alpha,
            rng,
            num_positive=self.positive_points,
            num_negative=self.negative_points,
            positive_threshold=DERIVED_POSITIVE_ALPHA,
            support_threshold=DERIVED_SUPPORT_ALPHA,
            near_negative_p=0.0,
            near_margin=0.0,
        )
        return {
            "points": np.concatenate([coords, labels[:, None]], axis=1).astype(np.float32),
            "box": support_box(alpha, support_threshold=DERIVED_SUPPORT_ALPHA),
        }


def read_image(path: Path) -> np.ndarray:
    """Read an image as uint8 HxWx3 RGB, 16-bit grayscale scaled to 8 bits (``convert("RGB")`` clips it
    at 255: a white image). EXIF orientation is not applied: the mattes match the stored pixels."""
    with Image.open(path) as img:
        if img.mode in GRAY_16_BIT_MODES:
            gray = scale_16_bit(np.asarray(img))
            return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
        return np.array(img.convert("RGB"))


def _refuse_float(img: Image.Image, path: Path, what: str) -> None:
    if img.mode == "F":
        raise EvalDataError(f"{what} {str(path)!r} is {FLOAT_LABEL_PROBLEM}")


def _16_bit_label(img: Image.Image, path: Path, what: str) -> np.ndarray:
    values = np.asarray(img)
    if (problem := check_16_bit_label(values)) is not None:
        raise EvalDataError(f"{what} {str(path)!r} is {problem}")
    return values


def read_trimap(path: Path) -> np.ndarray:
    """Read a trimap as uint8 HxW (0 / 128 / 255), a 16-bit one scaled to 8 bits."""
    with Image.open(path) as img:
        _refuse_float(img, path, "trimap")
        if img.mode in GRAY_16_BIT_MODES:
            return scale_16_bit(_16_bit_label(img, path, "trimap"))
        return np.array(img.convert("L"))


def read_alpha(path: Path, *, truth: bool = True) -> np.ndarray:
    """Read an 8-bit or 16-bit grayscale PNG as float64 HxW alpha in [0, 1].

    float64 keeps ``k / 255`` and ``k / 65535`` as exactly as the metrics compute in, so numbers
    recomputed from the files by any float64 implementation agree to the last digits. An RGB matte
    (three equal channels) reads as its luminance.

    Args:
        path: the PNG.
        truth: a ground-truth matte, refused when 16-bit with only 8-bit values; False for a saved
            prediction, whose alpha may be that faint everywhere.

    Raises:
        EvalDataError: a matte with an alpha channel (LA, RGBA): which channel is the matte is ambiguous,
            and reading the luminance would score against an all-opaque truth; a 16-bit matte holding
            8-bit values (``decode.check_16_bit_label``), which would score against an almost empty truth;
            a floating-point matte (mode F), whose range is unknown.
    """
    with Image.open(path) as img:
        if "A" in img.getbands():
            raise EvalDataError(
                f"matte {str(path)!r} has an alpha channel (mode {img.mode}); expected a single-channel "
                "grayscale PNG"
            )
        _refuse_float(img, path, "matte")
        if img.mode in GRAY_16_BIT_MODES:
            values = _16_bit_label(img, path, "matte") if truth else np.asarray(img)
            return (values.astype(np.float64) / 65535.0).clip(0, 1)
        return np.asarray(img.convert("L")).astype(np.float64) / 255.0


def build_eval_dataset(
    root: str | Path,
    *,
    format: str,
    prompt: str,
    subset: str | None = None,
    seed: int = 0,
    positive_points: int = 3,
    negative_points: int = 2,
    trimaps: bool = True,
    layout: Sequence[str] | None = None,
) -> EvalDataset:
    """Read an evaluation set's index and check its files.

    Args:
        root: the dataset folder (MicroMat-3K: the folder holding data_list.txt).
        format: "micromat", "am2k", "aim500" or "folders".
        prompt: "point", "box" or "both" (both prompts per instance; consumers evaluate each).
        subset: MicroMat-3K "fine" or "coarse", or None for both; "all" or None for the others.
        seed: seed of the derived point prompts (AM-2K, AIM-500, folders).
        positive_points: positives of a derived point prompt.
        negative_points: negatives of a derived point prompt.
        trimaps: read the trimaps (AM-2K, AIM-500, folders), which only the dim protocol scores; False
            leaves them out, so that a trimap the run does not use cannot stop it.
        layout: ``format="folders"`` only: the folders of the images, the alphas and optionally the
            trimaps, relative to ``root``.

    Returns:
        The dataset, instances in data-list (MicroMat-3K) or sorted-stem order.

    Raises:
        ValueError: an unknown format, prompt or subset, or a layout missing for "folders", given for
            another format, or naming a folder outside ``root``.
        FileNotFoundError: the root, its index, a layout folder or an instance's file is missing.
        EvalDataError: a malformed data list line or prompt json, or an image and matte of different
            sizes (the message names the instance).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    folders = _layout_folders(format, layout)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation dataset folder {str(root)!r} does not exist")
    if format == "micromat":
        if subset not in (None, *MICROMAT_SUBSETS):
            raise ValueError(f"MicroMat-3K subset must be one of {MICROMAT_SUBSETS} or None, got {subset!r}")
        records = _micromat_records(root, prompt)
        if subset is not None:
            records = [r for r in records if r.subset == subset]
            if not records:
                raise EvalDataError(
                    f"{str(root)!r}: its data_list.txt lists no instance of subset {subset!r}"
                )
    else:
        if subset not in (None, ALL_SUBSET):
            raise ValueError(f"{format} has the single subset {ALL_SUBSET!r}; got subset={subset!r}")
        folder = root / "validation" if format == "am2k" and (root / "validation").is_dir() else root
        records = _folder_records(folder, format, folders)
        if not trimaps:
            records = [replace(r, trimap=None) for r in records]
    for record in records:
        _check_instance(record)
    return EvalDataset(
        records, prompt=prompt, seed=seed, positive_points=positive_points, negative_points=negative_points
    )


def _micromat_records(root: Path, prompt: str) -> list[EvalRecord]:
    data_list = root / "data_list.txt"
    if not data_list.is_file():
        raise FileNotFoundError(f"MicroMat-3K index {str(data_list)!r} does not exist")
    try:
        lines = data_list.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise EvalDataError(f"{str(data_list)!r} is not UTF-8 text: {error}") from error
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{data_list.name} line {number}"
        fields = line.split()
        if len(fields) != 4:
            raise EvalDataError(
                f"{where}: expected 4 paths 'img/.. matte/SUBSET/.. prompt/SUBSET/...json seg/SUBSET/..', "
                f"got {len(fields)} fields: {line!r}"
            )
        image_rel, matte_rel, prompt_rel, _seg = fields
        for rel in (image_rel, matte_rel, prompt_rel):
            # saved predictions follow the matte's path: it must stay inside the folders it names
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise EvalDataError(f"{where}: path {rel!r} must be relative to the dataset, without '..'")
        parts = Path(matte_rel).parts
        if len(parts) < 3 or parts[0] != "matte" or parts[1] not in MICROMAT_SUBSETS:
            raise EvalDataError(
                f"{where}: matte path {matte_rel!r} is not matte/fine/... or matte/coarse/..."
            )
        for rel in (image_rel, matte_rel, prompt_rel):
            if not (root / rel).is_file():
                raise FileNotFoundError(f"{where}: {rel} does not exist under {str(root)!r}")
        records.append(
            EvalRecord(
                key=Path(matte_rel).with_suffix("").as_posix(),
                subset=parts[1],
                image=root / image_rel,
                matte=root / matte_rel,
                matte_relpath=matte_rel,
                prompt=_read_prompt(root / prompt_rel, where=f"{where} ({prompt_rel})", prompt=prompt),
                trimap=None,
                where=where,
            )
        )
    if not records:
        raise EvalDataError(f"{str(data_list)!r} lists no instance")
    seen: dict[str, str] = {}
    for record in records:  # each instance's prediction is saved under its matte path, as .png
        target = Path(record.matte_relpath).with_suffix(".png").as_posix()
        if target in seen:
            raise EvalDataError(
                f"{record.where}: matte {record.matte_relpath} is the instance of {seen[target]} again "
                "(the same path, or one differing in suffix only)"
            )
        seen[target] = record.where
    return records


def _read_prompt(path: Path, *, where: str, prompt: str) -> dict[str, np.ndarray]:
    """Parse ``{"point": [[x, y, label], ...], "bbox": [x1, y1, x2, y2]}``; check what ``prompt`` needs."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise EvalDataError(f"{where}: prompt is not valid json: {err}") from err
    if not isinstance(data, dict):
        raise EvalDataError(
            f"{where}: prompt must be a json object with 'point' and 'bbox', got {type(data).__name__}"
        )
    parsed: dict[str, np.ndarray] = {}
    if prompt in ("point", "both"):  # a box evaluation does not need the file's points, nor checks them
        try:
            points = np.asarray(data["point"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise EvalDataError(
                f"{where}: 'point' must be a list of [x, y, label], got {data.get('point')!r}"
            ) from err
        if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0 or not np.isfinite(points).all():
            raise EvalDataError(
                f"{where}: 'point' must be a non-empty list of [x, y, label], got {data['point']!r}"
            )
        if not np.isin(points[:, 2], (0, 1)).all():
            raise EvalDataError(
                f"{where}: point labels must be 1 (positive) or 0 (negative), got {points[:, 2]}"
            )
        parsed["points"] = points
    if prompt in ("box", "both"):
        try:
            box = np.asarray(data["bbox"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise EvalDataError(
                f"{where}: 'bbox' must be [x1, y1, x2, y2], got {data.get('bbox')!r}"
            ) from err
        if box.shape != (4,) or not np.isfinite(box).all() or box[2] < box[0] or box[3] < box[1]:
            raise EvalDataError(
                f"{where}: 'bbox' must be [x1, y1, x2, y2] with x2 >= x1, y2 >= y1, got {data['bbox']!r}"
            )
        parsed["box"] = box
    return parsed


#: The folders of AM-2K and AIM-500: images, alphas, trimaps (read when the folder exists).
_SHIPPED_LAYOUT = ("original", "mask", "trimap")


def _layout_folders(format: str, layout: Sequence[str] | None) -> tuple[str, str, str | None]:
    """The images, alphas and trimaps folders of a folder-per-kind format (trimaps None: none named)."""
    if format != "folders":
        if layout is not None:
            raise ValueError(f"layout is for format 'folders' only; {format} has its own, got {list(layout)}")
        return _SHIPPED_LAYOUT
    if layout is None or not 2 <= len(layout) <= 3:
        raise ValueError(
            "format 'folders' needs its layout: the images' and the alphas' folders, and optionally the "
            f"trimaps', relative to the dataset folder (e.g. original_image mask trimap), got {layout}"
        )
    for name in layout:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ValueError(
                f"layout folders lie inside the dataset folder (relative, no '..'), got {name!r}"
            )
    images, alphas, *trimaps = (str(name) for name in layout)
    return images, alphas, (trimaps[0] if trimaps else None)


def _folder_records(folder: Path, format: str, layout: tuple[str, str, str | None]) -> list[EvalRecord]:
    images_name, alphas_name, trimaps_name = layout
    originals, masks = folder / images_name, folder / alphas_name
    trimaps = folder / trimaps_name if trimaps_name is not None else None
    named = [originals, masks] + ([trimaps] if format == "folders" and trimaps is not None else [])
    for needed in named:
        if not needed.is_dir():
            raise FileNotFoundError(f"{format} folder {str(needed)!r} does not exist")
    images = {p.stem: p for p in sorted(originals.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES}
    if not images:
        raise EvalDataError(f"{format}: no image ({', '.join(_IMAGE_SUFFIXES)}) in {str(originals)!r}")
    records = []
    for stem in sorted(images):
        matte = _find(masks, stem, _ALPHA_SUFFIXES)
        where = f"{format} instance {stem!r}"
        if matte is None:
            raise FileNotFoundError(f"{where}: no matte {alphas_name}/{stem}.png in {str(folder)!r}")
        records.append(
            EvalRecord(
                key=stem,
                subset=ALL_SUBSET,
                image=images[stem],
                matte=matte,
                matte_relpath=f"{Path(alphas_name).as_posix()}/{matte.name}",
                prompt=None,
                trimap=_find(trimaps, stem, _ALPHA_SUFFIXES)
                if trimaps is not None and trimaps.is_dir()
                else None,
                where=where,
            )
        )
    return records


def _trimap_of(record: EvalRecord) -> np.ndarray:
    """:func:`read_trimap` of an instance's trimap; a file that does not decode is named with its line."""
    try:
        return read_trimap(record.trimap)
    except OSError as err:  # truncated or corrupt (the headers passed at indexing)
        raise EvalDataError(f"{record.where}: cannot decode trimap {record.trimap.name}: {err}") from err


def check_trimaps(records: Sequence[EvalRecord]) -> None:
    """Check that every trimap has its matte's size and holds only 0, 128 and 255, with some 128 (the dim
    protocol scores the unknown region only: a trimap without one, or an interpolated one, would score 0
    or mix regions).

    Raises:
        EvalDataError: naming the first trimap that does not.
    """
    for record in records:
        if record.trimap is None:
            continue
        trimap = _trimap_of(record)
        with Image.open(record.matte) as matte:
            matte_shape = (matte.height, matte.width)
        if trimap.shape != matte_shape:
            raise _size_mismatch(record, f"trimap {record.trimap.name}", trimap.shape, matte_shape)
        values = np.unique(trimap)
        if not np.isin(values, TRIMAP_VALUES).all() or TRIMAP_VALUES[1] not in values:
            raise EvalDataError(
                f"{record.where}: trimap {record.trimap.name} must hold 0 (background), 128 (unknown) "
                f"and 255 (foreground), with at least one 128, got values {values.tolist()[:8]}"
            )


def _find(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _size_mismatch(
    record: EvalRecord, what: str, shape: tuple[int, ...], matte_shape: tuple[int, ...]
) -> EvalDataError:
    """The error for a file (``what``) whose (H, W) ``shape`` is not its matte's."""
    return EvalDataError(
        f"{record.where}: {what} is {shape[1]}x{shape[0]} (WxH) but matte {record.matte_relpath} is "
        f"{matte_shape[1]}x{matte_shape[0]}"
    )


def _check_instance(record: EvalRecord) -> None:
    """Check an instance from its files' headers (no decoding): the image's size is the matte's, and its
    prompt lies on the image."""
    try:
        with Image.open(record.image) as img:
            image_size = img.size
        with Image.open(record.matte) as matte:
            matte_size = matte.size
    except OSError as err:
        raise EvalDataError(
            f"{record.where}: cannot read {record.image.name} or {record.matte_relpath}: {err}"
        ) from err
    if image_size != matte_size:
        raise _size_mismatch(record, f"image {record.image.name}", image_size[::-1], matte_size[::-1])
    width, height = image_size
    prompt = record.prompt or {}
    points = prompt.get("points")
    if points is not None:
        outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
        if outside.any():
            x, y = points[outside][0, :2]
            raise EvalDataError(
                f"{record.where}: prompt point ({x:g}, {y:g}) lies outside the {width}x{height} (WxH) image"
            )
    box = prompt.get("box")
    if box is not None and (box[0] > width or box[1] > height or box[2] < 0 or box[3] < 0):
        raise EvalDataError(
            f"{record.where}: prompt bbox {box.tolist()} lies outside the {width}x{height} (WxH) image"
        )
