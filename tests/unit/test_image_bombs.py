"""Decompression bombs and huge images: each refused as too large, or prepared within a memory ceiling.

The files are generated (each under 1 MiB, standing for up to 4 gigapixels). Each is prepared in one child
process that resets its peak-RSS mark before every file, so a figure is that file's own peak.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import CLIP_PREPROCESS

pytestmark = pytest.mark.unit

MiB = 1 << 20

# The child: prepares every file named on stdin and prints, per file, its outcome and its peak growth.
CHILD = r"""
import json, sys
from pathlib import Path
from clipsearch.errors import ImageTooLarge, InvalidImage
from clipsearch.images import ImagePreprocessor, PreprocessConfig

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

request = json.load(sys.stdin)
preprocessor = ImagePreprocessor(PreprocessConfig.from_dict(request["config"]))
results = {}
for path in request["paths"]:
    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status("VmRSS:")
    try:
        preprocessor.prepare(data, Path(path).name)
        outcome = "prepared"
    except ImageTooLarge as error:
        outcome = "too large: " + str(error)
    except InvalidImage as error:
        outcome = "invalid: " + str(error)
    results[Path(path).name] = {"outcome": outcome, "peak_growth": status("VmHWM:") - before}
print(json.dumps(results))
"""


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def blank_png(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A complete, valid PNG of zero samples, compressed row by row: a few KiB for hundreds of megapixels."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = bytes(1 + (width * channels * bit_depth + 7) // 8)  # filter byte 0, then zero samples
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif(screen: tuple[int, int], frames: list[tuple[int, int]]) -> bytes:
    """A GIF whose logical screen and frames declare the given sizes, each frame one LZW-coded pixel."""
    palette = bytes(6)  # two black entries
    data = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + palette
    for width, height in frames:
        data += b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control: no disposal, no delay
        data += b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        data += b"\x02\x02\x44\x01\x00"  # LZW minimum code size 2, one sub-block: clear, 0, end
    return data + b";"


def deep_gray_png(width: int, height: int) -> bytes:
    """A 16-bit grayscale PNG of thin lines: ~0.2 KiB per megapixel, decoded as Pillow's I;16."""
    samples = np.zeros((height, width), dtype=np.uint16)
    samples[::97, :] = 40_000
    samples[:, ::89] = 1_000
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def bilevel_tiff(pages: list[tuple[int, int]]) -> bytes:
    """An uncompressed bilevel TIFF, one IFD per page, each page's strip of zeros cut to 512 bytes."""
    strip = bytes(512)
    data = b"II*\x00" + struct.pack("<I", 8)
    for index, (width, height) in enumerate(pages):
        ifd_at = len(data)
        entries = [(256, 4, width), (257, 4, height), (258, 3, 1), (259, 3, 1), (262, 3, 0),
                   (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
        strip_at = ifd_at + 2 + 12 * len(entries) + 4
        next_ifd = strip_at + len(strip) if index + 1 < len(pages) else 0
        data += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            value = strip_at if tag == 273 else value
            data += struct.pack("<HHI", tag, kind, 1) + struct.pack("<HH" if kind == 3 else "<I", *(
                (value, 0) if kind == 3 else (value,)))
        data += struct.pack("<I", next_ifd) + strip
    return data


def webp_header(width: int, height: int) -> bytes:
    """A lossless WebP that declares `width` x `height` and holds no image data."""
    bits = (width - 1) | (height - 1) << 14
    body = b"\x2f" + struct.pack("<I", bits) + bytes(16)
    vp8l = b"VP8L" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(vp8l)) + b"WEBP" + vp8l


def prepare_in_child(files: dict[str, bytes], directory: Path) -> dict[str, dict]:
    paths = []
    for name, data in files.items():
        (directory / name).write_bytes(data)
        paths.append(str(directory / name))
    request = json.dumps({"config": CLIP_PREPROCESS, "paths": paths})
    completed = subprocess.run(
        [sys.executable, "-c", CHILD], input=request, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(completed.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_bombs_are_refused_and_huge_images_stay_within_a_memory_ceiling(tmp_path: Path) -> None:
    files = {
        "deep-16mp.png": deep_gray_png(4000, 4000),
        "bilevel-81mp.png": blank_png(9000, 9000),
        "bilevel-400mp.png": blank_png(20_000, 20_000),
        "gif-screen-900mp.gif": gif((30_000, 30_000), [(1, 1)]),
        "gif-frames-4gp.gif": gif((64, 64), [(1, 1)] + [(65_535, 65_535)] * 200),
        "tiff-huge-second-page.tif": bilevel_tiff([(64, 64), (60_000, 60_000)]),
        "tiff-huge-first-page.tif": bilevel_tiff([(9000, 9000), (64, 64)]),
        "webp-268mp.webp": webp_header(16_383, 16_383),
    }
    assert max(len(data) for data in files.values()) < MiB
    results = prepare_in_child(files, tmp_path)
    outcomes = {name: result["outcome"] for name, result in results.items()}

    too_large = ["bilevel-81mp.png", "bilevel-400mp.png", "gif-screen-900mp.gif",
                 "tiff-huge-first-page.tif", "webp-268mp.webp"]
    for name in too_large:
        assert outcomes[name].startswith(f"too large: {name}: "), outcomes[name]
    for name in ("deep-16mp.png", "gif-frames-4gp.gif", "tiff-huge-second-page.tif"):
        assert outcomes[name] == "prepared", outcomes[name]

    # 16 MP of 16-bit samples: Pillow's decoded image (2 bytes per pixel) and the 8-bit copy (1 byte);
    # the whole-image int64 conversion this replaced peaked near 18 bytes per pixel.
    assert results["deep-16mp.png"]["peak_growth"] < 16e6 * 3 + 32 * MiB
    for name in (*too_large, "gif-frames-4gp.gif", "tiff-huge-second-page.tif"):
        assert results[name]["peak_growth"] < 32 * MiB, (name, results[name])
