"""Reading the images users give the commands (``matte``, ``matte-all``, ``serve``), and writing theirs.

One decoder for all of them, so an image gives the same pixels, and a prompt the same place, whichever
command reads it: EXIF orientation applied (as image viewers show the file), 16-bit images scaled to 8
bits (Pillow's ``convert("RGB")`` clips them at 255, turning most of an image white).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zim_lightning.data.decode import GRAY_16_BIT_MODES, scale_16_bit
from zim_lightning.data.tar_writer import encode_png, write_atomic


def pil_to_rgb(picture: Image.Image) -> np.ndarray:
    """An opened image as HxWx3 uint8 RGB, EXIF orientation applied, 16-bit grayscale scaled to 8 bits.

    Raises:
        ValueError: a floating-point image (mode F), whose value range is unknown.
        OSError: the image data cannot be decoded.
    """
    picture = ImageOps.exif_transpose(picture)
    if picture.mode == "F":
        raise ValueError("32-bit floating-point images are not supported; save it as an 8- or 16-bit image")
    if picture.mode in GRAY_16_BIT_MODES:
        gray = scale_16_bit(np.asarray(picture))
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    return np.ascontiguousarray(np.asarray(picture.convert("RGB"), dtype=np.uint8))


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (see :func:`pil_to_rgb`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an image Pillow can decode, is too large to decode safely (Pillow's
            decompression-bomb limit), or is a floating-point image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(path) as picture:
            return pil_to_rgb(picture)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"image {str(path)!r} could not be read as an image: {err}") from err


def read_transparency(path: str | Path) -> np.ndarray | None:
    """The image file's own alpha channel as HxW uint8, oriented as :func:`read_rgb` orients the pixels,
    or None when it has none (or it cannot be read: :func:`read_rgb` reports that)."""
    try:
        with Image.open(path) as picture:
            picture = ImageOps.exif_transpose(picture)
            if "transparency" in picture.info and "A" not in picture.getbands():
                picture = picture.convert("RGBA")  # a palette entry or a colour key (grey, RGB) made clear
            if "A" not in picture.getbands():
                return None
            return np.asarray(picture.getchannel("A"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def alpha_to_uint8(alpha: np.ndarray) -> np.ndarray:
    """HxW float alpha in [0, 1] (clipped) -> HxW uint8 in [0, 255], rounded: the 8-bit matte the
    commands write and serve."""
    return np.round(np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write a uint8 HxW (grey) or HxWx3/4 array as a PNG, atomically (:func:`write_atomic`): an
    interrupted write leaves the old file or none, never a truncated one."""
    write_atomic(Path(path), encode_png(array))
