"""Small WebP previews of ingested images, stored under thumbnails/<dataset>/<relative path>.webp."""

from __future__ import annotations

import io

from PIL import Image

from clipsearch.datasets import thumbnail_key

__all__ = ["LONGEST_SIDE", "THUMBNAIL_CONTENT_TYPE", "thumbnail_key", "thumbnail_webp"]

THUMBNAIL_CONTENT_TYPE = "image/webp"
LONGEST_SIDE = 320
# WebP quality 75 (Pillow's default) at method 0, the fastest: encoding is most of a thumbnail's cost.
# On seed-eval photos (CPU per image): method 0 2.3 ms, median 12.6 KiB; method 2 4.7 ms, 10.5 KiB;
# method 4 7.3 ms, 10.1 KiB.
WEBP_QUALITY = 75
# Image.thumbnail's own filter. Prepare + thumbnail of a 0.1-0.5 MP photo, CPU per image (loaded machine, one
# run): LANCZOS 15.0 ms, BICUBIC 13.0, BILINEAR 11.6, no thumbnail 6.5.
RESAMPLE = Image.Resampling.BICUBIC
WEBP_METHOD = 0


def thumbnail_webp(upright: Image.Image, longest_side: int = LONGEST_SIDE) -> bytes:
    """`upright` (L, RGB or RGBA, turned by its EXIF orientation) shrunk to `longest_side`, never enlarged.

    The image preprocessor calls this with the image it has just decoded for the encoder (a JPEG drafted no
    smaller than `longest_side`, a large image after the box reduction its model input starts from), so no
    image is decoded twice.
    """
    width, height = upright.size
    scale = longest_side / max(width, height)
    preview = upright
    if scale < 1:
        # reducing_gap: an integer box reduction first, as Image.thumbnail does, without copying the original
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        preview = upright.resize(size, RESAMPLE, reducing_gap=2.0)
    if preview.mode not in ("RGB", "RGBA"):
        preview = preview.convert("RGB")
    out = io.BytesIO()
    preview.save(out, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    return out.getvalue()
