"""Decode and preprocess an image into CLIP pixel values (EXIF orientation, modes, size limits, JPEG draft)."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from clipsearch.errors import ImageTooLarge, InvalidImage
from clipsearch.thumbnails import thumbnail_webp

log = logging.getLogger(__name__)

RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
DEFAULT_MAX_PIXELS = 80_000_000
# JPEG DCT scaling keeps the shortest side at least this multiple of the target size; the final BICUBIC
# resize antialiases what is left of the downscale. 12 MP JPEGs, int8 ViT-B/32, 2 AVX2 cores
# (benchmarks/embed.py, one run): end to end 16.6 img/s at factor 1, 14.2 at factor 2, 7.1 fully decoded;
# min embedding cosine vs full decoding 0.999876 (factor 1) and 0.999889 (factor 2) int8, 1.000000 fp32.
DEFAULT_DRAFT_FACTOR = 1.0
# Large images without reduced decoding (PNG, WebP) are box-reduced (Image.reduce) while they stay at least
# this multiple of the target size, then resized with the model's filter.
BOX_REDUCTION_GAP = 2.0
# Past this resized long side (extreme panoramas), resize only the cropped window instead of the
# whole strip: the same filter, off by at most a few levels, without a multi-gigapixel intermediate.
MAX_RESIZED_ASPECT = 16
ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_STRIP_PIXELS = 1 << 20


@dataclass(frozen=True)
class PreprocessConfig:
    """The model's preprocess.json: shortest side to `size`, centre crop `crop_size`, rescale, normalize."""

    size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str
    rescale_factor: float

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PreprocessConfig:
        parsed = cls(
            size=int(config["size"]),
            crop_size=int(config["crop_size"]),
            mean=tuple(float(value) for value in config["mean"]),
            std=tuple(float(value) for value in config["std"]),
            resample=str(config["resample"]),
            rescale_factor=float(config["rescale_factor"]),
        )
        if not 0 < parsed.crop_size <= parsed.size:
            raise ValueError(f"crop_size {parsed.crop_size} must be in 1..size ({parsed.size})")
        if len(parsed.mean) != 3 or len(parsed.std) != 3 or min(parsed.std) <= 0:
            raise ValueError(f"mean {parsed.mean} and std {parsed.std} need 3 values, std positive")
        if parsed.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample {parsed.resample!r} is not one of {sorted(RESAMPLE_FILTERS)}")
        return parsed


@dataclass(frozen=True)
class PreparedImage:
    """Pixel values float32 [3, crop, crop], the original size as displayed (after EXIF orientation), and
    a WebP thumbnail when one was asked for (None if asked for and it could not be made)."""

    pixel_values: np.ndarray
    width: int
    height: int
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class _ResizeTarget:
    """An image's size, the size the model's resize gives it (shortest side to `size`), and the crop's corner."""

    width: int
    height: int
    new_width: int
    new_height: int
    left: int
    top: int


@dataclass(frozen=True)
class _BoxReduced:
    """An image after an integer box reduction, and where the original image's edges fall in it."""

    image: Image.Image
    box: tuple[float, float, float, float]


class ImagePreprocessor:
    """Equal to transformers' CLIPImageProcessor (within 1e-5) on fully decoded images, plus EXIF orientation.

    `draft_factor`: decode large JPEGs at a reduced DCT scale keeping the shortest side at least
    `draft_factor * size`, and shrink any other large image by an integer box reduction first (down to
    BOX_REDUCTION_GAP times the target); None decodes and resizes every image in full, exactly as the reference.
    """

    def __init__(
        self,
        config: PreprocessConfig,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_factor: float | None = DEFAULT_DRAFT_FACTOR,
    ) -> None:
        self.config = config
        self.max_pixels = max_pixels
        self.draft_factor = draft_factor
        self._resample = RESAMPLE_FILTERS[config.resample]
        # out = pixel * scale + offset == (pixel * rescale_factor - mean) / std, per channel
        std = np.asarray(config.std, dtype=np.float64)
        self._scale = (config.rescale_factor / std).astype(np.float32)
        self._offset = (-np.asarray(config.mean, dtype=np.float64) / std).astype(np.float32)

    def prepare(self, source: bytes | Path, name: str, thumbnail_side: int | None = None) -> PreparedImage:
        """Raise InvalidImage (ImageTooLarge for size limits) naming `name` and the reason.

        `thumbnail_side`: also make a WebP thumbnail of that longest side from the image decoded here (a
        drafted JPEG keeps that longest side) and from the box reduction the model's input starts from, so
        ingestion decodes each image once and walks a large one in full once.
        """
        thumbnail = None
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                self._check_size(image, name)
                width, height = image.size
                orientation = image.getexif().get(ORIENTATION_TAG, 1)
                self._draft(image, thumbnail_side or 0)
                if orientation in TRANSPOSING_ORIENTATIONS:
                    image = ImageOps.exif_transpose(image)
                    if orientation in SWAPPING_ORIENTATIONS:
                        width, height = height, width
                converted = _to_l_or_rgb(image)
                target = self._target(*converted.size)
                reduced = self._box_reduced(converted, target) if thumbnail_side else None
                if thumbnail_side:
                    thumbnail = _thumbnail(image, reduced.image if reduced else converted, thumbnail_side, name)
                cropped = self._resize_and_crop(converted, target, reduced).convert("RGB")
        except InvalidImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageTooLarge(name, f"decompression bomb refused by Pillow ({error})") from error
        except Image.UnidentifiedImageError as error:
            raise InvalidImage(name, "not a recognizable image format") from error
        except FileNotFoundError as error:
            raise InvalidImage(name, f"file not found ({error})") from error
        except Exception as error:  # Pillow's decoders raise many types (OSError, ValueError, SyntaxError, ...)
            raise InvalidImage(name, f"corrupt or truncated image ({type(error).__name__}: {error})") from error
        return PreparedImage(self._normalize(cropped), width, height, thumbnail)

    def _check_size(self, image: Image.Image, name: str) -> None:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidImage(name, f"zero-size image ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageTooLarge(name, f"{width}x{height} is over the limit of {self.max_pixels} pixels")

    def _draft(self, image: Image.Image, thumbnail_side: int) -> None:
        """The shortest side stays at least `draft_factor` times the model's input and the longest at least the
        thumbnail's, so the thumbnail needs no other decoding. JPEG scales are 1/2, 1/4 and 1/8: a photo is
        drafted only when both sides are at least twice what they must keep."""
        if self.draft_factor is None or image.format != "JPEG":
            return
        shortest = math.ceil(self.draft_factor * self.config.size)
        longest = max(shortest, thumbnail_side)
        wanted = (longest, shortest) if image.width >= image.height else (shortest, longest)
        if image.width >= 2 * wanted[0] and image.height >= 2 * wanted[1]:
            image.draft(None, wanted)

    def _target(self, width: int, height: int) -> _ResizeTarget:
        size, crop = self.config.size, self.config.crop_size
        # As transformers' get_resize_output_image_size(default_to_square=False): the long side is floored.
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        return _ResizeTarget(width, height, new_width, new_height, (new_width - crop) // 2, (new_height - crop) // 2)

    def _box_reduced(self, image: Image.Image, target: _ResizeTarget) -> _BoxReduced | None:
        """The integer box reduction that the model's resize makes first (Pillow's `reducing_gap`), made here
        once so that the thumbnail starts from it too: a large PNG or WebP is then walked in full only once."""
        if self.draft_factor is None or max(target.new_width, target.new_height) > MAX_RESIZED_ASPECT * self.config.size:
            return None
        factor_x = int(target.width / target.new_width / BOX_REDUCTION_GAP) or 1
        factor_y = int(target.height / target.new_height / BOX_REDUCTION_GAP) or 1
        if factor_x == factor_y == 1:
            return None
        return _BoxReduced(image.reduce((factor_x, factor_y)),
                           (0.0, 0.0, target.width / factor_x, target.height / factor_y))

    def _resize_and_crop(self, image: Image.Image, target: _ResizeTarget,
                         reduced: _BoxReduced | None = None) -> Image.Image:
        crop = self.config.crop_size
        left, top = target.left, target.top
        if reduced is not None:  # the same pixels as Pillow's own reduction inside resize(reducing_gap=...)
            resized = reduced.image.resize((target.new_width, target.new_height), self._resample, box=reduced.box)
            return resized.crop((left, top, left + crop, top + crop))
        if max(target.new_width, target.new_height) <= MAX_RESIZED_ASPECT * self.config.size:
            # reducing_gap: an integer box reduction (Image.reduce) first, while the result stays at least
            # BOX_REDUCTION_GAP times the target; a JPEG already drafted below that is not reduced again.
            gap = None if self.draft_factor is None else BOX_REDUCTION_GAP
            resized = image.resize((target.new_width, target.new_height), self._resample, reducing_gap=gap)
            return resized.crop((left, top, left + crop, top + crop))
        # Past MAX_RESIZED_ASPECT, resize only the cropped window (see the constant).
        x_scale, y_scale = target.width / target.new_width, target.height / target.new_height
        window = (left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale)
        return image.resize((crop, crop), self._resample, box=window)

    def _normalize(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image, dtype=np.float32) * self._scale + self._offset
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _thumbnail(upright: Image.Image, converted: Image.Image, longest_side: int, name: str) -> bytes | None:
    """From the 8-bit L/RGB image the encoder uses, or the original when it has transparency to keep.

    A preview that cannot be made is logged and left out: it is not worth failing the image's embedding.
    """
    has_alpha = "A" in upright.getbands() or (upright.mode == "P" and "transparency" in upright.info)
    try:
        return thumbnail_webp(upright.convert("RGBA") if has_alpha else converted, longest_side)
    except Exception as error:  # Pillow's encoders raise many types
        log.warning("no thumbnail for %r: %s: %s", name, type(error).__name__, error)
        return None


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Image.convert("RGB") as the reference does, but grayscale stays one band until after the resize.

    The filters treat bands alike, so resizing L and then converting equals converting first, with one
    byte per pixel instead of three. 16-bit samples are scaled to 8 bits (a plain conversion clips them).
    """
    if image.mode in ("RGB", "L"):
        return image
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.getextrema()[1] > 255):
        return _sixteen_bit_to_l(image)
    return image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Rounds sample / 257 into an L image a strip of rows at a time: one byte per pixel beside Pillow's two.

    Converting the whole image at once made int64 copies: a 79 MP 16-bit PNG cost +1.4 GB and 4 s CPU.
    """
    width, height = image.size
    eight_bit = np.empty((height, width), dtype=np.uint8)
    rows = max(1, SIXTEEN_BIT_STRIP_PIXELS // width)
    for top in range(0, height, rows):
        strip = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        samples = np.clip(strip, 0, 65535).astype(np.uint32)
        eight_bit[top : top + rows] = (samples + 128) // 257
    return Image.fromarray(eight_bit, "L")
