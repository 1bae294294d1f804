"""What an export is asked to do: kept free of heavy imports so the command can refuse bad arguments at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RANDOM_ARCHITECTURES = ("vit-b-32", "tiny")
QUANTIZATIONS = ("none", "int8")


@dataclass(frozen=True)
class ExportOptions:
    """Where and how to export; `sample_photos` adds real photos to the self-check when the folder exists."""

    out: Path
    quantization: str = "none"
    force: bool = False
    threads: int | None = None
    opset: int | None = None
    sample_photos: Path | None = None
