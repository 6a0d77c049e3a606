"""Matting metrics against hand-computed values and plain-Python brute-force references."""

from __future__ import annotations

import math
import socket
from collections import deque

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zim_lightning.metrics import (
    METRIC_NAMES,
    MattingErrors,
    connectivity_error,
    connectivity_levels,
    matting_errors,
    scoring_device,
    size_bucket,
)


def _block_example() -> tuple[torch.Tensor, torch.Tensor]:
    """4x4: gt a 2x2 block of ones at rows/cols 1-2; pred the same with pixel (1, 1) at 0.5."""
    gt = torch.zeros(4, 4, dtype=torch.float64)
    gt[1:3, 1:3] = 1.0
    pred = gt.clone()
    pred[1, 1] = 0.5
    return pred, gt


# ---------------------------------------------------------------- brute-force references (plain Python)


def _ref_sobel_grad(p: np.ndarray, g: np.ndarray) -> float:
    """mean |G(p) - G(g)| * 1e3, Sobel written out pixel by pixel with zero padding."""
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    h, w = p.shape

    def mag(a: np.ndarray, i: int, j: int) -> float:
        sx = sy = 0.0
        for di in range(3):
            for dj in range(3):
                y, x = i + di - 1, j + dj - 1
                v = a[y, x] if 0 <= y < h and 0 <= x < w else 0.0
                sx += kx[di][dj] * v
                sy += kx[dj][di] * v
        return math.sqrt(sx * sx + sy * sy + 1e-8)

    total = sum(abs(mag(p, i, j) - mag(g, i, j)) for i in range(h) for j in range(w))
    return total / (h * w) * 1e3


def _ref_gauss_grad(p: np.ndarray, g: np.ndarray, weight: np.ndarray, sigma: float = 1.4) -> float:
    """sum w * (|D p| - |D g|)^2 / 1000 with the Gaussian-derivative filter and replicate padding."""
    radius = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * 0.01)))

    def gauss(x: float) -> float:
        return math.exp(-x * x / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))

    size = 2 * radius + 1
    hx = [
        [gauss(i - radius) * (-(j - radius) / sigma**2) * gauss(j - radius) for j in range(size)]
        for i in range(size)
    ]
    norm = math.sqrt(sum(v * v for row in hx for v in row))
    h, w = p.shape

    def mag(a: np.ndarray, i: int, j: int) -> float:
        gx = gy = 0.0
        for di in range(size):
            for dj in range(size):
                y = min(max(i + di - radius, 0), h - 1)
                x = min(max(j + dj - radius, 0), w - 1)
                gx += hx[di][dj] / norm * a[y, x]
                gy += hx[dj][di] / norm * a[y, x]
        return math.sqrt(gx * gx + gy * gy)

    total = sum(weight[i, j] * (mag(p, i, j) - mag(g, i, j)) ** 2 for i in range(h) for j in range(w))
    return total / 1000


def _ref_conn(p: np.ndarray, g: np.ndarray, thresholds: np.ndarray | None = None) -> float:
    """Connectivity error (not divided by 1000) with breadth-first flood fill per threshold.

    ``thresholds``: t_0 .. t_10 (default k / 10), compared with ``p`` and ``g`` in their own dtype.
    """
    h, w = p.shape
    thresholds = np.arange(11) / 10 if thresholds is None else thresholds
    level = np.full((h, w), -1.0)
    for k in range(1, 11):
        t = thresholds[k]
        inside = [[p[i, j] >= t and g[i, j] >= t for j in range(w)] for i in range(h)]
        seen = [[False] * w for _ in range(h)]
        best: list[tuple[int, int]] = []
        for i in range(h):
            for j in range(w):
                if not inside[i][j] or seen[i][j]:
                    continue
                component, queue = [], deque([(i, j)])
                seen[i][j] = True
                while queue:
                    y, x = queue.popleft()
                    component.append((y, x))
                    for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                        if 0 <= yy < h and 0 <= xx < w and inside[yy][xx] and not seen[yy][xx]:
                            seen[yy][xx] = True
                            queue.append((yy, xx))
                if len(component) > len(best):
                    best = component
        omega = set(best)
        for i in range(h):
            for j in range(w):
                if level[i, j] == -1 and (i, j) not in omega:
                    level[i, j] = thresholds[k - 1]
    level[level == -1] = 1.0
    total = 0.0
    for i in range(h):
        for j in range(w):
            dp, dg = p[i, j] - level[i, j], g[i, j] - level[i, j]
            total += abs((1 - dp * (dp >= 0.15)) - (1 - dg * (dg >= 0.15)))
    return total


def _plateau_pair(seed: int, size: tuple[int, int] = (12, 14)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random mattes with plateaus (many components, ties and exact threshold values)."""
    rng = np.random.default_rng(seed)
    values = np.array([0.0, 0.05, 0.1, 0.3, 0.55, 0.8, 1.0])
    g = values[rng.integers(0, len(values), size)]
    p = np.clip(g + rng.choice([0.0, 0.0, 0.2, -0.3], size), 0, 1)
    return torch.from_numpy(p), torch.from_numpy(g)


# ---------------------------------------------------------------- hand-computed values


def test_paper_protocol_hand_values_on_4x4_block() -> None:
    pred, gt = _block_example()
    e = matting_errors(pred, gt, protocol="paper")
    assert e["sad"] == pytest.approx(0.5 / 1000)
    assert e["mse"] == pytest.approx(0.25 / 16 * 1e3)  # 15.625
    assert e["mae"] == pytest.approx(0.5 / 16 * 1e3)  # 31.25
    # Pixel (1, 1) is in the largest component up to t = 0.5 and drops out at 0.6, so l = 0.5 there;
    # the other block pixels stay in to t = 1 (l = 1), background pixels leave at 0.1 (l = 0).
    # phi_p(1, 1) = 1 (d = 0), phi_g(1, 1) = 1 - 0.5 = 0.5; every other pixel has phi_p = phi_g.
    assert e["conn"] == pytest.approx(0.5 / 1000)
    assert e["grad"] == pytest.approx(_ref_sobel_grad(pred.numpy(), gt.numpy()))


def test_paper_grad_hand_value_on_1x2() -> None:
    # pred [1, 0], gt [0, 0]: only Sx at pixel (0, 1) is non-zero (-2 * pred[0, 0]); every other
    # Sobel response sees zeros or padding, so G = sqrt(1e-8) = 1e-4 there.
    pred = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gt = torch.zeros(1, 2, dtype=torch.float64)
    expected = (math.sqrt(4 + 1e-8) - 1e-4) / 2 * 1e3
    assert matting_errors(pred, gt)["grad"] == pytest.approx(expected, rel=1e-12)


def test_conn_ignores_small_components_and_the_015_cutoff() -> None:
    # gt [1 1 1 0 1]: the single pixel at x = 4 is not in the largest component at any level, so its
    # level is 0; pred 0.12 there gives d = 0.12 < 0.15, phi_p = 1, while phi_g = 1 - 1 = 0.
    gt = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    pred = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.12]], dtype=torch.float64)
    e = matting_errors(pred, gt)
    assert e["conn"] == pytest.approx(1.0 / 1000)
    assert e["sad"] == pytest.approx(0.88 / 1000)


def test_conn_counts_a_difference_of_exactly_015() -> None:
    # the last pixel is in the common component up to level 0.1 (gt 0.15 < 0.2), so l = 0.1:
    # d_g = 0.05 < 0.15 gives phi_g = 1; d_p = 0.25 - 0.1 = 0.15 exactly, which counts (d >= 0.15):
    # phi_p = 0.85, and Conn = |0.85 - 1| = 0.15 (x 1/1000)
    gt = torch.tensor([[1.0, 1.0, 0.15]], dtype=torch.float64)
    pred = torch.tensor([[1.0, 1.0, 0.25]], dtype=torch.float64)
    assert matting_errors(pred, gt)["conn"] == pytest.approx(0.15 / 1000)
    # the same rule on the ground truth's side: Conn is symmetric in pred and gt
    assert matting_errors(gt, pred)["conn"] == pytest.approx(0.15 / 1000)


def test_conn_gives_a_tie_of_largest_components_to_the_first_in_scan_order() -> None:
    # The intersection's components {0, 1} and {3, 4} tie (2 pixels each) up to t = 0.3. Omega is the
    # first, so pixels 3 and 4 get level 0 (left out at t = 0.1) and pixels 0 and 1 level 0.3:
    # pixels 0, 1: d_p = 0.08 < 0.15 -> phi_p = 1; d_g = 0.7 -> phi_g = 0.3; |1 - 0.3| = 0.7 each;
    # pixels 3, 4: d_p = 0.55 -> phi_p = 0.45; d_g = 1 -> phi_g = 0; 0.45 each. Total 2.3 (Omega = the
    # second component would give 2.24)
    pred = torch.tensor([[0.38, 0.38, 0.0, 0.55, 0.55]], dtype=torch.float64)
    gt = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert connectivity_error(pred, gt) == pytest.approx(2.3, abs=1e-12)


@pytest.mark.parametrize("scale", [1, 150])
def test_conn_tie_goes_to_the_first_component_in_each_protocols_scan_order(scale: int) -> None:
    # Two equally large blobs up to t = 0.5: A (top right, pred 0.9) comes first row by row, B (bottom
    # left, pred 0.5) column by column, as MATLAB's bwconncomp numbers them (the dim reference).
    # Omega = A: A keeps level 0.9 (phi_p = phi_g = 1), B gets 0 (|0.5 - 0| x 4) -> 2.0.
    # Omega = B: B keeps level 0.5 (|1 - 0.5| x 4), A gets 0 (|0.1 - 0| x 4) -> 2.4.
    # Each pixel blown up to scale x scale: 900x900 is large enough for OpenCV to label in parallel
    # stripes, whose numbering must still follow the scan order.
    pred = torch.zeros(6, 6, dtype=torch.float64)
    gt = torch.zeros(6, 6, dtype=torch.float64)
    gt[0:2, 4:6], pred[0:2, 4:6] = 1.0, 0.9
    gt[4:6, 0:2], pred[4:6, 0:2] = 1.0, 0.5
    block = torch.ones(scale, scale, dtype=torch.float64)
    pred, gt = torch.kron(pred, block), torch.kron(gt, block)
    pixels = scale * scale
    assert connectivity_error(pred, gt) == pytest.approx(2.0 * pixels, abs=1e-12 * pixels)
    assert connectivity_error(pred, gt, column_major=True) == pytest.approx(2.4 * pixels, abs=1e-12 * pixels)
    assert matting_errors(pred, gt)["conn"] == pytest.approx(2.0 * pixels / 1000, abs=1e-15 * pixels)
    assert matting_errors(pred, gt, "dim")["conn"] == pytest.approx(2.4 * pixels / 1000, abs=1e-15 * pixels)


def _disc(radius: float, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size // 2
    return (yy**2 + xx**2 <= radius**2).astype(np.float64)


@pytest.mark.parametrize("seed", range(2))
def test_conn_source_is_the_first_of_many_tied_components_in_a_large_image(seed: int) -> None:
    # pred = gt = a 0/1 plane: every threshold's intersection is the plane itself, so the level is 1 on
    # its source component and 0 elsewhere. Single pixels on a stride-3 lattice, plus 40 two-pixel
    # dominoes (never touching anything), all tied as the largest: the source must be the domino
    # that comes first row by row, however OpenCV splits the 1800x1800 plane between its threads.
    rng = np.random.default_rng(seed)
    plane = np.zeros((1800, 1800))
    plane[::3, ::3] = rng.random((600, 600)) < 0.5
    cells = rng.choice(600 * 599, size=40, replace=False)
    rows, cols = 3 * (cells // 599), 3 * (cells % 599)
    plane[rows, cols] = plane[rows, cols + 1] = 1.0
    first = np.lexsort((cols, rows))[0]
    expected = np.zeros_like(plane)
    expected[rows[first], cols[first] : cols[first] + 2] = 1.0
    np.testing.assert_array_equal(connectivity_levels(plane, plane), expected)


@pytest.mark.parametrize("scale, offset", [(0.5, 0.0), (0.96, 0.02)])
def test_dim_grad_stretches_each_matte_to_the_full_range_first(scale: float, offset: float) -> None:
    # The reference (compute_gradient_loss.m) runs mat2gray on both mattes before gaussgradient: a faint
    # or lifted prediction is scored as its stretched form.
    gt = _disc(15)
    pred = offset + scale * _disc(13)
    got = matting_errors(torch.from_numpy(pred), torch.from_numpy(gt), "dim")["grad"]
    assert got == pytest.approx(_ref_gauss_grad(_disc(13), gt, np.ones_like(gt)), rel=1e-9)
    # a prediction of the right shape at half strength has no gradient error at all, against a full or a
    # faint ground truth (both mattes are stretched)
    for strength in (1.0, 0.8):
        half = matting_errors(torch.from_numpy(0.5 * gt), torch.from_numpy(strength * gt), "dim")
        assert half["grad"] == pytest.approx(0.0, abs=1e-15) and half["sad"] > 0
    # a constant matte is left as it is (no gradient whatever its value)
    flat = torch.full(gt.shape, 0.4, dtype=torch.float64)
    assert matting_errors(flat, torch.from_numpy(gt), "dim")["grad"] == pytest.approx(
        _ref_gauss_grad(flat.numpy(), gt, np.ones_like(gt)), rel=1e-9
    )


def test_dim_errors_see_only_the_unknown_region() -> None:
    # the only error, at (1, 1), lies in the trimap's known region: every dim error is 0 there
    pred, gt = _block_example()
    trimap = torch.full((4, 4), 255, dtype=torch.uint8)
    trimap[0, 0] = 128
    inside = matting_errors(pred, gt, protocol="dim", trimap=trimap)
    assert all(inside[name] == 0.0 for name in ("sad", "mse", "mae", "conn")), inside
    whole = matting_errors(pred, gt, protocol="dim")
    assert whole["sad"] > 0 and whole["conn"] > 0


def test_conn_with_no_overlap_counts_the_whole_prediction() -> None:
    # No pixel is >= 0.1 in both, so every level is 0: phi_p = 1 - 0.5, phi_g = 1, four pixels.
    pred = torch.full((2, 2), 0.5, dtype=torch.float64)
    gt = torch.zeros(2, 2, dtype=torch.float64)
    assert matting_errors(pred, gt)["conn"] == pytest.approx(2.0 / 1000)


def test_dim_protocol_hand_values_with_and_without_trimap() -> None:
    pred, gt = _block_example()
    whole = matting_errors(pred, gt, protocol="dim")
    assert whole["sad"] == pytest.approx(0.5 / 1000)
    assert whole["mse"] == pytest.approx(0.25 / 16)
    assert whole["mae"] == pytest.approx(0.5 / 16)
    assert whole["conn"] == pytest.approx(0.5 / 1000)

    trimap = torch.full((4, 4), 255, dtype=torch.uint8)
    trimap[0, 0] = trimap[1, 1] = 128  # unknown region: (0, 0), no error, and (1, 1), error 0.5
    trimap[3, 3] = 0
    region = matting_errors(pred, gt, protocol="dim", trimap=trimap)
    assert region["sad"] == pytest.approx(0.5 / 1000)
    assert region["mse"] == pytest.approx(0.25 / 2)
    assert region["mae"] == pytest.approx(0.5 / 2)
    assert region["conn"] == pytest.approx(0.5 / 1000)
    weight = (trimap == 128).double().numpy()
    assert region["grad"] == pytest.approx(_ref_gauss_grad(pred.numpy(), gt.numpy(), weight), rel=1e-9)
    assert whole["grad"] == pytest.approx(
        _ref_gauss_grad(pred.numpy(), gt.numpy(), np.ones((4, 4))), rel=1e-9
    )
    assert region["grad"] < whole["grad"]


# ---------------------------------------------------------------- references on random inputs


@pytest.mark.parametrize("seed", range(4))
def test_conn_matches_flood_fill_reference(seed: int) -> None:
    pred, gt = _plateau_pair(seed)
    assert connectivity_error(pred, gt) == pytest.approx(_ref_conn(pred.numpy(), gt.numpy()), abs=1e-12)


def test_conn_matches_reference_for_an_object_inside_a_larger_image() -> None:
    # Components are labelled only inside the box of the first level's intersection: place the pair off
    # the origin, with a stray prediction outside that box (level 0 there).
    small_p, small_g = _plateau_pair(5, size=(7, 9))
    pred = torch.zeros(16, 20, dtype=torch.float64)
    gt = torch.zeros(16, 20, dtype=torch.float64)
    pred[5:12, 8:17], gt[5:12, 8:17] = small_p, small_g
    pred[0, 0] = 0.7
    assert connectivity_error(pred, gt) == pytest.approx(_ref_conn(pred.numpy(), gt.numpy()), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_conn_of_8bit_mattes_matches_the_official_float32_thresholds(seed: int) -> None:
    # ZIM's official evaluation code (eval/metric.py) compares float32 mattes with the float32 thresholds
    # of torch.arange(0, 1.1, 0.1). An 8-bit alpha of 51, 102, 153, 204 or 255 (0.2 ... 1.0) equals its
    # float32 threshold there and reaches k / 10 here; a float64 np.arange(0, 1.1, 0.1) would make 153
    # miss 0.6000000000000001. Plateaus of those values make the thresholds decide many pixels.
    rng = np.random.default_rng(seed)
    values = np.array([0, 25, 26, 51, 76, 102, 127, 153, 179, 204, 230, 255])
    g8 = values[rng.integers(0, len(values), (12, 14))]
    p8 = np.clip(g8 + rng.choice([0, 0, 0, 51, -51, 26], g8.shape), 0, 255)
    official = torch.arange(0, 1 + 0.1, 0.1).numpy()
    assert official.dtype == np.float32 and official.shape == (11,)
    expected = _ref_conn((p8 / 255).astype(np.float32), (g8 / 255).astype(np.float32), official)
    assert connectivity_error(torch.from_numpy(p8 / 255), torch.from_numpy(g8 / 255)) == pytest.approx(
        expected, rel=1e-6
    )


@pytest.mark.parametrize("seed", range(2))
def test_grads_match_loop_references(seed: int) -> None:
    pred, gt = _plateau_pair(seed, size=(9, 11))
    p, g = pred.numpy(), gt.numpy()
    assert matting_errors(pred, gt)["grad"] == pytest.approx(_ref_sobel_grad(p, g), rel=1e-9)
    assert matting_errors(pred, gt, "dim")["grad"] == pytest.approx(
        _ref_gauss_grad(p, g, np.ones_like(p)), rel=1e-9
    )


@pytest.mark.parametrize("protocol", ["paper", "dim"])
def test_perfect_prediction_scores_zero(protocol: str) -> None:
    gt = torch.rand(17, 23, generator=torch.Generator().manual_seed(0))
    trimap = torch.full(gt.shape, 128, dtype=torch.uint8) if protocol == "dim" else None
    assert matting_errors(gt.clone(), gt, protocol=protocol, trimap=trimap) == dict.fromkeys(
        METRIC_NAMES, 0.0
    )


def test_metrics_run_in_float64_where_the_model_runs_except_on_mps() -> None:
    assert scoring_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # no tensor is made
    assert scoring_device("cpu") == torch.device("cpu")
    assert scoring_device("mps") == torch.device("cpu")  # MPS has no float64


def test_float32_and_float64_inputs_agree() -> None:
    pred, gt = _plateau_pair(7)
    e64 = matting_errors(pred, gt)
    e32 = matting_errors(pred.float(), gt.float())
    for name in ("sad", "mse", "mae", "grad"):
        assert e32[name] == pytest.approx(e64[name], rel=1e-6)


def test_clear_errors_for_bad_inputs() -> None:
    gt = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="same shape"):
        matting_errors(torch.zeros(4, 5), gt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        matting_errors(torch.full((4, 4), 2.0), gt)
    with pytest.raises(ValueError, match="protocol"):
        matting_errors(gt, gt, protocol="sam")
    with pytest.raises(ValueError, match="whole image"):
        matting_errors(gt, gt, trimap=torch.zeros(4, 4, dtype=torch.uint8))
    # a trimap whose "unknown" is 127 (or resized with interpolation) would score 0 everywhere
    with pytest.raises(ValueError, match=r"no unknown pixel \(value 128\).*\[127\]"):
        matting_errors(gt, gt, "dim", trimap=torch.full((4, 4), 127, dtype=torch.uint8))
    with pytest.raises(ValueError, match="HxW"):
        matting_errors(gt[None], gt[None])
    for protocol in ("paper", "dim"):  # not NaN (paper) or a TypeError from the trimap message (dim)
        with pytest.raises(ValueError, match="empty"):
            matting_errors(torch.zeros(0, 5), torch.zeros(0, 5), protocol)
    # NumPy arrays: a TypeError naming the argument, not torch's own about is_floating_point or .to
    with pytest.raises(TypeError, match=r"pred must be a torch.Tensor \(torch.from_numpy"):
        matting_errors(np.zeros((4, 4), np.float32), gt)
    with pytest.raises(TypeError, match="trimap must be a torch.Tensor or None, got ndarray"):
        matting_errors(gt, gt, "dim", trimap=np.full((4, 4), 128, np.uint8))


# ---------------------------------------------------------------- buckets and the torchmetrics form


def _gt_with_foreground(n_pixels: int, total: int = 200) -> torch.Tensor:
    gt = torch.zeros(total)
    gt[:n_pixels] = 0.9
    gt[n_pixels : n_pixels + 5] = 0.3  # exactly 0.3 is not "> 0.3"
    return gt.reshape(10, total // 10)


@pytest.mark.parametrize(
    ("n_pixels", "bucket"), [(0, "S"), (1, "S"), (2, "M"), (19, "M"), (20, "L"), (200 - 5, "L")]
)
def test_size_buckets_at_their_edges(n_pixels: int, bucket: str) -> None:
    # fraction n / 200: 2 / 200 = 0.01 is the first M, 20 / 200 = 0.1 the first L.
    assert size_bucket(_gt_with_foreground(n_pixels)) == bucket


def test_metric_means_buckets_and_deduplication() -> None:
    metric = MattingErrors(protocol="paper")
    gts = [_gt_with_foreground(1), _gt_with_foreground(10), _gt_with_foreground(50), _gt_with_foreground(60)]
    preds = [torch.clamp(g + 0.1 * (i + 1), 0, 1) for i, g in enumerate(gts)]
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        metric.update(p, g, index=i)
    metric.update(preds[3], gts[3], index=3)  # a distributed sampler's padding repeat: counted once
    result = metric.compute()
    per = [matting_errors(p, g) for p, g in zip(preds, gts, strict=True)]
    assert result["n"] == 4
    assert metric.computed_instances[:, 0].tolist() == [0, 1, 2, 3]
    for name in METRIC_NAMES:
        assert result[name] == pytest.approx(sum(e[name] for e in per) / 4)
        assert result["buckets"]["L"][name] == pytest.approx((per[2][name] + per[3][name]) / 2)
    assert [result["buckets"][b]["n"] for b in "SML"] == [1, 1, 2]
    assert result["buckets"]["S"]["sad"] == pytest.approx(per[0]["sad"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        metric = MattingErrors(protocol="paper")
        # Rank 0 gets instances 0, 2, 4; rank 1 gets 1, 3 and a padding repeat of 0 (uneven row counts).
        for index in [0, 2, 4] if rank == 0 else [1, 3, 0]:
            gt = _plateau_pair(index)[1]
            metric.update(torch.clamp(gt + 0.05 * index, 0, 1), gt, index=index)
        result = metric.compute()
        indices = metric.computed_instances[:, 0].tolist()
        # A rank without any instance (a subset all on the other rank) must still take part in the sync.
        lonely = MattingErrors(protocol="paper")
        if rank == 0:
            gt = _plateau_pair(9)[1]
            lonely.update(gt, gt, index=9)
        lonely_n = lonely.compute()["n"]
        torch.save((result["n"], result["sad"], result["conn"], indices, lonely_n), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metric_syncs_across_two_gloo_ranks(tmp_path) -> None:
    # This process is rank 0 and one spawned process rank 1 (each spawned process re-imports torch).
    port = _free_port()
    child = mp.get_context("spawn").Process(target=_sync_worker, args=(1, 2, port, str(tmp_path)))
    child.start()
    try:
        _sync_worker(0, 2, port, str(tmp_path))
    finally:
        child.join(timeout=300)
    assert child.exitcode == 0
    out = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    singles = [
        matting_errors(torch.clamp(g + 0.05 * i, 0, 1), g)
        for i, g in ((i, _plateau_pair(i)[1]) for i in range(5))
    ]
    expected = (5, sum(e["sad"] for e in singles) / 5, sum(e["conn"] for e in singles) / 5, [0, 1, 2, 3, 4])
    for rank in range(2):
        assert out[rank][:3] == pytest.approx(expected[:3]) and out[rank][3] == expected[3]
        assert out[rank][4] == 1


def test_conn_level_falls_back_when_a_higher_threshold_set_is_empty() -> None:
    from zim_lightning.metrics import connectivity_error

    # Both reach 0.7 but never 0.8 together: the level is 0.7, so phi(0.95) = 0.75 and phi(0.75) = 1.
    error = connectivity_error(torch.tensor([[0.95]]), torch.tensor([[0.75]]))
    assert error == pytest.approx(0.25)


# ---------------------------------------------------------------- images
