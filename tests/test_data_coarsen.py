"""Matte -> coarse segmentation ops (paper Sec. 3.1): each op's defining property."""

from __future__ import annotations

import numpy as np
import pytest

from zim_lightning.data import coarsen


def soft_matte(height: int = 64, width: int = 80) -> np.ndarray:
    """An ellipse with a soft rim and a notch (a concavity for the hull), alpha in [0, 1]."""
    yy, xx = np.mgrid[:height, :width]
    distance = np.sqrt(((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 2) / (width / 3)) ** 2)
    alpha = np.clip((1.1 - distance) / 0.2, 0, 1).astype(np.float32)
    alpha[height // 2 - 3 : height // 2 + 3, width // 2 :] = 0  # notch from the centre to the right
    return alpha


def test_threshold_binarises():
    alpha = soft_matte()
    mask = coarsen.threshold(alpha, level=0.5)
    assert set(np.unique(mask)) == {0.0, 1.0}
    np.testing.assert_array_equal(mask, (alpha > 0.5).astype(np.float32))
    assert coarsen.threshold(alpha, level=0.2).sum() > coarsen.threshold(alpha, level=0.8).sum()
    assert coarsen.threshold(np.array([[0.5]], np.float32), level=0.5).sum() == 0  # strictly above


def test_a_wide_dilation_reaches_exactly_its_radius():
    # radius 12 takes the distance-transform path; a pixel 12 away is inside, 13 away is not
    alpha = np.zeros((41, 41), np.float32)
    alpha[20, 20] = 1
    grown = coarsen.dilate(alpha, radius=12)
    assert grown[20, 32] == grown[8, 20] == 1 and grown[20, 33] == grown[7, 20] == 0


def test_dilate_grows_and_erode_shrinks():
    alpha = soft_matte()
    base = coarsen.threshold(alpha)
    grown = coarsen.dilate(alpha, radius=3)
    shrunk = coarsen.erode(alpha, radius=3)
    assert (grown >= base).all() and grown.sum() > base.sum()
    assert (shrunk <= base).all() and shrunk.sum() < base.sum()


def test_convex_hull_contains_the_input_and_fills_the_notch():
    alpha = soft_matte()
    base = coarsen.threshold(alpha)
    hull = coarsen.convex_hull(alpha)
    assert (hull >= base).all()
    notch = (slice(32 - 2, 32 + 2), slice(40, 48))
    assert base[notch].sum() == 0 and hull[notch].all()


def test_blur_then_threshold_smooths_the_boundary():
    rng = np.random.default_rng(0)
    alpha = coarsen.threshold(soft_matte())
    noisy = np.clip(alpha + (rng.random(alpha.shape) < 0.05) - (rng.random(alpha.shape) < 0.05), 0, 1)

    def boundary_length(mask: np.ndarray) -> int:
        return int(np.abs(np.diff(mask, axis=0)).sum() + np.abs(np.diff(mask, axis=1)).sum())

    smooth = coarsen.gaussian_blur(noisy, sigma=2.0)
    assert set(np.unique(smooth)) <= {0.0, 1.0}
    assert boundary_length(smooth) < boundary_length(noisy) / 2


def test_a_wide_blur_runs_at_reduced_resolution_and_matches_the_full_one():
    # sigmas of 5-30 px at 1024 (random_coarsen) blur a downscaled copy with sigma / factor; the result
    # must be the full-resolution blur's, to the odd boundary pixel
    import cv2

    yy, xx = np.mgrid[:256, :256]
    disc = (np.hypot(yy - 128, xx - 128) < 80).astype(np.float32)
    disc[120:136, 200:256] = 1.0  # a bar that the blur rounds off
    got = coarsen.gaussian_blur(disc, sigma=16.0)
    want = coarsen.threshold(cv2.GaussianBlur(disc, (0, 0), 16.0))
    assert (got == want).mean() > 0.999


def test_downscale_upscale_loses_detail_but_keeps_the_shape():
    alpha = soft_matte()
    alpha[3, 5:75] = 1.0  # a one-pixel strand away from the body: lost at 1/8 resolution
    coarse = coarsen.downscale_upscale(alpha, factor=8)
    assert coarse.shape == alpha.shape and set(np.unique(coarse)) <= {0.0, 1.0}
    assert coarse[3].sum() == 0
    base = coarsen.threshold(alpha)
    assert (coarse * base).sum() / base.sum() > 0.8


def test_random_coarsen_uses_every_op_and_never_returns_an_empty_mask():
    alpha = soft_matte()
    rng = np.random.default_rng(1)
    for op in coarsen.COARSEN_OPS:
        mask = coarsen.random_coarsen(alpha, rng, ops=[op])
        assert mask.shape == alpha.shape and mask.dtype == np.float32 and mask.any()
    # thin hair vanishes under erosion: the fallback keeps a non-empty mask
    hair = np.zeros((64, 64), np.float32)
    hair[:, 30] = 0.7
    assert coarsen.random_coarsen(hair, rng, ops=["erode"], radius_range=(0.1, 0.1)).any()
    with pytest.raises(ValueError, match="coarsening ops"):
        coarsen.random_coarsen(alpha, rng, ops=["sharpen"])


@pytest.mark.parametrize("radius", [3, 12])  # disk kernel and distance-transform paths
def test_morphology_matches_a_disk_and_keeps_the_frame_edge(radius):
    import cv2

    alpha = soft_matte()
    alpha[8:56, :20] = 1.0  # the object runs out of the frame on the left
    base = coarsen.threshold(alpha)
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    reference = cv2.dilate(base, disk)
    grown = coarsen.dilate(alpha, radius=radius)
    assert (grown != reference).mean() < 0.01
    assert (grown >= base).all()
    shrunk = coarsen.erode(alpha, radius=radius)
    assert (shrunk <= base).all() and shrunk.sum() < base.sum()
    assert shrunk[32, 0] == 1, "erosion does not eat into the object where the frame cuts it"
