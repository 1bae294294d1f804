"""Thumbnails made by the preprocessor from the image it decodes for the encoder: upright, 320 px, one decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipsearch.images import ImagePreprocessor, PreprocessConfig

pytestmark = pytest.mark.unit

CONFIG = PreprocessConfig(224, 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", 1 / 255)
EXIF_ORIENTATION, ROTATED_90_CLOCKWISE = 0x0112, 6


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def halves(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Red left half, blue right half."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2, 0] = 255
    pixels[:, size[0] // 2 :, 2] = 255
    return Image.fromarray(pixels).convert(mode)


def thumbnail_of(data: bytes, side: int = 320) -> Image.Image:
    prepared = ImagePreprocessor(CONFIG).prepare(data, "photo", thumbnail_side=side)
    assert prepared.thumbnail is not None
    return Image.open(io.BytesIO(prepared.thumbnail))


def test_a_large_drafted_jpeg_gets_an_upright_320px_webp_and_the_same_pixels_as_without() -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CLOCKWISE
    data = encoded(halves((4000, 3000)), "JPEG", exif=exif.tobytes(), quality=90)
    preprocessor = ImagePreprocessor(CONFIG)
    with_thumbnail = preprocessor.prepare(data, "photo", thumbnail_side=320)
    without = preprocessor.prepare(data, "photo")

    assert without.thumbnail is None
    np.testing.assert_array_equal(with_thumbnail.pixel_values, without.pixel_values)
    stored = Image.open(io.BytesIO(with_thumbnail.thumbnail))
    assert stored.format == "WEBP" and stored.size == (240, 320)  # upright: the stored 4000x3000 turned
    thumb = stored.convert("RGB")
    top, bottom = np.asarray(thumb)[20, 120], np.asarray(thumb)[300, 120]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left (red) half is on top once upright


def test_a_png_with_transparency_keeps_its_alpha() -> None:
    image = halves((1200, 600), "RGBA")
    image.putalpha(Image.new("L", image.size, 0).point(lambda _: 0))
    image.paste((0, 255, 0, 255), (0, 0, 600, 600))
    thumb = thumbnail_of(encoded(image, "PNG"))
    assert thumb.mode == "RGBA" and thumb.size == (320, 160)
    assert thumb.getpixel((40, 80))[3] == 255 and thumb.getpixel((280, 80))[3] == 0


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 800, dtype=np.uint16), (400, 1))
    thumb = thumbnail_of(encoded(Image.fromarray(ramp), "PNG")).convert("L")
    assert thumb.size == (320, 160)
    left, middle, right = (thumb.getpixel((x, 80)) for x in (2, 160, 317))
    assert left < 10 and 110 < middle < 145 and right > 245


def test_a_small_image_is_not_enlarged() -> None:
    thumb = thumbnail_of(encoded(halves((200, 100)), "WEBP"))
    assert thumb.size == (200, 100)


def test_a_large_png_shares_its_box_reduction_with_the_model_input_and_keeps_the_same_pixels() -> None:
    data = encoded(halves((2560, 1440)), "PNG", compress_level=1)
    preprocessor = ImagePreprocessor(CONFIG)
    with_thumbnail = preprocessor.prepare(data, "wallpaper", thumbnail_side=320)
    without = preprocessor.prepare(data, "wallpaper")
    np.testing.assert_array_equal(with_thumbnail.pixel_values, without.pixel_values)
    thumb = Image.open(io.BytesIO(with_thumbnail.thumbnail)).convert("RGB")
    assert thumb.size == (320, 180)
    left, right = np.asarray(thumb)[90, 40], np.asarray(thumb)[90, 280]
    assert left[0] > 200 > left[2] and right[2] > 200 > right[0]


def test_a_photo_is_drafted_as_without_a_thumbnail_when_its_longest_side_still_makes_one() -> None:
    """1280x960: DCT-scaled to 320x240 either way (the thumbnail once asked for both sides of at least 320)."""
    data = encoded(halves((1280, 960)), "JPEG", quality=90)
    preprocessor = ImagePreprocessor(CONFIG)
    with_thumbnail = preprocessor.prepare(data, "photo", thumbnail_side=320)
    without = preprocessor.prepare(data, "photo")
    np.testing.assert_array_equal(with_thumbnail.pixel_values, without.pixel_values)
    assert (with_thumbnail.width, with_thumbnail.height) == (1280, 960)
    assert Image.open(io.BytesIO(with_thumbnail.thumbnail)).size == (320, 240)
