"""Publish a model directory atomically: build it in a private staging directory, checksum it, swap it in."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clipsearch.model_files import file_sha256
from model_export.errors import ExportError, OutputDirectoryNotEmpty


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse, before any work, to overwrite a directory that holds something."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputDirectoryNotEmpty(str(out))


@contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A hidden directory beside `out` (same filesystem, so publishing is a rename), removed on the way out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    # Swap directories by rename so a reader never sees a half-written model directory.
    if out.exists():
        retired = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)


def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` by relative path, skipping hidden scratch entries."""
    return {
        path.relative_to(directory).as_posix(): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    }

