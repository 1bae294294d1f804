"""Image decoding and preprocessing against transformers' CLIPImageProcessor, and bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from clipsearch.errors import ImageTooLarge, InvalidImage
from clipsearch.images import ImagePreprocessor, PreprocessConfig

pytestmark = pytest.mark.unit

CLIP_PREPROCESS = {
    "size": 224,
    "crop_size": 224,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "resample": "bicubic",
    "rescale_factor": 0.00392156862745098,
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": CLIP_PREPROCESS["size"]},
        crop_size={"height": CLIP_PREPROCESS["crop_size"], "width": CLIP_PREPROCESS["crop_size"]},
        image_mean=CLIP_PREPROCESS["mean"],
        image_std=CLIP_PREPROCESS["std"],
        resample=Image.Resampling.BICUBIC,
        rescale_factor=CLIP_PREPROCESS["rescale_factor"],
    )


@pytest.fixture(scope="module")
def preprocessor() -> ImagePreprocessor:
    return ImagePreprocessor(PreprocessConfig.from_dict(CLIP_PREPROCESS), draft_factor=None)


def reference_pixels(reference, image: Image.Image) -> np.ndarray:
    return reference(images=image, return_tensors="np", input_data_format="channels_last")["pixel_values"][0]


def encoded(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(1, height // 8) + 1, max(1, width // 8) + 1, 3), dtype=np.uint8)
    smooth = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    grain = rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(smooth, dtype=np.int64) + grain, 0, 255).astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_seed_eval_photos_match_the_reference(reference, preprocessor, seed_eval_photos: list[Path]) -> None:
    worst = 0.0
    for path in seed_eval_photos:
        prepared = preprocessor.prepare(path.read_bytes(), path.name)
        with Image.open(path) as image:
            expected = reference_pixels(reference, image)
            assert (prepared.width, prepared.height) == image.size
        assert prepared.pixel_values.shape == expected.shape == (3, 224, 224)
        assert prepared.pixel_values.dtype == np.float32
        worst = max(worst, float(np.abs(prepared.pixel_values - expected).max()))
    assert worst <= TOLERANCE


@pytest.mark.parametrize(
    "size", [(1, 1), (1, 40), (40, 1), (3, 7), (224, 224), (225, 224), (224, 225), (640, 480), (1000, 333),
             (333, 1000), (223, 3500), (5000, 313)]
)
def test_sizes_and_aspect_ratios_match_the_reference(reference, preprocessor, size: tuple[int, int]) -> None:
    image = noise(*size)
    prepared = preprocessor.prepare(encoded(image), "noise.png")
    assert np.abs(prepared.pixel_values - reference_pixels(reference, image)).max() <= TOLERANCE
    assert (prepared.width, prepared.height) == size


@pytest.mark.parametrize("size", [(1, 1000), (4000, 10)])
def test_extreme_panoramas_stay_close_to_the_reference_without_a_huge_intermediate(
    reference, preprocessor, size: tuple[int, int]
) -> None:
    image = noise(*size)
    prepared = preprocessor.prepare(encoded(image), "strip.png")
    difference = np.abs(prepared.pixel_values - reference_pixels(reference, image))
    level = CLIP_PREPROCESS["rescale_factor"] / min(CLIP_PREPROCESS["std"])
    assert difference.max() <= 6 * level
    assert difference.mean() <= 0.2 * level


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I", "F"])
def test_modes_are_converted_as_the_reference_converts_them(reference, preprocessor, mode: str) -> None:
    image = noise(300, 200, seed=1)
    if mode == "P":
        image = image.quantize(64)
        image.info["transparency"] = 0
    elif mode in ("LA", "RGBA"):
        image = image.convert(mode)
        alpha = np.asarray(noise(300, 200, seed=2).convert("L"))
        image.putalpha(Image.fromarray(alpha))
    else:
        image = image.convert(mode)
    image_format = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
    data = encoded(image, image_format)
    with Image.open(io.BytesIO(data)) as decoded:
        expected = reference_pixels(reference, decoded)
    prepared = preprocessor.prepare(data, f"{mode}.img")
    assert np.abs(prepared.pixel_values - expected).max() <= TOLERANCE


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(reference, preprocessor) -> None:
    gray = np.asarray(noise(300, 200, seed=3).convert("L"), dtype=np.uint16)
    data = encoded(Image.fromarray(gray * 257))
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode.startswith("I;16")
    prepared = preprocessor.prepare(data, "deep.png")
    expected = reference_pixels(reference, Image.fromarray(gray.astype(np.uint8), "L"))
    assert np.abs(prepared.pixel_values - expected).max() <= TOLERANCE


@pytest.mark.parametrize("orientation, displayed", [(1, (320, 180)), (3, (320, 180)), (6, (180, 320)), (8, (180, 320))])
def test_exif_orientation_is_applied_and_reported_size_is_as_displayed(
    reference, preprocessor, orientation: int, displayed: tuple[int, int]
) -> None:
    image = noise(320, 180, seed=4)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(image, "JPEG", exif=exif, quality=95)
    prepared = preprocessor.prepare(data, "rotated.jpg")
    assert (prepared.width, prepared.height) == displayed
    with Image.open(io.BytesIO(data)) as decoded:
        upright = ImageOps.exif_transpose(decoded)
    assert upright.size == displayed
    assert np.abs(prepared.pixel_values - reference_pixels(reference, upright)).max() <= TOLERANCE


def test_reads_from_a_path_as_from_bytes(preprocessor, tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded(noise(400, 300), "JPEG"))
    from_path = preprocessor.prepare(path, "photo.jpg")
    from_bytes = preprocessor.prepare(path.read_bytes(), "photo.jpg")
    assert np.array_equal(from_path.pixel_values, from_bytes.pixel_values)


def test_draft_decoding_applies_only_to_large_jpegs() -> None:
    config = PreprocessConfig.from_dict(CLIP_PREPROCESS)
    drafted, full = ImagePreprocessor(config, draft_factor=2.0), ImagePreprocessor(config, draft_factor=None)
    small = encoded(noise(640, 480), "JPEG", quality=90)
    assert np.array_equal(drafted.prepare(small, "s.jpg").pixel_values, full.prepare(small, "s.jpg").pixel_values)
    large = encoded(noise(2400, 1800), "JPEG", quality=90)
    large_drafted, large_full = drafted.prepare(large, "l.jpg"), full.prepare(large, "l.jpg")
    assert (large_drafted.width, large_drafted.height) == (2400, 1800)
    assert not np.array_equal(large_drafted.pixel_values, large_full.pixel_values)
    assert np.abs(large_drafted.pixel_values - large_full.pixel_values).mean() < 0.05


def test_large_images_of_other_formats_are_box_reduced_before_the_final_filter() -> None:
    config = PreprocessConfig.from_dict(CLIP_PREPROCESS)
    reduced, full = ImagePreprocessor(config, draft_factor=2.0), ImagePreprocessor(config, draft_factor=None)
    small = encoded(noise(800, 600), "PNG")
    assert np.array_equal(reduced.prepare(small, "s.png").pixel_values, full.prepare(small, "s.png").pixel_values)
    smooth = noise(300, 200).resize((2400, 1600), Image.Resampling.BICUBIC)
    for image_format in ("PNG", "WEBP"):
        large = encoded(smooth, image_format, **({"lossless": True} if image_format == "WEBP" else {}))
        large_reduced, large_full = reduced.prepare(large, "l"), full.prepare(large, "l")
        assert (large_reduced.width, large_reduced.height) == (2400, 1600)
        assert not np.array_equal(large_reduced.pixel_values, large_full.pixel_values)
        assert np.abs(large_reduced.pixel_values - large_full.pixel_values).mean() < 0.02


def bad_inputs(tmp_path: Path) -> dict[str, bytes | Path]:
    jpeg = encoded(noise(300, 200), "JPEG")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    return {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "header-only.jpg": jpeg[:200],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "notes.jpg": text,
        "missing.jpg": tmp_path / "missing.jpg",
        "zero-width.png": png_header_only(0, 10),
        "zero-height.gif": b"GIF89a" + struct.pack("<HH", 10, 0) + b"\x00\x00\x00;",
    }


def test_each_bad_input_raises_one_invalid_image_naming_the_file(preprocessor, tmp_path: Path) -> None:
    for name, source in bad_inputs(tmp_path).items():
        with pytest.raises(InvalidImage) as raised:
            preprocessor.prepare(source, name)
        assert raised.value.name == name
        assert raised.value.reason
        assert str(raised.value).startswith(f"{name}: ")


def test_images_over_the_pixel_limit_are_refused_before_decoding() -> None:
    limited = ImagePreprocessor(PreprocessConfig.from_dict(CLIP_PREPROCESS), max_pixels=100_000)
    with pytest.raises(ImageTooLarge, match="big.jpg: 400x300 is over the limit of 100000 pixels"):
        limited.prepare(encoded(noise(400, 300), "JPEG"), "big.jpg")
    assert limited.prepare(encoded(noise(300, 300), "JPEG"), "ok.jpg").pixel_values.shape == (3, 224, 224)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_as_too_large(preprocessor) -> None:
    with pytest.raises(ImageTooLarge, match="bomb.png"):
        preprocessor.prepare(png_header_only(10_000, 10_000), "bomb.png")
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        preprocessor.prepare(png_header_only(20_000, 20_000), "bigger-bomb.png")


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_warning_raised_as_error_is_still_too_large(preprocessor) -> None:
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        preprocessor.prepare(png_header_only(10_000, 10_000), "bomb.png")


def test_preprocess_config_rejects_a_crop_larger_than_the_resize() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        PreprocessConfig.from_dict({**CLIP_PREPROCESS, "crop_size": 256})
