"""SAM-style resize of the longest side and bottom-right zero padding (ZIM paper, Sec. 3.2; SAM's frame).

ZIM keeps SAM's input frame: the image is resized so that its longest side is 1024, then zero-padded at
the bottom and right to 1024x1024. Prompts live in that frame. Images stay uint8 here; models normalise.
"""

from __future__ import annotations

import cv2
import numpy as np


def get_preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) after resizing so that the longest side is ``long_side``, aspect ratio kept, rounded.

    Args:
        height: original height in pixels.
        width: original width in pixels.
        long_side: target length of the longest side.
    """
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def reduce_by(array: np.ndarray, factor: int) -> np.ndarray:
    """Shrink an HxW or HxWxC array by an integer ``factor`` with area averaging.

    The array is first extended by edge replication to multiples of ``factor``, so OpenCV takes its
    exact-integer area path (several times faster than a fractional area resize); the output is
    ceil(H / factor) x ceil(W / factor), the size a 1/factor JPEG DCT decode gives.
    """
    if factor < 2:
        return array
    height, width = array.shape[:2]
    pad_h, pad_w = -height % factor, -width % factor
    if pad_h or pad_w:
        array = cv2.copyMakeBorder(array, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
    reduced = ((height + pad_h) // factor, (width + pad_w) // factor)
    return cv2.resize(array, (reduced[1], reduced[0]), interpolation=cv2.INTER_AREA)


def resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxW or HxWxC array to ``size`` = (H, W).

    Shrinking averages by the largest power-of-two factor that does not pass the target (area, no
    aliasing of thin hair in the matte), then finishes bilinearly over the remaining factor below 2.
    This matches what the reduced JPEG decode does to the image, and is much faster than one fractional
    area resize. Enlarging is bilinear.
    """
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    factor = min(array.shape[0] / height, array.shape[1] / width)
    power = 1
    while power * 2 <= factor:
        power *= 2
    array = reduce_by(array, power)
    if array.shape[:2] == (height, width):
        return array
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


def resize_longest_side(
    array: np.ndarray, long_side: int, *, original_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize so that the longest side is ``long_side``.

    Args:
        array: HxW or HxWxC.
        long_side: target length of the longest side.
        original_size: (H, W) the target shape is computed from, when ``array`` is a reduced decode of a
            larger original (the result then matches what the full-size original would give).
    """
    height, width = original_size if original_size is not None else array.shape[:2]
    return resize(array, get_preprocess_shape(height, width, long_side))


def pad_bottom_right(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an HxW or HxWxC array at the bottom and right to ``size`` x ``size``.

    Raises:
        ValueError: if the array is larger than ``size`` on either side.
    """
    height, width = array.shape[:2]
    if height > size or width > size:
        raise ValueError(f"cannot pad a {height}x{width} array to {size}x{size}: resize it first")
    padded = np.zeros((size, size, *array.shape[2:]), dtype=array.dtype)
    padded[:height, :width] = array
    return padded


def valid_map(input_size: tuple[int, int], size: int) -> np.ndarray:
    """``size`` x ``size`` float32 map: 1 inside the resized image (top-left ``input_size``), 0 in padding."""
    valid = np.zeros((size, size), dtype=np.float32)
    valid[: input_size[0], : input_size[1]] = 1.0
    return valid
