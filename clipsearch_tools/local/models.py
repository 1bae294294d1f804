"""The model the local stack serves: exported once into the stack home, published to models/<model-id>/."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from clipsearch.datasets import model_prefix
from clipsearch.errors import ClipsearchError, ModelFilesInvalid
from clipsearch.model_files import MANIFEST, ModelFiles
from clipsearch.ports import ObjectStore

logger = logging.getLogger(__name__)

REAL_CHECKPOINT = "openai/clip-vit-base-patch32"
# Trained here on coloured shapes (model_export/train_small_clip.py): semantic offline, but only for such images.
SMALL_CLIP_CHECKPOINT = Path(__file__).resolve().parents[2] / "model_export" / "small_clip"
SMALL_CLIP_QUANTIZATION = "none"
# huggingface_hub logs every retry of an unreachable download; the exporter's own last line says it all.
_DOWNLOAD_RETRY_NOISE = ("Retrying in", "thrown while requesting")
_HUB_ENDPOINT = "https://huggingface.co"  # huggingface_hub's default; HF_ENDPOINT overrides it there and here
_HUB_PROBE_SECONDS = 3


class ModelExportFailed(ClipsearchError):
    """`python -m model_export` did not produce a model directory."""


@dataclass(frozen=True)
class ModelInfo:
    directory: Path
    model_id: str
    random_weights: bool
    source: str


def read_model(directory: Path) -> ModelInfo:
    """A model directory's identity; raises ModelFilesInvalid when it is not one."""
    files = ModelFiles.open(directory)
    manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    return ModelInfo(Path(directory), files.model_id, bool(manifest.get("random_weights")), str(manifest.get("source", "")))


def run_exporter(arguments: list[str], out: Path, progress: TextIO, offline: bool = False) -> None:
    """Runs the exporter, copying its progress lines (without download-retry chatter) to `progress`.

    `offline` lets the exporter use only checkpoints already in the Hugging Face cache.
    """
    command = [sys.executable, "-m", "model_export", *arguments, "--out", str(out)]
    logger.info("exporting the model: python %s", " ".join(command[1:]))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"} if offline else None
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=progress, stderr=subprocess.PIPE, text=True,
                               env=environment)
    for line in process.stderr:
        if not any(noise in line for noise in _DOWNLOAD_RETRY_NOISE):
            progress.write(line)
    if process.wait() != 0:
        raise ModelExportFailed(f"model export failed (exit {process.returncode}): {' '.join(arguments)}")


def ensure_default_model(models_dir: Path, progress: TextIO) -> ModelInfo:
    """The model exported in `models_dir`; else exports the real checkpoint, or offline the small shapes CLIP."""
    for candidate in sorted(models_dir.glob("*/")):
        try:
            return read_model(candidate)
        except ModelFilesInvalid:
            continue
    real = models_dir / "clip-vit-base-patch32"
    offline = not hub_reachable()
    if offline:
        logger.info("the model hub is unreachable: looking for %s in the local cache only", REAL_CHECKPOINT)
    try:
        run_exporter(["--model", REAL_CHECKPOINT], real, progress, offline=offline)
        return read_model(real)
    except ModelExportFailed:
        logger.warning("could not export %s: exporting the small CLIP trained here on coloured shapes "
                       "(%s) instead: search is semantic only for images of simple coloured shapes",
                       REAL_CHECKPOINT, SMALL_CLIP_CHECKPOINT)
    return export_small_clip(models_dir, progress)


def export_small_clip(models_dir: Path, progress: TextIO) -> ModelInfo:
    """Exports the shipped small shapes CLIP by the same `python -m model_export --model DIR` path as any checkpoint."""
    suffix = "-int8" if SMALL_CLIP_QUANTIZATION == "int8" else ""
    out = models_dir / f"{SMALL_CLIP_CHECKPOINT.name}{suffix}"
    run_exporter(["--model", str(SMALL_CLIP_CHECKPOINT), "--quantize", SMALL_CLIP_QUANTIZATION, "--force"], out, progress)
    return read_model(out)


def hub_reachable(timeout: float = _HUB_PROBE_SECONDS) -> bool:
    """Whether the model hub answers at all (any HTTP status) within `timeout` seconds.

    Unreachable, a download would only fail after about half a minute of retries.
    """
    endpoint = os.environ.get("HF_ENDPOINT") or _HUB_ENDPOINT
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def publish_model(store: ObjectStore, model: ModelInfo) -> int:
    """Uploads the model directory under models/<model-id>/, manifest last; returns the files uploaded.

    Files already there with the same content are left alone; the manifest goes last so a reader
    that finds it also finds every file it lists.
    """
    prefix = model_prefix(model.model_id)
    present = {item.key: item.etag for item in store.list(prefix)}
    files = sorted(
        (path for path in model.directory.rglob("*") if path.is_file() and not path.name.startswith(".")),
        key=lambda path: path.name == MANIFEST,
    )
    uploaded = 0
    for path in files:
        key = prefix + path.relative_to(model.directory).as_posix()
        data = path.read_bytes()
        if present.get(key) == hashlib.md5(data).hexdigest():
            continue
        store.put(key, data)
        uploaded += 1
    logger.info("model %s published under %s (%d files uploaded)", model.model_id, prefix, uploaded)
    return uploaded
