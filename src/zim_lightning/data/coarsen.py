"""Matte -> coarse segmentation label ops for training the label converter (ZIM paper, Sec. 3.1).

The converter learns to turn a coarse segmentation mask into a matte. Public matting datasets have
mattes only, so its coarse inputs are derived from the matte by thresholding, downscaling and upscaling,
Gaussian blurring, dilation, erosion and convex hull. Each op is a named function with explicit
parameters; :func:`random_coarsen` picks one and its parameters at random.

Every op takes an HxW float alpha in [0, 1] and returns an HxW float32 mask in {0, 1}.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: Names accepted by :func:`random_coarsen`'s ``ops``.
COARSEN_OPS: tuple[str, ...] = (
    "threshold",
    "downscale_upscale",
    "gaussian_blur",
    "dilate",
    "erode",
    "convex_hull",
)


def threshold(alpha: np.ndarray, *, level: float = 0.5) -> np.ndarray:
    """Binarise: 1 where ``alpha > level``.

    Args:
        alpha: HxW float in [0, 1].
        level: threshold in [0, 1).
    """
    return (np.asarray(alpha) > level).astype(np.float32)


def downscale_upscale(alpha: np.ndarray, *, factor: float, level: float = 0.5) -> np.ndarray:
    """Lose detail to resolution: shrink by ``factor`` (area), enlarge back (bilinear), threshold.

    Args:
        alpha: HxW float in [0, 1].
        factor: shrink factor > 1.
        level: threshold of the result.
    """
    if factor <= 1:
        raise ValueError(f"downscale_upscale factor must be > 1, got {factor}")
    height, width = alpha.shape
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    reduced = cv2.resize(alpha.astype(np.float32), small, interpolation=cv2.INTER_AREA)
    restored = cv2.resize(reduced, (width, height), interpolation=cv2.INTER_LINEAR)
    return threshold(restored, level=level)


def gaussian_blur(alpha: np.ndarray, *, sigma: float, level: float = 0.5) -> np.ndarray:
    """Smooth the boundary: Gaussian blur with standard deviation ``sigma`` pixels, then threshold.

    Args:
        alpha: HxW float in [0, 1].
        sigma: blur standard deviation in pixels, > 0.
        level: threshold of the result.
    """
    if sigma <= 0:
        raise ValueError(f"gaussian_blur sigma must be > 0, got {sigma}")
    blurred = cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma)
    return threshold(blurred, level=level)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(alpha: np.ndarray, *, radius: int, level: float = 0.5) -> np.ndarray:
    """Grow the thresholded mask by a disk of ``radius`` pixels.

    Args:
        alpha: HxW float in [0, 1].
        radius: disk radius in pixels, >= 1.
        level: threshold applied before dilating.
    """
    if radius < 1:
        raise ValueError(f"dilate radius must be >= 1, got {radius}")
    return cv2.dilate(threshold(alpha, level=level), _disk(radius))


def erode(alpha: np.ndarray, *, radius: int, level: float = 0.5) -> np.ndarray:
    """Shrink the thresholded mask by a disk of ``radius`` pixels.

    Args:
        alpha: HxW float in [0, 1].
        radius: disk radius in pixels, >= 1.
        level: threshold applied before eroding.
    """
    if radius < 1:
        raise ValueError(f"erode radius must be >= 1, got {radius}")
    return cv2.erode(threshold(alpha, level=level), _disk(radius))


def convex_hull(alpha: np.ndarray, *, level: float = 0.5) -> np.ndarray:
    """Fill the convex hull of the thresholded mask (holes and concavities disappear, as in a rough box).

    Args:
        alpha: HxW float in [0, 1].
        level: threshold applied first.
    """
    binary = threshold(alpha, level=level)
    points = cv2.findNonZero(binary.astype(np.uint8))
    hull_mask = np.zeros_like(binary)
    if points is None:
        return hull_mask
    cv2.fillConvexPoly(hull_mask, cv2.convexHull(points), 1.0)
    # fillConvexPoly rasterises the hull's interior; keep every input pixel even where it rounds away.
    return np.maximum(hull_mask, binary)


def random_coarsen(
    alpha: np.ndarray,
    rng: np.random.Generator,
    *,
    ops: Sequence[str] = COARSEN_OPS,
    level_range: tuple[float, float] = (0.1, 0.9),
    factor_range: tuple[float, float] = (4.0, 16.0),
    sigma_range: tuple[float, float] = (0.005, 0.03),
    radius_range: tuple[float, float] = (0.005, 0.03),
) -> np.ndarray:
    """Derive a coarse mask from a matte with one op chosen uniformly from ``ops``, parameters at random.

    Blur and morphology sizes are fractions of the shorter side, so the coarseness does not depend on
    the resolution. If an op removes the whole object (erosion of thin hair), the plain threshold at
    the drawn level is returned instead, so a non-empty matte always gives a non-empty mask.

    Args:
        alpha: HxW float in [0, 1].
        rng: random generator.
        ops: names from :data:`COARSEN_OPS`.
        level_range: range of the threshold level.
        factor_range: range of the downscale factor.
        sigma_range: range of the blur sigma, as a fraction of the shorter side.
        radius_range: range of the dilation / erosion radius, as a fraction of the shorter side.

    Returns:
        HxW float32 in {0, 1}.
    """
    unknown = sorted(set(ops) - set(COARSEN_OPS))
    if unknown or not ops:
        raise ValueError(f"coarsening ops must be a non-empty subset of {COARSEN_OPS}, got {list(ops)}")
    short_side = min(alpha.shape)
    op = ops[int(rng.integers(len(ops)))]
    level = float(rng.uniform(*level_range))
    if op == "threshold":
        mask = threshold(alpha, level=level)
    elif op == "downscale_upscale":
        mask = downscale_upscale(alpha, factor=float(rng.uniform(*factor_range)), level=level)
    elif op == "gaussian_blur":
        sigma = max(0.5, float(rng.uniform(*sigma_range)) * short_side)
        mask = gaussian_blur(alpha, sigma=sigma, level=level)
    elif op == "convex_hull":
        mask = convex_hull(alpha, level=level)
    else:
        radius = max(1, round(float(rng.uniform(*radius_range)) * short_side))
        mask = (dilate if op == "dilate" else erode)(alpha, radius=radius, level=level)
    if not mask.any():
        mask = threshold(alpha, level=min(level, float(np.max(alpha)) / 2))
    return mask
