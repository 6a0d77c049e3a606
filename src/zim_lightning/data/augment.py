"""Converter and ZIM training augmentation: SGA, STL mixing, geometric and photometric (ZIM paper, Sec. 3.1).

- SGA (Spatial Generalization Augmentation): with probability p (0.5) the same random region is cut out
  (set to 0) of the coarse segmentation label and of the matte label, never of the image, so the
  converter learns to follow the given mask's extent instead of completing whole objects.
- STL (Selective Transformation Learning): segmentation samples whose target is the mask itself are mixed
  in, so the converter learns to leave objects that need no fine detail unchanged.
- Geometric augmentation (flip, scale/crop, small affine) is applied identically to the image and its
  labels; photometric augmentation (colour jitter) to the image only.
"""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import cv2
import numpy as np


def spatial_generalization_cutout(
    mask: np.ndarray,
    alpha: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float = 0.5,
    size_range: tuple[float, float] = (0.1, 0.5),
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int] | None]:
    """SGA: cut the same random rectangle out of the segmentation label and the matte label.

    The rectangle's sides are ``size_range`` fractions of the image sides and its centre is a random
    pixel of the mask, so the cut always touches the object (also a ring's or a concave one's, which a
    centre drawn in the bounding box could miss). Inputs are not modified.

    Args:
        mask: HxW, the coarse segmentation label (non-zero on the object; any dtype).
        alpha: HxW, the matte label (any dtype: the converter's samples carry both as uint8).
        rng: random generator.
        p: probability of cutting.
        size_range: (min, max) side of the rectangle as a fraction of the image side.

    Returns:
        (mask, alpha, region): the labels with ``region`` = (x, y, w, h) set to 0, or the inputs and None
        when no cut was drawn.
    """
    if mask.shape != alpha.shape:
        raise ValueError(f"mask {mask.shape} and alpha {alpha.shape} must have the same shape")
    if p <= 0 or rng.random() >= p:
        return mask, alpha, None
    height, width = mask.shape
    cut_w = max(1, round(rng.uniform(*size_range) * width))
    cut_h = max(1, round(rng.uniform(*size_range) * height))
    inside = np.flatnonzero(mask)
    centre = int(inside[rng.integers(inside.size)]) if inside.size else int(rng.integers(height * width))
    centre_y, centre_x = divmod(centre, width)
    x, y = max(0, centre_x - cut_w // 2), max(0, centre_y - cut_h // 2)
    mask, alpha = mask.copy(), alpha.copy()
    mask[y : y + cut_h, x : x + cut_w] = 0
    alpha[y : y + cut_h, x : x + cut_w] = 0
    return mask, alpha, (x, y, min(cut_w, width - x), min(cut_h, height - y))


def mix_stl(
    matting: Iterator[dict], segmentation: Iterator[dict], rng: np.random.Generator, *, ratio: float
) -> Iterator[dict]:
    """STL: interleave segmentation samples into the matting stream with probability ``ratio`` each.

    Stops when the stream drawn from is exhausted (training streams are infinite).

    Args:
        matting: matting samples.
        segmentation: segmentation samples (their target becomes the mask itself downstream).
        rng: random generator.
        ratio: the expected fraction of segmentation samples, in [0, 1].
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio (the STL mixing ratio) must be in [0, 1], got {ratio}")
    while True:
        source = segmentation if rng.random() < ratio else matting
        sample = next(source, None)
        if sample is None:
            return
        yield sample


#: Area of the converter's random training crop as a fraction of the image's. With 1024 crops of matting
#: images 800 to 2000 pixels across, the crop enlarges the image about 0.5x to 2.5x, whereas the
#: SA1B-Matte builder enlarges small masks up to ``crop_size / min_crop`` (8x by default; see
#: docs/architecture.md, "Converter zoom").
CROP_SCALE: tuple[float, float] = (0.25, 1.0)


def converter_geometric(
    *,
    crop_size: int,
    scale_range: tuple[float, float] = CROP_SCALE,
    hflip_p: float = 0.5,
    affine_p: float = 0.3,
    rotate: float = 15.0,
    shear: float = 8.0,
) -> A.Compose:
    """Random resized square crop of side ``crop_size``, then flip and a small affine.

    Cropping first keeps the affine warp on the small crop instead of the full-size image. Call with
    ``image`` (HxWx3 uint8) and ``alpha`` (HxW uint8 or float, bilinear) and/or ``mask`` (HxW, nearest).
    """
    return A.Compose(
        [
            A.RandomResizedCrop(size=(crop_size, crop_size), scale=scale_range, ratio=(3 / 4, 4 / 3)),
            A.HorizontalFlip(p=hflip_p),
            A.Affine(
                rotate=(-rotate, rotate),
                shear=(-shear, shear),
                scale=(0.9, 1.1),
                fill=0,
                fill_mask=0,
                p=affine_p,
            ),
        ],
        additional_targets={"alpha": "image"},
    )


def zim_geometric(
    *,
    hflip_p: float = 0.5,
    affine_p: float = 0.3,
    scale_range: tuple[float, float] = (0.9, 1.1),
    rotate: float = 10.0,
    translate: float = 0.05,
) -> A.Compose:
    """Flip and small affine in the resized (unpadded) frame; call with ``image`` and ``alpha``."""
    return A.Compose(
        [
            A.HorizontalFlip(p=hflip_p),
            A.Affine(
                scale=scale_range,
                rotate=(-rotate, rotate),
                translate_percent=(-translate, translate),
                fill=0,
                fill_mask=0,
                p=affine_p,
            ),
        ],
        additional_targets={"alpha": "image"},
    )


def photometric(
    *,
    brightness: float = 0.2,
    contrast: float = 0.2,
    p: float = 0.8,
    saturation: float = 0.2,
    hue: float = 0.05,
    colour_p: float = 0.2,
) -> A.Compose:
    """Colour jitter, for the image only.

    Brightness and contrast (a lookup table, cheap) with probability ``p``; saturation and hue (HSV
    round trip, about ten times the cost at 1024) with probability ``colour_p``.
    """
    return A.Compose(
        [
            A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=contrast, p=p),
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=saturation, hue=hue, p=colour_p),
        ]
    )


def seed_pipelines(rng: np.random.Generator, *pipelines: A.Compose | None) -> None:
    """Seed albumentations pipelines from a worker's generator, one draw each in order; None is skipped."""
    for pipeline in pipelines:
        if pipeline is not None:
            pipeline.set_random_seed(int(rng.integers(2**31)))


def centre_square(array: np.ndarray, size: int, *, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Deterministic square view: a square of the shorter side, resized to ``size``.

    Args:
        array: HxW or HxWxC.
        size: side of the output.
        centre: (x, y) the square is centred on (clamped to the image); None: the image centre.
    """
    height, width = array.shape[:2]
    side = min(height, width)
    centre_x, centre_y = centre if centre is not None else (width / 2, height / 2)
    left = int(np.clip(round(centre_x - side / 2), 0, width - side))
    top = int(np.clip(round(centre_y - side / 2), 0, height - side))
    square = array[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def object_centre(label: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the bounding box of a label's non-zero pixels (the image centre if none)."""
    rows = np.flatnonzero(label.any(axis=1))
    columns = np.flatnonzero(label.any(axis=0))
    if rows.size == 0:
        return label.shape[1] / 2, label.shape[0] / 2
    return (columns[0] + columns[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
