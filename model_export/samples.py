"""Sample inputs the export checks itself on: varied texts as token ids, synthetic and real images as pixels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tokenizers import Tokenizer
from transformers import CLIPImageProcessor

from model_export.checkpoint import RESAMPLE_FILTERS

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
END_OF_TEXT = "<|endoftext|>"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
# Enough for ~200+ vectors in the neighbour check (each photo also gives a crop) at a bounded cost.
MAX_PHOTOS = 150

SAMPLE_TEXTS = (
    "a photo of a cat",
    "",
    "A DOG running on the beach at sunset!!!",
    "two people riding bicycles past a red-brick building in the rain",
    "Über café naïve façade — déjà vu",
    "東京の夜景 and a neon sign",
    "🐱🐶 emoji only 🚀",
    "price: $1,299.99 (20% off) #deal @store",
    "<|endoftext|> a literal end-of-text marker",
    "don't can't won't it's we're",
    "snow " * 40,
    "an aerial view of a mountain lake surrounded by pine trees, with a small wooden cabin on the shore, "
    "mist rising over the water in the early morning light, and a single canoe drifting near the dock",
)


@dataclass(frozen=True)
class TextSamples:
    """Each text's token ids at its true length, and all of them padded to the context length."""

    token_ids: list[np.ndarray]
    padded: np.ndarray


@dataclass(frozen=True)
class ImageSamples:
    """Pixel tensors [n, 3, size, size] and how many of each kind they hold."""

    pixel_values: np.ndarray
    counts: dict[str, int]


def text_samples(tokenizer_json: str) -> TextSamples:
    """Tokenize the sample texts with the tokenizer being published, cut at the context as CLIP does."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    token_ids = []
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text).ids
        if len(ids) > CONTEXT_LENGTH:
            ids = [*ids[: CONTEXT_LENGTH - 1], end_of_text]
        token_ids.append(np.asarray(ids, dtype=np.int64))
    padded = np.zeros((len(token_ids), CONTEXT_LENGTH), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        padded[row, : len(ids)] = ids
    return TextSamples(token_ids=token_ids, padded=padded)


def image_samples(preprocess: dict[str, Any], photo_dir: Path | None, seed: int = 0) -> ImageSamples:
    """Random tensors, structured synthetic images, and (when the folder exists) photos plus a crop of each."""
    rng = np.random.default_rng(seed)
    size = preprocess["crop_size"]
    random_pixels = rng.standard_normal((4, 3, size, size)).astype(np.float32)
    structured = _normalize(_structured_images(size, rng), preprocess)
    parts = {"random": random_pixels, "structured": structured}
    processor = _image_processor(preprocess)
    originals, crops = [], []
    for path in _photo_paths(photo_dir):
        # Keep only the preprocessed pixels: a folder of camera photos would not fit in memory decoded.
        try:
            with Image.open(path) as photo:
                image = ImageOps.exif_transpose(photo).convert("RGB")
        except OSError as error:
            log.warning("skipping sample photo %s: %s", path, error)
            continue
        originals.append(processor(images=image, return_tensors="np")["pixel_values"])
        crops.append(processor(images=_random_crop(image, rng), return_tensors="np")["pixel_values"])
    if originals:
        parts["photos"] = np.concatenate(originals).astype(np.float32)
        parts["photo_crops"] = np.concatenate(crops).astype(np.float32)
    elif photo_dir is not None:
        log.warning("no readable photos under %s: checking on synthetic images only", photo_dir)
    counts = {kind: len(pixels) for kind, pixels in parts.items()}
    return ImageSamples(pixel_values=np.concatenate(list(parts.values())), counts=counts)


def _structured_images(size: int, rng: np.random.Generator, count: int = 60) -> np.ndarray:
    """Gradients, checkerboards, stripes, flat colours and smooth noise fields, as RGB in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    images = []
    for index in range(count):
        colour_a, colour_b = rng.random(3), rng.random(3)
        kind = index % 5
        if kind == 0:
            angle = rng.uniform(0, np.pi)
            mix = np.clip(np.cos(angle) * x + np.sin(angle) * y, 0, 1)
        elif kind == 1:
            period = int(rng.integers(4, 64))
            mix = ((np.floor(x * size / period) + np.floor(y * size / period)) % 2).astype(np.float32)
        elif kind == 2:
            mix = (np.sin(2 * np.pi * rng.uniform(1, 20) * (x + rng.uniform(0, 1) * y)) + 1) / 2
        elif kind == 3:
            mix = np.zeros_like(x)
        else:
            coarse = rng.random((8, 8)).astype(np.float32)
            mix = (
                np.asarray(
                    Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
                    dtype=np.float32,
                )
                / 255
            )
        images.append(mix[None] * colour_a[:, None, None] + (1 - mix[None]) * colour_b[:, None, None])
    return np.stack(images).astype(np.float32)


def _normalize(rgb: np.ndarray, preprocess: dict[str, Any]) -> np.ndarray:
    mean = np.asarray(preprocess["mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(preprocess["std"], dtype=np.float32)[None, :, None, None]
    return ((rgb - mean) / std).astype(np.float32)


def _image_processor(preprocess: dict[str, Any]) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": preprocess["size"]},
        crop_size={"height": preprocess["crop_size"], "width": preprocess["crop_size"]},
        image_mean=preprocess["mean"],
        image_std=preprocess["std"],
        resample=RESAMPLE_FILTERS[preprocess["resample"]],
        rescale_factor=preprocess["rescale_factor"],
    )


def _random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    # An augmented view close to its original, so the neighbour lists have real near-duplicates to find.
    scale = rng.uniform(0.5, 0.9)
    width, height = int(image.width * scale), int(image.height * scale)
    left = int(rng.integers(0, image.width - width + 1))
    top = int(rng.integers(0, image.height - height + 1))
    return image.crop((left, top, left + width, top + height))


def _photo_paths(photo_dir: Path | None) -> list[Path]:
    if photo_dir is None or not photo_dir.is_dir():
        return []
    return sorted(path for path in photo_dir.rglob("*") if path.suffix.lower() in PHOTO_SUFFIXES)[:MAX_PHOTOS]
