"""Puts photos in the bucket and indexes them through the catalog and segment APIs, as ingestion does.

Search tests need datasets in known states (several batches, deletions, failures) without depending on
the queue; each batch here is one segment and one catalog commit, like one ingestion batch.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from clipsearch.adapters.postgres_catalog import PostgresCatalog
from clipsearch.datasets import image_key, segment_key
from clipsearch.encoders import ImageInput, OnnxImageEncoder
from clipsearch.errors import InvalidImage
from clipsearch.ports import (
    FailedImage,
    IndexedImage,
    NewImage,
    NewSegment,
    ObjectStore,
)
from clipsearch.segments import FLAT, SegmentVectors, build_segment


def index_batch(
    catalog: PostgresCatalog,
    store: ObjectStore,
    encoder: OnnxImageEncoder,
    dataset: str,
    model_id: str,
    files: Sequence[Path],
    source_root: Path | None = None,
) -> dict[str, int]:
    """Uploads `files` to datasets/<dataset>/ and commits them as one batch; returns key -> image id.

    With `source_root`, each image records its path as the user's source path (as the CLI does).
    """
    row = catalog.ensure_dataset(dataset, model_id)
    uploads = []
    for path in files:
        data = path.read_bytes()
        key = image_key(dataset, path.name)
        etag = store.put(key, data, content_type="image/jpeg")
        source = str(source_root / path.name) if source_root else None
        uploads.append((NewImage(store.bucket, key, etag, source, hashlib.sha256(data).hexdigest(), len(data)), data))
    claims = catalog.claim_images(row.id, [image for image, _ in uploads])
    embedded = encoder.embed_images([ImageInput(claim.key, data) for claim, (_, data) in zip(claims, uploads)])
    indexed, failed, ids, vectors = [], [], [], []
    for claim, outcome in zip(claims, embedded):
        if isinstance(outcome, InvalidImage):
            failed.append(FailedImage(claim.id, outcome.reason))
        else:
            indexed.append(IndexedImage(claim.id, outcome.width, outcome.height))
            ids.append(claim.id)
            vectors.append(outcome.vector)
    segment = None
    if indexed:
        segment_id = uuid.uuid4().hex
        segment = NewSegment(segment_id, segment_key(dataset, segment_id), len(ids), FLAT)
        content = SegmentVectors(np.array(ids, dtype=np.int64), np.stack(vectors).astype(np.float32))
        store.put(segment.object_key, build_segment(content, FLAT))
    catalog.commit_batch(row.id, segment, indexed, failed)
    return {claim.key: claim.id for claim in claims}
