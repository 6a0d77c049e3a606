"""Matting shards (image + alpha) and segmentation shards (image + mask) for the label converter (ZIM
paper, Sec. 3.1) and for ZIM training on plain mattes before SA1B-Matte exists.

Formats (docs/architecture.md, "File formats"): ``<key>.jpg`` (or ``<key>.png``) RGB image,
``<key>.alpha.png`` 8-bit alpha or ``<key>.mask.png`` (0 / 255), and ``<key>.json``
``{"kind": "fine" | "solid", "source": str}``. ``zim-lightning pack-shards`` (``data.pack``) writes them
from folders of images and alphas or masks.
"""

from __future__ import annotations

import numpy as np

from zim_lightning.data.decode import check_decoded_size, decode_gray, decode_image
from zim_lightning.data.skips import CorruptSample

#: Member holding the image, the alpha of a matting sample and the mask of a segmentation sample.
IMAGE_MEMBER, ALPHA_MEMBER, MASK_MEMBER = "jpg", "alpha.png", "mask.png"
#: Members an image may come in (a dataset's PNG images are packed as they are).
IMAGE_MEMBERS: tuple[str, ...] = (IMAGE_MEMBER, "png")


def _member(sample: dict, name: str) -> bytes:
    data = sample.get(name)
    if data is None:
        key = sample.get("__key__", "?")
        raise CorruptSample(f"missing tar member {key}.{name}", key=key, reason="missing_member")
    return data


def _image(sample: dict) -> bytes:
    for name in IMAGE_MEMBERS:
        if name in sample:
            return sample[name]
    return _member(sample, IMAGE_MEMBER)  # raises, naming the usual member


def is_matting_sample(sample: dict) -> bool:
    """Whether a raw tar sample is a matting sample (holds an alpha)."""
    return ALPHA_MEMBER in sample


def is_segmentation_sample(sample: dict) -> bool:
    """Whether a raw tar sample is a segmentation (STL) sample (holds a mask)."""
    return MASK_MEMBER in sample


def decode_matting(sample: dict, *, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode a matting sample.

    Args:
        sample: raw tar sample with ``jpg`` (or ``png``) and ``alpha.png``.
        max_side: reduced JPEG decoding (see :func:`~zim_lightning.data.decode.decode_image`); the alpha
            keeps its full size.

    Returns:
        (image HxWx3 uint8 RGB, alpha H'xW' uint8 in [0, 255]); H' = H and W' = W without ``max_side``.

    Raises:
        CorruptSample: on a missing or undecodable member, mismatched sizes or an all-zero alpha.
    """
    key = sample.get("__key__", "?")
    alpha = decode_gray(_member(sample, ALPHA_MEMBER), key=key)
    if not alpha.any():
        raise CorruptSample("empty alpha", key=key, reason="empty_mask")
    image = decode_image(_image(sample), key=key, max_side=max_side)
    check_decoded_size(image, alpha.shape, key=key, max_side=max_side)
    return image, alpha


def decode_segmentation(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """Decode a segmentation sample.

    Returns:
        (image HxWx3 uint8 RGB, mask HxW float32 in {0, 1}).

    Raises:
        CorruptSample: on a missing or undecodable member, mismatched sizes or an empty mask.
    """
    key = sample.get("__key__", "?")
    mask = decode_gray(_member(sample, MASK_MEMBER), key=key)
    if not mask.any():
        raise CorruptSample("empty mask", key=key, reason="empty_mask")
    image = decode_image(_image(sample), key=key)
    check_decoded_size(image, mask.shape, key=key)
    # Masks are stored 0 / 255; anything else from lossy re-encoding is binarised at the midpoint.
    return image, (mask > 127).astype(np.float32)
