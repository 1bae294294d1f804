"""A bounded cache of text-query embeddings, so a repeated query text is embedded once per execution environment.

`CachedTextEncoder` wraps any `TextQueryEncoder` and is one itself. The text tower is deterministic for a
given model, and an execution environment serves one model, so the query text alone is the key. Entries are
kept least recently used first and the oldest goes beyond `max_entries`: with CLIP's 512-d float32 vectors
and queries of at most MAX_QUERY_CHARS, 1,024 entries hold ~2 MB of vectors plus their texts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from clipsearch.search import TextQuery, TextQueryEncoder

DEFAULT_MAX_ENTRIES = 1024


class CachedTextEncoder:
    """Remembers the last `max_entries` query texts' embeddings; the vectors it hands out are read-only,
    since every caller of a repeated query gets the same array."""

    def __init__(self, encoder: TextQueryEncoder, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._encoder = encoder
        self._max_entries = max_entries
        self._embeddings: OrderedDict[str, TextQuery] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def embed_text(self, text: str) -> TextQuery:
        with self._lock:
            cached = self._embeddings.get(text)
            if cached is not None:
                self._embeddings.move_to_end(text)
                self.hits += 1
                return cached
            self.misses += 1
        embedding = self._encoder.embed_text(text)  # outside the lock: other texts are not held up
        embedding.vector.flags.writeable = False
        with self._lock:
            self._embeddings[text] = embedding
            self._embeddings.move_to_end(text)
            while len(self._embeddings) > self._max_entries:
                self._embeddings.popitem(last=False)
        return embedding

    def __len__(self) -> int:
        with self._lock:
            return len(self._embeddings)
