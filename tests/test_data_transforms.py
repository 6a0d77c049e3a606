"""SAM-style resize of the longest side, bottom-right padding and the valid map."""

from __future__ import annotations

import numpy as np
import pytest

from zim_lightning.data.transforms import (
    get_preprocess_shape,
    pad_bottom_right,
    resize_longest_side,
    valid_map,
)


def test_preprocess_shape_keeps_aspect_and_hits_the_long_side():
    assert get_preprocess_shape(1500, 2250, 1024) == (683, 1024)
    assert get_preprocess_shape(2250, 1500, 1024) == (1024, 683)
    assert get_preprocess_shape(300, 200, 1024) == (1024, 683)  # small images are enlarged


def test_resize_pad_and_valid():
    image = np.full((150, 225, 3), 200, np.uint8)
    resized = resize_longest_side(image, 64)
    assert resized.shape == (43, 64, 3) and resized.dtype == np.uint8
    padded = pad_bottom_right(resized, 64)
    assert padded.shape == (64, 64, 3) and (padded[43:] == 0).all() and (padded[:43] == 200).all()
    valid = valid_map((43, 64), 64)
    assert valid.dtype == np.float32 and valid.sum() == 43 * 64 and valid[42, 63] == 1 and valid[43, 0] == 0
    # a reduced decode resizes to the shape of its original
    assert resize_longest_side(image[::2, ::2], 64, original_size=(150, 225)).shape == (43, 64, 3)
    with pytest.raises(ValueError, match="resize it first"):
        pad_bottom_right(image, 64)
