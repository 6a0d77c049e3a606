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
#: Above this blur sigma (pixels) the blur runs at 1 / (sigma // this) resolution.
_BLUR_SIGMA_PER_REDUCTION = 4.0
#: Largest dilation / erosion radius (pixels) done with a disk kernel; larger ones use a distance transform.
_KERNEL_MAX_RADIUS = 8

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

    For large ``sigma`` the blur runs at a reduced resolution (factor ``sigma / 4``, area-averaged)
    and is enlarged back bilinearly: a wide Gaussian keeps no detail that resolution would lose, the
    result is thresholded anyway, and the cost no longer grows with the kernel.

    Args:
        alpha: HxW float in [0, 1].
        sigma: blur standard deviation in pixels, > 0.
        level: threshold of the result.
    """
    if sigma <= 0:
        raise ValueError(f"gaussian_blur sigma must be > 0, got {sigma}")
    height, width = alpha.shape
    factor = max(1, int(sigma // _BLUR_SIGMA_PER_REDUCTION))
    image = alpha.astype(np.float32)
    if factor > 1:
        small = (max(1, width // factor), max(1, height // factor))
        image = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma / factor, sigmaY=sigma / factor)
    if factor > 1:
        blurred = cv2.resize(blurred, (width, height), interpolation=cv2.INTER_LINEAR)
    return threshold(blurred, level=level)


def _within(source: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (Euclidean) of a non-zero pixel of ``source``; HxW bool.

    Small radii use a disk kernel; large ones a distance transform, whose cost does not grow with the
    radius (a disk kernel of radius 30 is several times slower at 1024x1024).
    """
    if radius <= _KERNEL_MAX_RADIUS:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        return cv2.dilate(source.astype(np.uint8), disk) > 0
    distance = cv2.distanceTransform((source == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    return distance <= radius


def dilate(alpha: np.ndarray, *, radius: int, level: float = 0.5) -> np.ndarray:
    """Grow the thresholded mask by a disk of ``radius`` pixels.

    Args:
        alpha: HxW float in [0, 1].
        radius: disk radius in pixels, >= 1.
        level: threshold applied before dilating.
    """
    if radius < 1:
        raise ValueError(f"dilate radius must be >= 1, got {radius}")
    return _within(threshold(alpha, level=level), radius).astype(np.float32)


def erode(alpha: np.ndarray, *, radius: int, level: float = 0.5) -> np.ndarray:
    """Shrink the thresholded mask by a disk of ``radius`` pixels.

    The image border does not erode: an object cut by the frame keeps its extent there.

    Args:
        alpha: HxW float in [0, 1].
        radius: disk radius in pixels, >= 1.
        level: threshold applied before eroding.
    """
    if radius < 1:
        raise ValueError(f"erode radius must be >= 1, got {radius}")
    binary = threshold(alpha, level=level)
    return (~_within(binary == 0, radius) & (binary > 0)).astype(np.float32)


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
