"""Why an export was refused: each names the problem so the command can print it without a traceback."""

from __future__ import annotations

from clipsearch.errors import ClipsearchError


class ExportError(ClipsearchError):
    """The export cannot go on; nothing was published."""


class CheckpointUnavailable(ExportError):
    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"cannot download {model!r}: pass a local directory ({reason})")
        self.model = model


class CheckpointNotClip(ExportError):
    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"{model!r} is not a CLIP checkpoint: {reason}")
        self.model = model


class OutputDirectoryNotEmpty(ExportError):
    def __init__(self, path: str) -> None:
        super().__init__(f"output directory {path} exists and is not empty: pass --force to replace it")
        self.path = path


class ParityFailure(ExportError):
    """The ONNX graphs disagree with PyTorch beyond the threshold."""
