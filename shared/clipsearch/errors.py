"""Domain errors: adapters translate library errors into these; handlers map them to HTTP status."""

from __future__ import annotations


class ClipsearchError(Exception):
    """Root of every error clipsearch raises on purpose."""


class InvalidRequest(ClipsearchError):
    """The caller asked for something malformed (HTTP 400)."""


class InvalidDatasetName(InvalidRequest):
    """A dataset name that breaks the naming rule."""


class InvalidKey(InvalidRequest):
    """An object key given by a caller that is malformed: traversal or empty segments, control characters,
    over the length limit, not an image (HTTP 400, refused before any storage call)."""


class KeyOutsideDataset(InvalidRequest):
    """A caller's object key that is not under the dataset the request names (HTTP 400)."""


class InvalidImage(ClipsearchError):
    """An image that cannot be embedded: names the image and the reason (never retried)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class ImageTooLarge(InvalidImage):
    """An image over the configured pixel or byte limit (HTTP 413)."""


class UnsupportedMediaType(InvalidRequest):
    """A request body of a content type we do not read (HTTP 415)."""


class NotFound(ClipsearchError):
    """A named thing does not exist (HTTP 404)."""


class DatasetNotFound(NotFound):
    def __init__(self, dataset: str) -> None:
        super().__init__(f"dataset {dataset!r} does not exist")
        self.dataset = dataset


class DatasetDeleting(DatasetNotFound):
    """A dataset whose deletion was requested: gone to search and ingestion, still shown while it goes (HTTP 409)."""

    def __init__(self, dataset: str) -> None:
        ClipsearchError.__init__(self, f"dataset {dataset!r} is being deleted")
        self.dataset = dataset


class ObjectNotFound(NotFound):
    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} does not exist")
        self.key = key


class ModelMismatch(ClipsearchError):
    """A dataset embedded by one model was asked to mix with another (HTTP 409)."""


class ModelFilesInvalid(ClipsearchError):
    """A model directory is incomplete or fails its checksums."""


class CatalogError(ClipsearchError):
    """The catalog refused a statement for a reason other than a lost connection or a conflict."""


class MaintenanceFailed(ClipsearchError):
    """A maintenance run (compaction, reconciliation) failed for some datasets; the rest were done."""


class TransientError(ClipsearchError):
    """A dependency (object store, database) failed in a way worth retrying."""
