"""Model directories fetched from the bucket (`models/<model-id>/`) to a local cache, once, checksums verified.

Only the files a tower needs are fetched, so a text-only function never downloads the vision graph.
Each file lands under a temporary name and is renamed into place, so a crash never leaves a
half-written file that looks complete; ModelFiles then verifies its sha256 against the manifest.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.datasets import model_prefix
from clipsearch.errors import ModelFilesInvalid, ObjectNotFound
from clipsearch.model_files import (
    MANIFEST,
    PREPROCESS,
    TEXT_GRAPH,
    TOKENIZER,
    VISION_GRAPH,
    ModelFiles,
)

if TYPE_CHECKING:
    from clipsearch.ports import ObjectStore

logger = logging.getLogger(__name__)

TEXT_TOWER_FILES = (TEXT_GRAPH, TOKENIZER)
VISION_TOWER_FILES = (VISION_GRAPH, PREPROCESS)


class ModelCache:
    """Hands out verified local model directories, downloading what is missing from the object store."""

    def __init__(self, store: ObjectStore, cache_dir: Path) -> None:
        self._store = store
        self._cache_dir = Path(cache_dir)
        self._lock = threading.Lock()  # the manifest's fetch, and the table of file locks
        self._file_locks: dict[tuple[str, str], threading.Lock] = {}

    def model_files(self, model_id: str, needed: Sequence[str]) -> ModelFiles:
        """The model directory of `model_id` with at least the files `needed` present and verified.

        Callers asking for different files fetch them at the same time; a file is fetched, checked (and,
        when corrupt, removed) by one caller at a time, so a caller never sees another's half-done work."""
        directory = self._cache_dir / model_id
        with self._lock:
            if not (directory / MANIFEST).exists():
                self._fetch(model_id, [MANIFEST], directory)
            locks = [self._file_locks.setdefault((model_id, name), threading.Lock()) for name in sorted(set(needed))]
        files = ModelFiles.open(directory)
        if files.model_id != model_id:
            raise ModelFilesInvalid(
                f"{model_prefix(model_id)}{MANIFEST} names model {files.model_id!r}, not {model_id!r}"
            )
        with ExitStack() as held:
            for lock in locks:  # always taken in name order: two callers never wait on each other's
                held.enter_context(lock)
            self._fetch(model_id, [name for name in needed if not (directory / name).exists()], directory)
            try:
                files.verify(list(needed))
            except ModelFilesInvalid:
                # A corrupt download must not poison the cache for the next attempt.
                for name in needed:
                    (directory / name).unlink(missing_ok=True)
                raise
        return files

    def _fetch(self, model_id: str, names: Sequence[str], directory: Path) -> None:
        """Each file into `directory`, all at once. The manifest is one GET (small, and everything waits for
        it); a tower's files are parallel ranged GETs streamed to disk: the int8 ViT-B/32 text graph, 64 MB
        from the local S3 endpoint, took 0.11-0.13 s so, against 0.27-0.29 s read whole by one GET, then written."""
        if not names:
            return
        prefix = model_prefix(model_id)
        logger.info("fetching %s from %s into %s", ", ".join(names), prefix, directory)

        def fetch_one(name: str) -> None:
            target = directory / name
            staging = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
            staging.parent.mkdir(parents=True, exist_ok=True)
            try:
                if name == MANIFEST:
                    staging.write_bytes(self._store.get(prefix + name).data)
                else:
                    self._store.download_file(prefix + name, staging)
            except BaseException as error:
                staging.unlink(missing_ok=True)
                if isinstance(error, ObjectNotFound):
                    raise ModelFilesInvalid(f"model {model_id!r} has no {prefix}{name} in the bucket") from error
                raise
            staging.replace(target)

        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            list(pool.map(fetch_one, names))
