"""ZIM training prompts from a matte (paper Sec. 3.2) in SAM's points + labels convention."""

from __future__ import annotations

import numpy as np
import pytest

from zim_lightning.data.prompts import PromptSampler, jitter_box, pad_prompt, sample_points, support_box


def matte(height: int = 96, width: int = 128) -> np.ndarray:
    alpha = np.zeros((height, width), np.float32)
    alpha[20:60, 30:90] = 1.0
    alpha[18:20, 30:90] = 0.4  # soft rim: support but not a positive point
    alpha[60:62, 28:92] = 0.02  # below the support threshold
    return alpha


def test_support_box_is_the_min_max_of_the_support():
    alpha = matte()
    box = support_box(alpha, support_threshold=0.05)
    np.testing.assert_array_equal(box, [30, 18, 89, 59])
    ys, xs = np.nonzero(alpha > 0.05)
    assert box[0] <= xs.min() and box[2] >= xs.max() and box[1] <= ys.min() and box[3] >= ys.max()
    with pytest.raises(ValueError, match="support threshold"):
        support_box(np.zeros((4, 4)), support_threshold=0.05)


def test_jittered_box_stays_within_the_jitter_and_the_image():
    rng = np.random.default_rng(0)
    box = np.array([30, 18, 89, 59], np.float32)
    width, height = box[2] - box[0], box[3] - box[1]
    for _ in range(200):
        jittered = jitter_box(box, rng, jitter=0.1, image_size=(96, 128))
        shift = np.abs(jittered - box)
        assert (shift <= 0.1 * np.array([width, height, width, height]) + 1e-4).all()
        assert 0 <= jittered[0] <= jittered[2] <= 127 and 0 <= jittered[1] <= jittered[3] <= 95
    # a box at the border is clipped to the image
    edge = jitter_box(np.array([0, 0, 127, 95], np.float32), rng, jitter=0.5, image_size=(96, 128))
    assert edge.min() >= 0 and edge[2] <= 127 and edge[3] <= 95


def test_points_are_positive_on_the_object_and_negative_off_it():
    alpha = matte()
    rng = np.random.default_rng(1)
    for near in (0.0, 1.0):
        coords, labels = sample_points(
            alpha,
            rng,
            num_positive=3,
            num_negative=4,
            positive_threshold=0.9,
            support_threshold=0.05,
            near_negative_p=near,
            near_margin=0.25,
        )
        assert list(labels) == [1, 1, 1, 0, 0, 0, 0]
        x, y = coords[:, 0].astype(int), coords[:, 1].astype(int)
        assert (alpha[y[labels == 1], x[labels == 1]] >= 0.9).all()
        assert (alpha[y[labels == 0], x[labels == 0]] <= 0.05).all()
        if near:  # near negatives lie in the support box grown by 25%
            assert (x[labels == 0] >= 30 - 15).all() and (x[labels == 0] <= 89 + 15).all()


def test_faint_mattes_still_get_a_positive_point():
    alpha = np.zeros((32, 32), np.float32)
    alpha[10:20, 10:20] = 0.3  # glass: never reaches the positive threshold
    coords, labels = sample_points(
        alpha,
        np.random.default_rng(2),
        num_positive=2,
        num_negative=0,
        positive_threshold=0.9,
        support_threshold=0.05,
        near_negative_p=0.0,
        near_margin=0.25,
    )
    assert list(labels) == [1, 1] and (alpha[coords[:, 1].astype(int), coords[:, 0].astype(int)] > 0).all()


def test_sampler_follows_the_contract():
    alpha = matte()
    rng = np.random.default_rng(3)
    sampler = PromptSampler(box_ratio=0.5, max_positive=3, max_negative=2)
    kinds = set()
    for _ in range(100):
        coords, labels = sampler(alpha, rng, image_size=(96, 128))
        assert coords.shape == (6, 2) and labels.shape == (6,) and coords.dtype == labels.dtype == np.float32
        real = labels[labels >= 0]
        # the layout inference sees (a box alone; points then one padding point), then absent points
        layout = labels[labels != -2]
        assert (labels[len(layout) :] == -2).all(), "absent points come last"
        if 2 in real:
            kinds.add("box")
            assert list(layout) == [2, 3]
            x1, y1, x2, y2 = coords[:2].reshape(-1)
            assert x1 <= 30 + 6 and x2 >= 89 - 6  # contains the support up to the 10% jitter
        else:
            kinds.add("points")
            assert real[0] == 1 and set(real) <= {0, 1} and (np.diff(real) <= 0).all()
            assert list(layout) == [*real, -1] and tuple(coords[len(real)]) == (-0.5, -0.5)
    assert kinds == {"box", "points"}
    only_boxes = PromptSampler(box_ratio=1.0)
    assert all(2 in only_boxes(alpha, rng, image_size=(96, 128))[1] for _ in range(20))
    only_points = PromptSampler(box_ratio=0.0)
    assert all(2 not in only_points(alpha, rng, image_size=(96, 128))[1] for _ in range(20))


def test_pad_prompt_rejects_overflow():
    with pytest.raises(ValueError, match="num_points"):
        pad_prompt(np.zeros((2, 2)), np.ones(2), 2)  # two points and the padding point
    coords, labels = pad_prompt(np.zeros((2, 2)), np.array([2.0, 3.0]), 2)  # a box fits exactly
    assert list(labels) == [2, 3]


def test_points_never_fall_in_the_padding():
    alpha = np.zeros((128, 128), np.float32)
    alpha[:96] = matte()[:, :128]  # image 96 x 128 in a padded 128 x 128 frame
    sampler = PromptSampler(box_ratio=0.0, max_positive=1, max_negative=8, near_negative_p=0.0)
    rng = np.random.default_rng(4)
    for _ in range(50):
        coords, labels = sampler(alpha, rng, image_size=(96, 128))
        assert (coords[labels == 0, 1] <= 95).all()


def test_the_training_box_is_the_min_max_of_the_whole_matte_faint_strands_included():
    alpha = matte()  # a faint strand (0.02) runs below the object, outside the 0.05 support
    sampler = PromptSampler(box_ratio=1.0, box_jitter=0.0)
    coords, labels = sampler(alpha, np.random.default_rng(0), image_size=alpha.shape)
    ys, xs = np.nonzero(alpha > 0)
    assert coords[:2].tolist() == [[xs.min(), ys.min()], [xs.max(), ys.max()]]
    assert coords[1, 1] == 61 > support_box(alpha, support_threshold=0.05)[3]  # the strand's rows count
    with pytest.raises(ValueError, match="box_threshold"):
        PromptSampler(box_threshold=0.1, support_threshold=0.05)


def test_point_prompts_take_every_count_up_to_the_maxima():
    sampler = PromptSampler(box_ratio=0.0, max_positive=3, max_negative=2)
    rng = np.random.default_rng(0)
    positives, negatives = set(), set()
    for _ in range(200):
        _, labels = sampler(matte(), rng, image_size=(96, 128))
        positives.add(int((labels == 1).sum()))
        negatives.add(int((labels == 0).sum()))
    assert positives == {1, 2, 3} and negatives == {0, 1, 2}
