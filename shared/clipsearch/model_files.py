"""A model directory (written by model_export): its manifest, file checksums, and the config it carries."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from clipsearch.errors import ModelFilesInvalid

if TYPE_CHECKING:  # Pillow, tokenizers and ftfy load only when used: a cold search function fetches first
    from clipsearch.images import PreprocessConfig
    from clipsearch.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

MODEL_FORMAT = "clipsearch-model/1"
MANIFEST = "manifest.json"
TEXT_GRAPH = "text/model.onnx"
VISION_GRAPH = "vision/model.onnx"
TOKENIZER = "tokenizer.json"
PREPROCESS = "preprocess.json"
VERIFIED_MARKER = ".verified.json"
_marker_lock = threading.Lock()  # the marker's read-merge-write, for threads verifying different files
QUANTIZATIONS = ("none", "int8")
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelFiles:
    """A validated manifest; `verify` checks file checksums only for the files a caller is about to use."""

    directory: Path
    model_id: str
    embedding_dim: int
    context_length: int
    quantization: str
    checksums: dict[str, str]
    manifest_sha256: str

    @classmethod
    def open(cls, directory: Path | str) -> ModelFiles:
        directory = Path(directory)
        try:
            raw = (directory / MANIFEST).read_bytes()
            manifest = json.loads(raw)
        except (OSError, ValueError) as error:
            raise ModelFilesInvalid(f"{directory / MANIFEST}: unreadable ({error})") from error
        return cls(
            directory=directory,
            model_id=_field(manifest, "model_id", str, lambda value: bool(MODEL_ID.match(value))),
            embedding_dim=_field(manifest, "embedding_dim", int, lambda value: value > 0),
            context_length=_field(manifest, "context_length", int, lambda value: value >= 3),
            quantization=_field(manifest, "quantization", str, lambda value: value in QUANTIZATIONS),
            checksums=_checksums(manifest, directory),
            manifest_sha256=hashlib.sha256(raw).hexdigest(),
        )

    @property
    def text_graph(self) -> Path:
        return self.directory / TEXT_GRAPH

    @property
    def vision_graph(self) -> Path:
        return self.directory / VISION_GRAPH

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER

    @property
    def preprocess_path(self) -> Path:
        return self.directory / PREPROCESS

    def tokenizer(self) -> ClipTokenizer:
        self.verify([TOKENIZER])
        from clipsearch.tokenizer import ClipTokenizer

        return ClipTokenizer.from_file(self.tokenizer_path, self.context_length)

    def preprocess(self) -> PreprocessConfig:
        from clipsearch.images import PreprocessConfig

        self.verify([PREPROCESS])
        try:
            return PreprocessConfig.from_dict(json.loads(self.preprocess_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelFilesInvalid(f"{self.preprocess_path}: invalid ({error})") from error

    def verify(self, relative_paths: list[str] | None = None) -> None:
        """Check sha256 of the named files (all when None), skipping files already verified unchanged.

        The marker records each verified file's size and mtime under this manifest's hash, so a warm
        start costs a stat per file instead of hashing hundreds of megabytes.
        """
        names = sorted(self.checksums) if relative_paths is None else relative_paths
        marker = self._read_marker()
        newly_verified = {}
        for name in names:
            if name not in self.checksums:
                raise ModelFilesInvalid(f"{self.directory}: {name} is not listed in {MANIFEST}")
            path = self.directory / name
            try:
                stat = path.stat()
            except OSError as error:
                raise ModelFilesInvalid(f"{path}: missing ({error})") from error
            fingerprint = [stat.st_size, stat.st_mtime_ns]
            if marker.get(name) == fingerprint:
                continue
            if file_sha256(path) != self.checksums[name]:
                raise ModelFilesInvalid(f"{path}: sha256 does not match {MANIFEST}")
            newly_verified[name] = fingerprint
        if newly_verified:
            with _marker_lock:  # read again: another thread may have recorded other files meanwhile
                self._write_marker({**self._read_marker(), **newly_verified})

    def _read_marker(self) -> dict[str, list[int]]:
        try:
            marker = json.loads((self.directory / VERIFIED_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(marker, dict) or marker.get("manifest_sha256") != self.manifest_sha256:
            return {}
        files = marker.get("files")
        return files if isinstance(files, dict) else {}

    def _write_marker(self, files: dict[str, list[int]]) -> None:
        target = self.directory / VERIFIED_MARKER
        staging = target.with_name(f"{VERIFIED_MARKER}.{os.getpid()}.tmp")
        try:
            staging.write_text(json.dumps({"manifest_sha256": self.manifest_sha256, "files": files}), encoding="utf-8")
            staging.replace(target)
        except OSError as error:
            # A read-only model directory still works; it is just verified again on the next cold start.
            log.warning("cannot record verified files in %s: %s", target, error)


def _field(manifest: Any, key: str, kind: type, valid: Any) -> Any:
    value = manifest.get(key) if isinstance(manifest, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) or not valid(value):
        raise ModelFilesInvalid(f"{MANIFEST}: invalid {key} {value!r}")
    return value


def _checksums(manifest: dict[str, Any], directory: Path) -> dict[str, str]:
    files = manifest.get("files")
    if manifest.get("format") != MODEL_FORMAT:
        raise ModelFilesInvalid(f"{directory / MANIFEST}: format {manifest.get('format')!r} is not {MODEL_FORMAT}")
    if not isinstance(files, dict):
        raise ModelFilesInvalid(f"{directory / MANIFEST}: no files")
    for name, digest in files.items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise ModelFilesInvalid(f"{directory / MANIFEST}: invalid entry {name!r}: {digest!r}")
    missing = [name for name in (TEXT_GRAPH, VISION_GRAPH, TOKENIZER, PREPROCESS) if name not in files]
    if missing:
        raise ModelFilesInvalid(f"{directory / MANIFEST}: files {missing} are not listed")
    return dict(files)


def file_sha256(path: Path) -> str:
    """One hashing call over the memory-mapped file, which releases the GIL throughout. `hashlib.file_digest`
    takes the GIL back for each 256 KiB it reads: the 64 MB text graph, hashed in a cold start beside the
    handler's imports, took 0.23 s for 0.05 s of hashing (benchmarks/search.py's cold start steps)."""
    with path.open("rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:  # an empty file cannot be mapped
            return hashlib.sha256().hexdigest()
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()
