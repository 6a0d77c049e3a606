"""Reading user images (images.py): EXIF orientation, 16-bit scaling, clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zim_lightning.images import pil_to_rgb, read_rgb
from zim_lightning.serve import RequestError
from zim_lightning.serve.store import decode_image


def test_exif_orientation_is_applied(tmp_path) -> None:
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :20] = 255  # a white block at the stored image's top left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    shown = read_rgb(tmp_path / "rotated.jpg")
    assert shown.shape == (60, 40, 3)  # as a viewer shows it: portrait
    assert shown[:20, -10:].mean() > 200 and shown[-20:, :10].mean() < 50  # the block is now top right


def test_16_bit_images_are_scaled_not_clipped(tmp_path) -> None:
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    rgb = read_rgb(tmp_path / "ramp16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 256, 3)
    np.testing.assert_array_equal(rgb[0, :, 0], np.arange(256))  # convert("RGB") gave 255 from 1 on
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    with pytest.raises(ValueError, match="floating-point"):
        pil_to_rgb(Image.fromarray(np.zeros((4, 4), np.float32)))


def test_a_decompression_bomb_upload_is_a_400(tmp_path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1000  # 32x64 = 2048 pixels is then over twice the limit
        buffer = io.BytesIO()
        Image.new("L", (32, 64)).save(buffer, format="PNG")
        with pytest.raises(RequestError, match="too large to decode safely") as caught:
            decode_image(buffer.getvalue(), max_side=8192)
        assert caught.value.status == 400
        Image.new("L", (32, 64)).save(tmp_path / "bomb.png")
        with pytest.raises(ValueError, match="could not be read as an image"):
            read_rgb(tmp_path / "bomb.png")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_save_png_replaces_whole_files_and_a_failed_write_keeps_the_old_one(tmp_path) -> None:
    from zim_lightning.images import save_png

    path = tmp_path / "a_alpha.png"
    save_png(np.full((4, 6), 7, np.uint8), path)
    save_png(np.full((4, 6), 9, np.uint8), path)
    assert np.asarray(Image.open(path)).tolist() == np.full((4, 6), 9).tolist()
    with pytest.raises(TypeError):  # PIL cannot write a float64 RGB array: nothing may be lost
        save_png(np.zeros((4, 6, 3)), path)
    assert np.asarray(Image.open(path)).tolist() == np.full((4, 6), 9).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_alpha.png"]


def test_palette_transparency_is_read(tmp_path: Path) -> None:
    from zim_lightning.images import read_transparency

    picture = Image.new("P", (4, 3), 0)
    picture.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    picture.paste(1, (0, 0, 2, 3))
    path = tmp_path / "p.png"
    picture.save(path, transparency=0)
    alpha = read_transparency(path)
    assert alpha is not None and alpha[:, :2].min() == 255 and alpha[:, 2:].max() == 0


def test_transparency_is_oriented_like_the_pixels(tmp_path: Path) -> None:
    from zim_lightning.images import read_rgb, read_transparency

    rgba = np.zeros((2, 4, 4), np.uint8)
    rgba[..., 3] = np.arange(8, dtype=np.uint8).reshape(2, 4) * 30
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    Image.fromarray(rgba, "RGBA").save(path, exif=exif)
    alpha = read_transparency(path)
    assert alpha is not None and alpha.shape == read_rgb(path).shape[:2] == (4, 2)


# ---------------------------------------------------------------- serve
