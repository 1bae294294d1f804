"""Small WebP previews of ingested images, stored under thumbnails/<dataset>/<relative path>.webp."""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from clipsearch.datasets import thumbnail_key

__all__ = ["THUMBNAIL_CONTENT_TYPE", "make_thumbnail", "thumbnail_key"]

THUMBNAIL_CONTENT_TYPE = "image/webp"
LONGEST_SIDE = 320
# WebP quality 75 (Pillow's default) at method 2: a 320 px preview of a photo is ~10-20 KB; higher
# methods compress a little better at several times the encoding cost per image.
WEBP_QUALITY = 75
WEBP_METHOD = 2


def make_thumbnail(data: bytes, longest_side: int = LONGEST_SIDE) -> bytes:
    """The image turned upright by its EXIF orientation and shrunk to `longest_side` (never enlarged), as WebP.

    Raises whatever Pillow raises for an undecodable image: ingestion has already decoded it for the
    encoder, so that is rare, and the caller treats it as "no thumbnail".
    """
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (longest_side * 2, longest_side * 2))  # JPEG DCT scaling: decode less
        upright = ImageOps.exif_transpose(image)
        upright.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
        if upright.mode not in ("RGB", "RGBA"):
            upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
        out = io.BytesIO()
        upright.save(out, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    return out.getvalue()
