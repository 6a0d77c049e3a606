"""Matting error metrics: SAD, MSE, MAE, Grad and Conn under two protocols (paper Sec. 5, evaluation).

Two protocols, and every evaluation names the one it used:

``paper``
    What the ZIM paper reports on MicroMat-3K (and AM-2K / AIM-500), so our numbers compare with its
    tables. Per instance, at the original resolution, over the whole image, ``p`` the prediction and
    ``g`` the ground truth, both HxW in [0, 1], ``N = H * W``:

    - ``sad  = sum|p - g| / 1000``
    - ``mse  = mean((p - g)^2) * 1000``
    - ``mae  = mean|p - g| * 1000``
    - ``grad = mean|G(p) - G(g)| * 1000`` with ``G(x) = sqrt(Sx(x)^2 + Sy(x)^2 + 1e-8)``, ``Sx``/``Sy`` the
      responses to the unnormalised 3x3 Sobel kernels (``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` and its
      transpose) with zero padding of 1 pixel;
    - ``conn = sum|phi(p) - phi(g)| / 1000``, the connectivity error (see :func:`connectivity_error`).

    These are the definitions of the evaluation code released with ZIM (``eval/metric.py`` and
    ``eval/main_eval.py``, read in a public fork of the official repository): the same scales, Sobel
    kernels, thresholds, tie rule and size buckets. That code computes in float32, with the float32
    thresholds of ``torch.arange(0, 1.1, 0.1)``; an 8-bit ground truth reaches each of them exactly
    when it reaches ``k / 10`` here. It scores the predictor's float alpha, where ``zim-lightning eval``
    scores it quantised to 16 bits (under 1e-5 per pixel).

``dim``
    The Composition-1k tradition (Xu et al., Deep Image Matting), over the trimap's unknown region
    ``U = {trimap == 128}`` when a trimap is given, else over the whole image; filters and connected
    components always see the whole image, only the sums are restricted to ``U``:

    - ``sad  = sum_U |p - g| / 1000``
    - ``mse  = sum_U (p - g)^2 / |U|`` (not scaled; 0 when ``U`` is empty)
    - ``mae  = sum_U |p - g| / |U|`` (not scaled; 0 when ``U`` is empty)
    - ``grad = sum_U (|D(p')| - |D(g')|)^2 / 1000``, ``D`` the gradient from first-order Gaussian-derivative
      filters with sigma 1.4: the 2D kernel ``h[i, j] = gauss(i) * dgauss(j)`` on ``-r..r`` with
      ``r = ceil(sigma * sqrt(-2 ln(sqrt(2 pi) * sigma * 0.01)))`` (4 for sigma 1.4), scaled to unit L2 norm,
      its transpose for y, replicate padding (the reference ``gaussgradient``); ``p'`` and ``g'`` are the
      mattes stretched to [0, 1] by their own minimum and maximum, as the reference's ``mat2gray`` does
      first (a matte that already spans [0, 1] is unchanged; a constant one has no gradient either way);
    - ``conn = sum_U |phi(p) - phi(g)| / 1000``, with a tie between equally large components going to the
      first in column-major order, as the reference's ``bwconncomp`` numbers them (the paper protocol
      takes the first in row-major order).

Instances are bucketed by object size, the fraction of ground-truth pixels with ``g > 0.3``:
``S`` below 0.01, ``M`` below 0.1, ``L`` otherwise (:func:`size_bucket`).

Everything is computed in float64. :func:`matting_errors` is the functional form; :class:`MattingErrors`
is the torchmetrics form that accumulates per-instance errors and syncs them across ranks.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

PROTOCOLS: tuple[str, ...] = ("paper", "dim")
METRIC_NAMES: tuple[str, ...] = ("sad", "mse", "mae", "grad", "conn")
BUCKETS: tuple[str, ...] = ("S", "M", "L")

#: Sums are reported in thousands (SAD, Grad, Conn); paper means in thousandths (MSE, MAE, Grad).
SUM_SCALE = 1e-3
MEAN_SCALE = 1e3
#: Added under the square root of the paper's Sobel magnitude.
SOBEL_EPS = 1e-8
#: Value of the unknown region in a 0 / 128 / 255 trimap.
TRIMAP_UNKNOWN = 128
#: The dim protocol's Gaussian-derivative filter: sigma and the truncation tolerance of its support.
DIM_GRAD_SIGMA = 1.4
DIM_GRAD_EPSILON = 1e-2
#: Connectivity: threshold levels k / CONN_LEVELS for k = 1..CONN_LEVELS, and the phi distance cut-off.
CONN_LEVELS = 10
CONN_MIN_DISTANCE = 0.15
#: Size buckets: fraction of gt > BUCKET_ALPHA; S below BUCKET_EDGES[0], M below BUCKET_EDGES[1], else L.
BUCKET_ALPHA = 0.3
BUCKET_EDGES: tuple[float, float] = (0.01, 0.1)

#: Columns of a MattingErrors row: index, the metrics, foreground fraction.
_ROW_WIDTH = 2 + len(METRIC_NAMES)


def _check_alpha(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (torch.from_numpy for an array), got {type(x).__name__}"
        )
    if x.ndim != 2:
        raise ValueError(f"{name} must be an HxW alpha matte, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a float alpha matte in [0, 1], got dtype {x.dtype}")
    if x.numel() and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise ValueError(f"{name} must hold finite values in [0, 1], got range [{x.min()}, {x.max()}]")


def foreground_fraction(gt: torch.Tensor) -> float:
    """Fraction of pixels with ``gt > 0.3``, the object size used for the S/M/L buckets.

    Args:
        gt: HxW ground-truth alpha in [0, 1].
    """
    return float((gt > BUCKET_ALPHA).double().mean())


def size_bucket(gt: torch.Tensor) -> str:
    """Size bucket of an instance: ``"S"`` if under 1% of gt is > 0.3, ``"M"`` if under 10%, else ``"L"``.

    Args:
        gt: HxW ground-truth alpha in [0, 1].
    """
    return _bucket_of_fraction(foreground_fraction(gt))


def _bucket_of_fraction(fraction: float) -> str:
    if fraction < BUCKET_EDGES[0]:
        return "S"
    if fraction < BUCKET_EDGES[1]:
        return "M"
    return "L"


def _correlate_1d(x: torch.Tensor, kernel: list[float] | torch.Tensor, dim: int) -> torch.Tensor:
    """Valid 1D correlation of ``x`` along ``dim`` (the output is ``len(kernel) - 1`` shorter there).

    Written as a weighted sum of shifted slices: element-wise work on any device and dtype, much faster
    than a float64 ``conv2d`` on CPU. The 2D kernels of both protocols are separable (outer products).
    """
    length = x.shape[dim] - len(kernel) + 1
    taps = [(k, float(weight)) for k, weight in enumerate(kernel) if float(weight) != 0.0]
    (first, first_weight), rest = taps[0], taps[1:]
    out = x.narrow(dim, first, length) * first_weight
    for k, weight in rest:
        out.add_(x.narrow(dim, k, length), alpha=weight)  # in place: one pass over memory per tap
    return out


def sobel_magnitude(alpha: torch.Tensor) -> torch.Tensor:
    """The paper protocol's gradient magnitude ``sqrt(Sx^2 + Sy^2 + 1e-8)``.

    ``Sx`` is the response to ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` = outer([1, 2, 1], [-1, 0, 1]) and
    ``Sy`` to its transpose, on the image zero-padded by 1 pixel.

    Args:
        alpha: BxHxW alpha in [0, 1] (any float dtype).

    Returns:
        BxHxW magnitudes, same dtype.
    """
    smooth, diff = [1.0, 2.0, 1.0], [-1.0, 0.0, 1.0]
    padded = F.pad(alpha, (1, 1, 1, 1))  # Bx(H+2)x(W+2), zeros
    # Correlation and convolution differ only in the sign of each response, which the square removes.
    sx = _correlate_1d(_correlate_1d(padded, smooth, dim=-2), diff, dim=-1)  # BxHxW
    sy = _correlate_1d(_correlate_1d(padded, diff, dim=-2), smooth, dim=-1)  # BxHxW
    return torch.sqrt(sx.square() + sy.square() + SOBEL_EPS)


def gaussian_derivative_1d(sigma: float = DIM_GRAD_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1D factors of the dim protocol's Gaussian-derivative kernels (the reference ``gaussgradient``).

    The reference 2D kernel is ``hx[i, j] = gauss(i - r) * dgauss(j - r)`` on ``-r..r``, scaled to unit L2
    norm, with ``r = ceil(sigma * sqrt(-2 ln(sqrt(2 pi) * sigma * 0.01)))``; ``hy = hx.T``. Being an outer
    product, ``hx = outer(g, d)`` with the factors returned here, each of unit L2 norm.

    Args:
        sigma: standard deviation in pixels.

    Returns:
        ``(g, d)``: float64 vectors of length 2r+1, the Gaussian and its derivative ``-u / sigma^2 * gauss``.
    """
    radius = math.ceil(
        sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * DIM_GRAD_EPSILON))
    )
    u = torch.arange(-radius, radius + 1, dtype=torch.float64)
    gauss = torch.exp(-(u**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    dgauss = -u / sigma**2 * gauss
    return gauss / gauss.norm(), dgauss / dgauss.norm()


def gaussian_gradient_magnitude(alpha: torch.Tensor, sigma: float = DIM_GRAD_SIGMA) -> torch.Tensor:
    """``|D(alpha)|`` with the Gaussian-derivative kernels of :func:`gaussian_derivative_1d`.

    Args:
        alpha: BxHxW alpha in [0, 1].
        sigma: standard deviation in pixels.

    Returns:
        BxHxW gradient magnitudes (replicate padding at the borders), same dtype as ``alpha``.
    """
    gauss, deriv = (v.tolist() for v in gaussian_derivative_1d(sigma))
    radius = len(gauss) // 2
    padded = F.pad(alpha[:, None], (radius,) * 4, mode="replicate")[:, 0]  # Bx(H+2r)x(W+2r)
    # Correlation instead of convolution flips the sign of both responses; the magnitude is unchanged.
    gx = _correlate_1d(_correlate_1d(padded, gauss, dim=-2), deriv, dim=-1)  # BxHxW
    gy = _correlate_1d(_correlate_1d(padded, deriv, dim=-2), gauss, dim=-1)  # BxHxW
    return (gx.square() + gy.square()).sqrt()


def connectivity_levels(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-pixel level ``l``: the last threshold at which the pixel is still connected to the source region.

    For each threshold ``t_k = k * 0.1``, k = 1..10, ``Omega_k`` is the largest 4-connected component of
    ``{pred >= t_k} & {gt >= t_k}`` (background, the pixels outside that set, is never a component; the
    first component in row-major scan order wins a tie). A pixel's level is ``t_{k-1}`` for the first
    ``k`` with the pixel outside ``Omega_k`` (``t_0 = 0``), or 1 if it lies in every ``Omega_k``. An empty
    intersection gives an empty ``Omega_k``, so every pixel still unassigned gets ``t_{k-1}``.

    Args:
        pred: HxW float array in [0, 1].
        gt: HxW float array in [0, 1].

    Returns:
        HxW float64 array of levels in {0, 0.1, ..., 1}.
    """
    # k / 10 rather than k * 0.1: the latter is 0.30000000000000004 for k = 3 and would drop alpha 0.3.
    levels = np.arange(CONN_LEVELS + 1, dtype=np.float64) / CONN_LEVELS  # t_0 .. t_10
    # A pixel is in both thresholded sets exactly when the smaller of its two values reaches the threshold.
    lower = np.minimum(pred, gt)
    # Every level's intersection lies inside the first one's, and pixels outside it get level 0: label
    # only its bounding box (small objects in large images are the common case).
    result = np.zeros(pred.shape, dtype=np.float64)
    first_level = lower >= levels[1]
    rows, cols = np.flatnonzero(first_level.any(axis=1)), np.flatnonzero(first_level.any(axis=0))
    if rows.size == 0:
        return result
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    result[window] = _connectivity_levels_in(lower[window], levels)
    return result


def _connectivity_levels_in(lower: np.ndarray, levels: np.ndarray) -> np.ndarray:
    level = np.ones(lower.shape, dtype=np.float64)  # pixels in every Omega_k keep 1
    connected = np.ones(lower.shape, dtype=bool)  # pixels in Omega_1 .. Omega_{k-1}
    for k in range(1, CONN_LEVELS + 1):
        source = _largest_component(lower >= levels[k])
        level[connected & ~source] = levels[k - 1]
        connected &= source
        if not connected.any():
            break
    return level


def _largest_component(plane: np.ndarray) -> np.ndarray:
    """HxW bool mask of the largest 4-connected component of ``plane`` (all False if it has none).

    OpenCV numbers components in row-major order of their first pixel (label 0 is the background), so
    ``argmax``, which takes the first of equal areas, gives a tie to the first component in scan order.
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(plane, dtype=np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    if count == 1:
        return np.zeros(plane.shape, dtype=bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def connectivity_error(
    pred: torch.Tensor,
    gt: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    column_major: bool = False,
) -> float:
    """Connectivity error ``sum w * |phi(p) - phi(g)|`` (not yet divided by 1000).

    ``phi(x) = 1 - d * [d >= 0.15]`` with ``d = x - l`` and ``l`` the per-pixel level from
    :func:`connectivity_levels` (shared by prediction and ground truth).

    Args:
        pred: HxW prediction in [0, 1].
        gt: HxW ground truth in [0, 1].
        weight: optional HxW 0/1 weight (the dim protocol's unknown region); None sums over all pixels.
        column_major: True: of two equally large components, the first in column-major order is the
            source region (MATLAB's ``bwconncomp``, the dim reference); False: the first in row-major order.

    Returns:
        The error as a Python float.
    """
    p = pred.detach().to("cpu", torch.float64).numpy()
    g = gt.detach().to("cpu", torch.float64).numpy()
    level = connectivity_levels(p.T, g.T).T if column_major else connectivity_levels(p, g)
    phi_p, phi_g = _phi(p, level), _phi(g, level)
    error = np.abs(np.subtract(phi_p, phi_g, out=phi_p), out=phi_p)
    if weight is not None:
        error = error * weight.detach().to("cpu", torch.float64).numpy()
    return float(error.sum())


def _phi(alpha: np.ndarray, level: np.ndarray) -> np.ndarray:
    """``1 - d * [d >= 0.15]`` with ``d = alpha - level``, as one new float64 array."""
    phi = np.subtract(alpha, level)
    phi *= phi >= CONN_MIN_DISTANCE
    return np.subtract(1.0, phi, out=phi)


def matting_errors(
    pred: torch.Tensor,
    gt: torch.Tensor,
    protocol: str = "paper",
    trimap: torch.Tensor | None = None,
) -> dict[str, float]:
    """SAD, MSE, MAE, Grad and Conn of one instance, as the module docstring defines them.

    Args:
        pred: HxW predicted alpha in [0, 1] (any float dtype, any device).
        gt: HxW ground-truth alpha in [0, 1], same shape.
        protocol: ``"paper"`` (whole image, the ZIM paper's scales) or ``"dim"`` (Composition-1k).
        trimap: HxW trimap with 0 / 128 / 255 values; ``dim`` only, restricts the sums to ``trimap == 128``.

    Returns:
        ``{"sad", "mse", "mae", "grad", "conn"}`` as Python floats.

    Raises:
        TypeError: for inputs that are not tensors (NumPy arrays: ``torch.from_numpy``).
        ValueError: for an unknown protocol, mismatched shapes, values outside [0, 1], a trimap given
            with the paper protocol (which always uses the whole image), or a trimap without an unknown
            (128) pixel (its dim errors would all be 0, or undefined for MSE and MAE).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    _check_alpha("pred", pred)
    _check_alpha("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"pred and gt are empty (shape {tuple(pred.shape)}): there is nothing to score")
    p = pred.detach().to(torch.float64)
    g = gt.detach().to(device=p.device, dtype=torch.float64)
    diff = p - g

    if protocol == "paper":
        if trimap is not None:
            raise ValueError(
                "the paper protocol evaluates the whole image; pass trimap only with protocol='dim'"
            )
        grads = sobel_magnitude(torch.stack([p, g]))
        return {
            "sad": float(diff.abs().sum()) * SUM_SCALE,
            "mse": float(diff.square().mean()) * MEAN_SCALE,
            "mae": float(diff.abs().mean()) * MEAN_SCALE,
            "grad": float((grads[0] - grads[1]).abs().mean()) * MEAN_SCALE,
            "conn": connectivity_error(p, g) * SUM_SCALE,
        }

    if trimap is None:
        weight = torch.ones_like(p)
    else:
        if not isinstance(trimap, torch.Tensor):
            raise TypeError(f"trimap must be a torch.Tensor or None, got {type(trimap).__name__}")
        if trimap.shape != gt.shape:
            raise ValueError(f"trimap must have the shape of gt {tuple(gt.shape)}, got {tuple(trimap.shape)}")
        weight = (trimap.to(p.device) == TRIMAP_UNKNOWN).to(torch.float64)
    area = float(weight.sum())
    if not area:
        raise ValueError(
            f"the trimap has no unknown pixel (value {TRIMAP_UNKNOWN}), which is all the dim protocol scores; "
            f"its values are {torch.unique(trimap).tolist()[:8]}"
        )
    grads = gaussian_gradient_magnitude(torch.stack([_full_range(p), _full_range(g)]))
    return {
        "sad": float((diff.abs() * weight).sum()) * SUM_SCALE,
        "mse": float((diff.square() * weight).sum()) / area,
        "mae": float((diff.abs() * weight).sum()) / area,
        "grad": float(((grads[0] - grads[1]).square() * weight).sum()) * SUM_SCALE,
        "conn": connectivity_error(p, g, weight, column_major=True) * SUM_SCALE,
    }


def _full_range(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha`` stretched to [0, 1] by its own minimum and maximum (MATLAB's ``mat2gray``); a constant
    matte is returned as it is."""
    low, high = alpha.min(), alpha.max()
    return torch.where(
        high > low, (alpha - low) / (high - low).clamp_min(torch.finfo(alpha.dtype).tiny), alpha
    )


def scoring_device(device: torch.device | str) -> torch.device:
    """Where the float64 metrics run for a model on ``device``: there, except on Apple's MPS (which has no
    float64), where they run on the CPU."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


class MattingErrors(Metric):
    """Accumulates per-instance matting errors; computes their means overall and per size bucket.

    Each :meth:`update` adds one instance row ``(index, sad, mse, mae, grad, conn, fg_fraction)``; the rows
    are concatenated across ranks on sync. Rows are de-duplicated by ``index`` (first kept) because a
    distributed sampler pads the last batch by repeating instances, which must not count twice.

    Args:
        protocol: ``"paper"`` or ``"dim"`` (see :func:`matting_errors`).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, *, protocol: str = "paper", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        # A list state: ranks may hold different numbers of rows (a tensor state must match in shape).
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        #: Every rank's de-duplicated rows at the last :meth:`compute` (Nx7, see :meth:`instances`).
        self.computed_instances = torch.zeros(0, _ROW_WIDTH, dtype=torch.float64)

    def update(
        self, pred: torch.Tensor, gt: torch.Tensor, index: int, trimap: torch.Tensor | None = None
    ) -> None:
        """Add one instance.

        Args:
            pred: HxW predicted alpha in [0, 1].
            gt: HxW ground-truth alpha in [0, 1].
            index: the instance's position in its dataset (unique per instance).
            trimap: optional HxW 0/128/255 trimap (dim protocol only).
        """
        errors = matting_errors(pred, gt, protocol=self.protocol, trimap=trimap)
        row = [float(index), *(errors[name] for name in METRIC_NAMES), foreground_fraction(gt)]
        self.rows.append(torch.tensor([row], dtype=torch.float64, device=scoring_device(self.device)))

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Gather the rows of every rank (torchmetrics' ``sync``).

        A rank that scored no instance (e.g. a subset that all landed on other ranks) would offer
        torchmetrics' 1D float32 placeholder to the gather, which cannot meet the others' Nx7 float64
        rows; it offers an empty 0x7 float64 block instead.
        """
        if isinstance(self.rows, list) and not self.rows:
            self.rows.append(
                torch.zeros(0, _ROW_WIDTH, dtype=torch.float64, device=scoring_device(self.device))
            )
        super().sync(*args, **kwargs)

    def instances(self) -> torch.Tensor:
        """This process's de-duplicated rows, sorted by index: Nx7 float64 ``(index, sad, mse, mae, grad,
        conn, fg)``. Every rank's rows, as :meth:`compute` saw them, are in :attr:`computed_instances`.
        """
        if isinstance(self.rows, list) and not self.rows:
            return torch.zeros(0, _ROW_WIDTH, dtype=torch.float64)
        rows = dim_zero_cat(self.rows).cpu()
        _, first = np.unique(rows[:, 0].numpy(), return_index=True)
        return rows[torch.as_tensor(first)]

    def compute(self) -> dict[str, Any]:
        """Means over instances.

        Returns:
            ``{"sad", "mse", "mae", "grad", "conn": float, "n": int, "buckets": {"S"|"M"|"L": {same keys}}}``;
            means of an empty set are NaN.
        """
        rows = self.instances()  # inside compute() the state is synced: every rank's rows
        self.computed_instances = rows
        result = _summarise(rows)
        buckets = [_bucket_of_fraction(f) for f in rows[:, -1].tolist()]
        result["buckets"] = {
            b: _summarise(rows[torch.tensor([x == b for x in buckets], dtype=torch.bool)]) for b in BUCKETS
        }
        return result


def _summarise(rows: torch.Tensor) -> dict[str, Any]:
    n = rows.shape[0]
    means = (
        rows[:, 1 : 1 + len(METRIC_NAMES)].mean(dim=0) if n else torch.full((len(METRIC_NAMES),), math.nan)
    )
    return {**{name: float(v) for name, v in zip(METRIC_NAMES, means, strict=True)}, "n": int(n)}
