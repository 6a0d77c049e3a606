"""Decoding of the images, alphas and masks that shards and dataset folders carry, into numpy arrays.

Kept apart from the shard readers, so that reading one picture (the matte command, the
predictor, MicroMat-3K folders) does not import webdataset and pycocotools.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from zim_lightning.data.skips import CorruptSample

__all__ = [
    "FLOAT_LABEL_PROBLEM",
    "GRAY_16_BIT_MODES",
    "check_16_bit_label",
    "check_decoded_size",
    "decode_gray",
    "decode_image",
    "jpeg_reduction",
    "scale_16_bit",
]

#: Pillow modes of 16-bit grayscale PNGs (values 0..65535).
GRAY_16_BIT_MODES: tuple[str, ...] = ("I;16", "I;16B", "I;16L", "I")


def decode_image(data: bytes, *, key: str, max_side: int | None = None) -> np.ndarray:
    """Decode a JPEG or PNG into an RGB array.

    Args:
        data: the encoded image.
        key: the sample key, named in errors.
        max_side: when given, JPEGs whose longest side is at least twice ``max_side`` are decoded at a
            reduced scale (1/2, 1/4 or 1/8 in libjpeg's DCT domain) that keeps the longest side at least
            ``max_side``. This is several times faster than a full decode followed by a resize, and the
            caller resizes to ``max_side`` anyway (SAM frame, longest side 1024).

    Returns:
        HxWx3 uint8 RGB; 16-bit grayscale (PNG) is scaled to 8 bits (65535 -> 255, rounded).

    Raises:
        CorruptSample: if the bytes are not a decodable image, or are floating point (range unknown).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max_side is not None and image.format == "JPEG":
                width, height = image.size
                reduction = jpeg_reduction((height, width), max_side)
                if reduction > 1:
                    # draft() picks the largest DCT scale s with s <= min(W // w, H // h) for a requested
                    # (w, h): asking for the rounded-down size gives exactly 1 / reduction (the rounded-up
                    # one falls back a scale whenever a side is not a multiple of it: 2100 / 263 < 8)
                    image.draft("RGB", (max(1, width // reduction), max(1, height // reduction)))
            mode = image.mode
            if mode in GRAY_16_BIT_MODES:
                # convert("RGB") clips 16-bit values at 255 (a white image); scale them as the folder reader does
                rgb = np.repeat(scale_16_bit(np.asarray(image))[..., None], 3, axis=2)
            elif mode != "F":
                rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptSample(f"cannot decode image ({error})", key=key, reason="corrupt_image") from error
    if mode == "F":
        raise CorruptSample(
            "a 32-bit floating-point image, whose value range is unknown; expected 8-bit RGB or grayscale, "
            "or 16-bit grayscale",
            key=key,
            reason="corrupt_image",
        )
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise CorruptSample(
            f"expected an HxWx3 image, got shape {rgb.shape}", key=key, reason="corrupt_image"
        )
    return rgb


def scale_16_bit(values: np.ndarray) -> np.ndarray:
    """16-bit values (0..65535) to uint8 (0..255), rounded to the nearest level."""
    wide = values.astype(np.int64).clip(0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


#: Why a floating-point label (Pillow mode F, a float TIFF, say) is refused: its range is unknown, and
#: Pillow's conversion to 8 bits truncates [0, 1] values to an almost empty matte.
FLOAT_LABEL_PROBLEM = (
    "a 32-bit floating-point image, whose value range is unknown; expected 8-bit (0..255) or 16-bit "
    "(0..65535) grayscale: save it scaled to one of them"
)


def check_16_bit_label(values: np.ndarray) -> str | None:
    """Why a 16-bit alpha, mask or trimap looks like 8-bit values in a 16-bit file, or None.

    A label whose non-zero values all lie in 1..255 reads as almost nothing at 16 bits (255 / 65535 is
    alpha 0.004): such files come from tools that widen 8-bit arrays without scaling them. Guessing would
    let a wrong scale through silently, so readers refuse them with this reason.
    """
    top = int(values.max()) if values.size else 0
    if 0 < top <= 255:
        return (
            f"a 16-bit image whose values only reach {top}: 8-bit values (0..255) in a 16-bit file, "
            "expected 0..65535 (or save it as 8-bit)"
        )
    return None


def decode_gray(data: bytes, *, key: str) -> np.ndarray:
    """Decode a grayscale PNG (alpha or mask) into HxW uint8 in [0, 255].

    8-bit grayscale is the format; 16-bit grayscale is rescaled (65535 -> 255, rounded), and RGB or
    palette images are converted to luminance (alphas saved with three equal channels).

    Raises:
        CorruptSample: if the bytes are not a decodable image, carry an alpha channel (LA, RGBA: which
            of the channels is the matte is ambiguous), are floating point (:data:`FLOAT_LABEL_PROBLEM`),
            or are 16-bit with 8-bit values (:func:`check_16_bit_label`).
    """
    wide = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, has_alpha = image.mode, "A" in image.getbands()
            if mode in GRAY_16_BIT_MODES:
                wide = np.asarray(image)
                gray = scale_16_bit(wide)
            elif not has_alpha and mode != "F":
                gray = np.asarray(image if mode == "L" else image.convert("L"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptSample(
            f"cannot decode grayscale image ({error})", key=key, reason="corrupt_image"
        ) from error
    if mode == "F":
        raise CorruptSample(FLOAT_LABEL_PROBLEM, key=key, reason="corrupt_image")
    if has_alpha:
        raise CorruptSample(
            f"expected a grayscale alpha or mask (mode L or I;16), got mode {mode} with an alpha "
            "channel; save the matte as a single-channel PNG",
            key=key,
            reason="corrupt_image",
        )
    if gray.ndim != 2 or gray.size == 0:
        raise CorruptSample(f"expected an HxW image, got shape {gray.shape}", key=key, reason="corrupt_image")
    if wide is not None and (problem := check_16_bit_label(wide)) is not None:
        raise CorruptSample(problem, key=key, reason="corrupt_image")
    return gray


def jpeg_reduction(size: tuple[int, int], max_side: int) -> int:
    """The DCT scale divisor (1, 2, 4 or 8) :func:`decode_image` uses for a JPEG of (H, W) = ``size``: the
    largest that keeps the longest side at least ``max_side``."""
    scale = max(size) / max_side
    reduction = 1
    while reduction < 8 and scale >= 2 * reduction:
        reduction *= 2
    return reduction


def check_decoded_size(
    image: np.ndarray, original_size: tuple[int, int], *, key: str, max_side: int | None = None
) -> None:
    """Check that a decode matches an original (H, W): exactly, or, for a :func:`decode_image` with
    ``max_side``, at a reduced JPEG scale up to the one it asks for (a side shorter than the reduction
    makes Pillow's ``draft`` pick a smaller one).

    Raises:
        CorruptSample: if the image is not the original size (at such a scale).
    """
    height, width = original_size
    largest = 1 if max_side is None else jpeg_reduction(original_size, max_side)
    for reduction in (r for r in (1, 2, 4, 8) if r <= largest):
        if image.shape[:2] == (-(-height // reduction), -(-width // reduction)):
            return
    raise CorruptSample(
        f"image is {image.shape[1]}x{image.shape[0]}, its labels say {width}x{height}",
        key=key,
        reason="corrupt_image",
    )
