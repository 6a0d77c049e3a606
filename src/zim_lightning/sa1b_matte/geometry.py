"""The builder's options and its geometry: crops around masks, resampling, matte boxes and the clamp band."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

MODES = ("crop", "whole")
# Bilinear resampling spreads an edge over about a pixel, so the matte box keeps at least this margin.
MIN_MARGIN_PX = 2
# Side of the coarse grid the clamp band is measured on (see mask_band).
BAND_GRID = 256


@dataclass(frozen=True)
class CropConfig:
    """How masks are cut out for the converter and how its mattes are stored.

    Attributes:
        crop_size: side S of the converter's square input (a multiple of 32).
        mode: ``"crop"`` (a square around each mask) or ``"whole"`` (the whole image once).
        context: in crop mode, the square grows by this fraction of the box's longer side on each side.
        min_crop: in crop mode, the smallest square side in image pixels (context for tiny masks).
        margin: the matte box grows by this fraction of the mask box's longer side on each side.
        clamp: zero the matte farther than the margin from the mask.
    """

    crop_size: int = 1024
    mode: str = "crop"
    context: float = 0.5
    min_crop: int = 128
    margin: float = 0.1
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.crop_size < 32 or self.crop_size % 32:
            raise ValueError(f"crop_size must be a positive multiple of 32, got {self.crop_size}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (math.isfinite(self.margin) and math.isfinite(self.context)):
            raise ValueError(
                f"margin and context must be finite, got margin={self.margin}, context={self.context}"
            )
        if self.margin < 0 or self.context < self.margin:
            raise ValueError(
                f"expected 0 <= margin <= context (the matte box must lie inside the converter's crop), "
                f"got margin={self.margin}, context={self.context}"
            )
        if self.min_crop < 1:
            raise ValueError(f"min_crop must be >= 1 pixel, got {self.min_crop}")


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a mask's non-zero pixels; the mask is HxW uint8 and not empty."""
    x, y, w, h = cv2.boundingRect(mask)
    return int(x), int(y), int(w), int(h)


def rle_box(annotation: dict) -> tuple[int, int, int, int]:
    """(x, y, w, h) of an annotation's decoded RLE, from its runs (no pass over the pixels).

    The json's own ``bbox`` is not trusted: the matte box must hold the mask the RLE decodes to.
    """
    segmentation = annotation["segmentation"]
    counts = segmentation["counts"]
    rle = {
        "size": segmentation["size"],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    return x, y, w, h


def margin_px(box: tuple[int, int, int, int], margin: float) -> int:
    """The matte box's margin in pixels around a mask box (x, y, w, h): ``margin`` of its longer side."""
    return max(MIN_MARGIN_PX, math.ceil(margin * max(box[2], box[3])))


def matte_box(box: tuple[int, int, int, int], image_hw: tuple[int, int], margin: float) -> tuple[int, ...]:
    """The stored matte's region: ``box`` grown by ``margin`` and clipped to the image.

    Returns:
        (x, y, w, h, m): the region in (X, Y) pixels and the margin m in pixels.
    """
    x, y, w, h = box
    height, width = image_hw
    m = margin_px(box, margin)
    x0, y0 = max(x - m, 0), max(y - m, 0)
    x1, y1 = min(x + w + m, width), min(y + h + m, height)
    return x0, y0, x1 - x0, y1 - y0, m


def crop_square(
    box: tuple[int, int, int, int], image_hw: tuple[int, int], config: CropConfig
) -> tuple[int, int, int]:
    """The square of the image the converter sees for one mask.

    Returns:
        (x0, y0, side) in (X, Y) pixels; the square may extend past the image (zero padding).
    """
    height, width = image_hw
    if config.mode == "whole":
        return 0, 0, max(height, width)
    x, y, w, h = box
    longer = max(w, h)
    # at least the matte box's extent (plus a pixel for centring on a whole pixel): the matte box must
    # lie inside the square whatever the rounding of the context, the margin and the placement
    needed = longer + 2 * margin_px(box, config.margin) + 1
    side = max(math.ceil(longer * (1.0 + 2.0 * config.context)), config.min_crop, needed)
    side = min(side, max(height, width))

    def place(start: float, extent: int) -> int:
        # inside the image where it fits (more context, no padding); centred on the image where not
        if side >= extent:
            return (extent - side) // 2
        return int(min(max(round(start), 0), extent - side))

    return place(x + w / 2 - side / 2, width), place(y + h / 2 - side / 2, height), side


def resample_square(
    array: np.ndarray, x0: int, y0: int, side: int, size: int, *, gain: int = 1
) -> np.ndarray:
    """Cut the square (x0, y0, side) out of ``array`` (zero outside it) and resize it to size x size.

    Args:
        array: HxW or HxWxC uint8.
        gain: multiplies the cut-out values first (255 turns a {0, 1} mask into 0 / 255, so that area
            resampling keeps the coverage of edge pixels).

    Returns:
        size x size (x C) uint8; area averaging when shrinking, bilinear when enlarging.
    """
    height, width = array.shape[:2]
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + side, width), min(y0 + side, height)
    part = array[iy0:iy1, ix0:ix1]
    if gain != 1:
        part = part * np.uint8(gain)
    if (ix0, iy0, ix1, iy1) != (x0, y0, x0 + side, y0 + side):
        part = cv2.copyMakeBorder(
            np.ascontiguousarray(part),
            iy0 - y0,
            y0 + side - iy1,
            ix0 - x0,
            x0 + side - ix1,
            cv2.BORDER_CONSTANT,
            value=0,
        )
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(part, (size, size), interpolation=interpolation)


def converter_mask(mask: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """The converter's input mask for the square (x0, y0, side) of a {0, 1} mask: size x size uint8 0 / 255.

    The square is resampled as coverage (:func:`resample_square`) and cut at half coverage, because the
    converter trains on binary masks only (coarsened from mattes, or segmentation masks): the ramps
    that bilinear enlarging puts on every edge (8 pixels wide for a 128-pixel square at 1024) would be
    input it never saw. A mask thinner than half a pixel of the output everywhere (a pole shrunk with
    the whole image) keeps every pixel it covers at all instead of vanishing.
    """
    coverage = resample_square(mask, x0, y0, side, size, gain=255)
    binary = coverage > 127
    if not binary.any():
        binary = coverage > 0
    return np.where(binary, np.uint8(255), np.uint8(0))


def project_matte(
    alpha: np.ndarray, square: tuple[int, int, int], box: tuple[int, int, int, int]
) -> np.ndarray:
    """Map the converter's matte of a square back to image pixels, over the matte box only.

    Args:
        alpha: SxS uint8, the converter's output for the square.
        square: (x0, y0, side) the square in image pixels.
        box: (x, y, w, h) the matte box in image pixels; it lies inside the square.

    Returns:
        h x w uint8 alpha.

    Raises:
        ValueError: if the box is not inside the square.
    """
    size = alpha.shape[0]
    x0, y0, side = square
    bx, by, bw, bh = box
    if bx < x0 or by < y0 or bx + bw > x0 + side or by + bh > y0 + side:
        raise ValueError(f"matte box {box} is not inside the converter's square {square}")
    if side < size:
        # the square was enlarged for the converter: average back down, then cut the box out
        small = cv2.resize(alpha, (side, side), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(small[by - y0 : by - y0 + bh, bx - x0 : bx - x0 + bw])
    # the square was shrunk: interpolate the box's pixels only (cheap for a small box in a large image)
    s = size / side
    matrix = np.array(
        [[s, 0.0, (bx + 0.5 - x0) * s - 0.5], [0.0, s, (by + 0.5 - y0) * s - 0.5]], dtype=np.float64
    )
    return cv2.warpAffine(
        alpha,
        matrix,
        (bw, bh),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def mask_band(mask_region: np.ndarray, radius: int) -> np.ndarray:
    """1 within about ``radius`` pixels (Euclidean) of the mask, else 0; HxW uint8 in, HxW uint8 out.

    Large regions are measured on a grid of at most :data:`BAND_GRID` cells a side (a distance transform
    at full resolution costs as much as the converter's share of a mask): the band is a loose clamp
    whose edge may move by one grid cell, which stays within the margin's rounding.
    """
    height, width = mask_region.shape
    step = max(1, math.ceil(max(height, width) / BAND_GRID))
    small = mask_region
    if step > 1:
        grid = (math.ceil(width / step), math.ceil(height / step))
        # any mask pixel in a cell marks the cell (max over the cell, via area average > 0)
        small = cv2.resize(mask_region, grid, interpolation=cv2.INTER_AREA)
    outside = (small == 0).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    band = (distance <= radius / step).astype(np.uint8)
    if step > 1:
        band = cv2.resize(band, (width, height), interpolation=cv2.INTER_NEAREST)
    return band
