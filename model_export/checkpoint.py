"""Obtain what an export starts from: a PyTorch CLIPModel, its tokenizer.json and its preprocessing config."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

from model_export import clip_vocab
from model_export.errors import CheckpointNotClip, CheckpointUnavailable, ExportError
from model_export.options import RANDOM_ARCHITECTURES

log = logging.getLogger(__name__)

# PIL resampling filter codes, as CLIPImageProcessor stores them.
RESAMPLE_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded CLIP model and the files that travel with it; `model_id` is the path-safe slug."""

    model: CLIPModel
    tokenizer_json: str
    preprocess: dict[str, Any]
    model_id: str
    source: str
    random_weights: bool


def load_checkpoint(model: str) -> Checkpoint:
    """Load a CLIP checkpoint from a local directory or a Hugging Face model id."""
    local = Path(model).is_dir()
    source = str(Path(model).resolve()) if local else model
    # Without config.json transformers guesses the model type from the folder name ("empty" -> "mpt").
    if local and not (Path(source) / "config.json").is_file():
        raise CheckpointNotClip(model, "the directory has no config.json")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        if local:
            raise CheckpointNotClip(model, f"no readable config.json ({_first_line(error)})") from error
        raise CheckpointUnavailable(model, _first_line(error)) from error
    if config.model_type != "clip":
        raise CheckpointNotClip(model, f"its config has model_type {config.model_type!r}, expected 'clip'")
    log.info("loading CLIP weights from %s", source)
    try:
        clip = CLIPModel.from_pretrained(source, dtype=torch.float32).eval()
    except OSError as error:
        if local:
            raise CheckpointNotClip(model, f"no loadable CLIP weights ({_first_line(error)})") from error
        raise CheckpointUnavailable(model, _first_line(error)) from error
    try:
        tokenizer = CLIPTokenizerFast.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CheckpointNotClip(model, f"no CLIP tokenizer files ({_first_line(error)})") from error
    try:
        image_processor = CLIPImageProcessor.from_pretrained(source)
    except OSError:
        log.warning("%s has no preprocessor config: using CLIP's default preprocessing", model)
        image_processor = CLIPImageProcessor()
    revision = getattr(config, "_commit_hash", None)
    return Checkpoint(
        model=clip,
        tokenizer_json=clip_vocab.normalize_tokenizer_json(tokenizer.backend_tokenizer.to_str()),
        preprocess=preprocess_config(image_processor),
        model_id=_slug(Path(model.rstrip("/")).name),
        source=f"{source}@{revision}" if revision and not local else source,
        random_weights=False,
    )


def build_random_checkpoint(architecture: str, seed: int) -> Checkpoint:
    """Build a random-weight CLIP of a known architecture, with the real CLIP vocabulary."""
    if architecture not in RANDOM_ARCHITECTURES:
        raise ExportError(f"unknown random architecture {architecture!r}: choose one of {RANDOM_ARCHITECTURES}")
    torch.manual_seed(seed)
    clip = CLIPModel(_random_config(architecture)).eval()
    return Checkpoint(
        model=clip,
        tokenizer_json=clip_vocab.build_tokenizer_json(),
        preprocess=preprocess_config(CLIPImageProcessor()),
        model_id=f"random-{architecture}-seed{seed}",
        source=f"random:{architecture}:seed={seed}",
        random_weights=True,
    )


def preprocess_config(image_processor: CLIPImageProcessor) -> dict[str, Any]:
    """The runtime's preprocess.json: resize the shortest side, centre-crop a square, rescale, normalize."""
    size = image_processor.size.get("shortest_edge")
    crop = image_processor.crop_size
    if size is None or crop["height"] != crop["width"]:
        raise ExportError(
            f"unsupported image preprocessing (size {image_processor.size}, crop {crop}): "
            "expected a shortest-edge resize and a square crop"
        )
    return {
        "size": int(size),
        "crop_size": int(crop["height"]),
        "mean": [float(value) for value in image_processor.image_mean],
        "std": [float(value) for value in image_processor.image_std],
        "resample": _resample_name(int(image_processor.resample)),
        "rescale_factor": float(image_processor.rescale_factor),
    }


def _random_config(architecture: str) -> CLIPConfig:
    if architecture == "vit-b-32":
        return CLIPConfig()
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
    return CLIPConfig(
        text_config={**tower, "vocab_size": 49408},
        vision_config={**tower, "image_size": 224, "patch_size": 32},
        projection_dim=32,
    )


def _resample_name(code: int) -> str:
    return next(name for name, filter_code in RESAMPLE_FILTERS.items() if filter_code == code)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
