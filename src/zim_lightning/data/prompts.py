"""Box and point prompts sampled from a matte for ZIM training (ZIM paper, Sec. 3.2).

The paper prompts ZIM during training with a box from the min-max coordinates of the matte, jittered by
up to 10% of its size, or with random positive and negative points. Prompts follow SAM's ONNX
convention (docs/architecture.md, "Conventions"): ``point_coords`` Nx2 float (X, Y) pixels in the
resized 1024 frame, ``point_labels`` N float with 1 positive, 0 negative, 2 / 3 the top-left /
bottom-right box corners and -1 the padding point.

Each prompt has the token layout the model sees at inference (SAM's predictor and the official runner):
a box is its two corners, points are followed by one padding point (-1). The rest of the fixed length N
is filled with absent points (-2), which the model hides from every attention, so a training prompt
decodes exactly as the same prompt at inference.
"""

from __future__ import annotations

import numpy as np

from zim_lightning.prompt_labels import (
    LABEL_ABSENT,
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_NEGATIVE,
    LABEL_PAD,
    LABEL_POSITIVE,
    PADDING_POINT,
)


def support_box(alpha: np.ndarray, *, support_threshold: float) -> np.ndarray:
    """Min-max box of the matte's support.

    Args:
        alpha: HxW float in [0, 1].
        support_threshold: pixels with ``alpha > support_threshold`` are the support.

    Returns:
        float32 ``[x1, y1, x2, y2]``, inclusive pixel coordinates (X, Y).

    Raises:
        ValueError: if the support is empty.
    """
    support = alpha > support_threshold
    columns = np.flatnonzero(support.any(axis=0))
    rows = np.flatnonzero(support.any(axis=1))
    if columns.size == 0:
        raise ValueError(f"the matte has no pixel above the support threshold {support_threshold}")
    return np.array([columns[0], rows[0], columns[-1], rows[-1]], dtype=np.float32)


def jitter_box(
    box: np.ndarray, rng: np.random.Generator, *, jitter: float, image_size: tuple[int, int]
) -> np.ndarray:
    """Move each side of a box by up to ``jitter`` times the box's width (x) or height (y), then clip.

    Each coordinate moves on its own (as SAM's box noise does), so the paper's "up to 10% of its size"
    is read per side: the width and height change by up to twice ``jitter``.

    Args:
        box: ``[x1, y1, x2, y2]`` (X, Y) pixels.
        rng: random generator.
        jitter: the largest shift of a side as a fraction of the box size (0.1 in the paper).
        image_size: (H, W) the box is clipped to.

    Returns:
        float32 ``[x1, y1, x2, y2]`` with ``0 <= x1 <= x2 <= W - 1`` and ``0 <= y1 <= y2 <= H - 1``.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1
    shift = rng.uniform(-jitter, jitter, size=4) * np.array([width, height, width, height])
    jittered = np.array([x1, y1, x2, y2]) + shift
    limit_x, limit_y = image_size[1] - 1, image_size[0] - 1
    jittered = np.clip(jittered, 0, [limit_x, limit_y, limit_x, limit_y])
    # With jitter < 0.5 the sides cannot cross; sort anyway so a large jitter still gives a valid box.
    x_low, x_high = sorted(jittered[[0, 2]])
    y_low, y_high = sorted(jittered[[1, 3]])
    return np.array([x_low, y_low, x_high, y_high], dtype=np.float32)


def _pick(rng: np.random.Generator, candidates: np.ndarray, count: int) -> np.ndarray:
    if count <= 0 or candidates.size == 0:
        return candidates[:0]
    return rng.choice(candidates, size=min(count, candidates.size), replace=False)


def sample_points(
    alpha: np.ndarray,
    rng: np.random.Generator,
    *,
    num_positive: int,
    num_negative: int,
    positive_threshold: float,
    support_threshold: float,
    near_negative_p: float,
    near_margin: float,
    image_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random positive points where the matte is high and negative points outside its support.

    Args:
        alpha: HxW float in [0, 1].
        rng: random generator.
        num_positive: positive points (>= 1).
        num_negative: negative points (>= 0); fewer when the support leaves too little background.
        positive_threshold: positives are drawn where ``alpha >= positive_threshold``; a matte that never
            reaches it (glass, smoke) uses ``alpha >= max(alpha) / 2`` instead.
        support_threshold: negatives are drawn where ``alpha <= support_threshold``.
        near_negative_p: probability that the negatives are drawn near the object (inside its support
            box grown by ``near_margin`` of the box size) rather than anywhere in the background.
        near_margin: growth of the support box for near negatives, as a fraction of its size.
        image_size: (H, W) of the image in the top-left of a padded ``alpha``; points never fall in the
            padding. None: the whole array is image.

    Returns:
        (coords Kx2 float32 (X, Y) pixels, labels K float32 in {1, 0}), positives first.
    """
    if image_size is not None:
        alpha = alpha[: image_size[0], : image_size[1]]
    height, width = alpha.shape
    flat = alpha.reshape(-1)
    peak = float(flat.max())
    positive_level = positive_threshold if peak >= positive_threshold else peak / 2
    positives = _pick(rng, np.flatnonzero(flat >= positive_level), max(1, num_positive))

    negatives = np.empty(0, dtype=np.int64)
    if num_negative > 0:
        background = alpha <= support_threshold
        if rng.random() < near_negative_p:
            x1, y1, x2, y2 = support_box(alpha, support_threshold=support_threshold)
            grow_x, grow_y = near_margin * (x2 - x1 + 1), near_margin * (y2 - y1 + 1)
            left, top = int(max(0, x1 - grow_x)), int(max(0, y1 - grow_y))
            right, bottom = int(min(width - 1, x2 + grow_x)), int(min(height - 1, y2 + grow_y))
            window = background[top : bottom + 1, left : right + 1]
            rows, columns = np.nonzero(window)
            near = (rows + top) * width + (columns + left)
            negatives = _pick(rng, near, num_negative)
        if negatives.size == 0:
            negatives = _pick(rng, np.flatnonzero(background.reshape(-1)), num_negative)

    indices = np.concatenate([positives, negatives])
    coords = np.stack([indices % width, indices // width], axis=1).astype(np.float32)
    labels = np.concatenate(
        [np.full(positives.size, LABEL_POSITIVE), np.full(negatives.size, LABEL_NEGATIVE)]
    )
    return coords, labels.astype(np.float32)


def pad_prompt(coords: np.ndarray, labels: np.ndarray, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay a prompt out as inference does, then fill it to ``num_points`` with absent points.

    A prompt without box corners gets SAM's padding point (label -1 at (-0.5, -0.5)) after its points,
    as SAM's predictor and the official runner append; a box gets none. Absent points (label -2,
    coordinates 0) fill the rest.

    Returns:
        (coords ``num_points`` x 2 float32, labels ``num_points`` float32).
    """
    labels = np.asarray(labels, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.float32).reshape(-1, 2)
    if not np.isin(labels, (LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT)).any():
        coords = np.concatenate([coords, np.array([PADDING_POINT], dtype=np.float32)])
        labels = np.append(labels, np.float32(LABEL_PAD))
    if len(labels) > num_points:
        raise ValueError(
            f"{len(labels)} prompt points (with the padding point) do not fit in num_points={num_points}"
        )
    padded_coords = np.zeros((num_points, 2), dtype=np.float32)
    padded_labels = np.full(num_points, LABEL_ABSENT, dtype=np.float32)
    padded_coords[: len(labels)] = coords
    padded_labels[: len(labels)] = labels
    return padded_coords, padded_labels


class PromptSampler:
    """Draws one ZIM training prompt (a box or points) from a matte in the 1024 frame.

    Args:
        box_ratio: probability that a sample is prompted by a box rather than points.
        box_jitter: largest shift of a box side, as a fraction of the box size (paper: 0.1).
        max_positive: points samples get 1..max_positive positive points.
        max_negative: points samples get 0..max_negative negative points.
        positive_threshold: alpha at or above which a pixel can be a positive point.
        support_threshold: alpha above which a pixel belongs to the object for the negative points (drawn
            where alpha is at most this) and their "near" region.
        box_threshold: the box spans the pixels with alpha above this: 0, the paper's min-max of the
            matte, so faint strands stay inside the box (the box prompt's masked attention hides what lies
            outside it). At most ``support_threshold``.
        near_negative_p: probability that negatives are drawn near the object.
        near_margin: how far around the object "near" reaches, as a fraction of the box size.
    """

    def __init__(
        self,
        *,
        box_ratio: float = 0.5,
        box_jitter: float = 0.1,
        max_positive: int = 3,
        max_negative: int = 2,
        positive_threshold: float = 0.9,
        support_threshold: float = 0.05,
        box_threshold: float = 0.0,
        near_negative_p: float = 0.5,
        near_margin: float = 0.25,
    ) -> None:
        if not 0.0 <= box_threshold <= support_threshold:
            raise ValueError(
                f"box_threshold must be in [0, support_threshold = {support_threshold}], got {box_threshold}"
            )
        if not 0.0 <= box_ratio <= 1.0:
            raise ValueError(f"box_ratio must be in [0, 1], got {box_ratio}")
        if max_positive < 1 or max_negative < 0:
            raise ValueError(
                f"need max_positive >= 1 and max_negative >= 0, got {max_positive}, {max_negative}"
            )
        self.box_ratio = box_ratio
        self.box_jitter = box_jitter
        self.max_positive = max_positive
        self.max_negative = max_negative
        self.positive_threshold = positive_threshold
        self.support_threshold = support_threshold
        self.box_threshold = box_threshold
        self.near_negative_p = near_negative_p
        self.near_margin = near_margin

    @property
    def num_points(self) -> int:
        """N, the fixed number of prompt points per sample (a box takes two; points one more, the padding
        point)."""
        return max(2, self.max_positive + self.max_negative + 1)

    def __call__(
        self, alpha: np.ndarray, rng: np.random.Generator, *, image_size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw one prompt.

        Args:
            alpha: HxW float in [0, 1] in the (padded) 1024 frame, non-empty.
            rng: random generator.
            image_size: (H, W) of the resized image inside the frame; boxes are clipped to it.

        Returns:
            (point_coords Nx2 float32 (X, Y), point_labels N float32), laid out by :func:`pad_prompt`.
        """
        if rng.random() < self.box_ratio:
            box = support_box(alpha, support_threshold=self.box_threshold)
            box = jitter_box(box, rng, jitter=self.box_jitter, image_size=image_size)
            coords = box.reshape(2, 2)
            labels = np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], dtype=np.float32)
        else:
            coords, labels = sample_points(
                alpha,
                rng,
                num_positive=int(rng.integers(1, self.max_positive + 1)),
                num_negative=int(rng.integers(0, self.max_negative + 1)),
                positive_threshold=self.positive_threshold,
                support_threshold=self.support_threshold,
                near_negative_p=self.near_negative_p,
                near_margin=self.near_margin,
                image_size=image_size,
            )
        return pad_prompt(coords, labels, self.num_points)
