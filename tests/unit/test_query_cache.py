"""CachedTextEncoder: a repeated query text is embedded once, the oldest texts go beyond the bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from clipsearch.query_cache import CachedTextEncoder
from clipsearch.search import TextQueryEncoder

pytestmark = pytest.mark.unit


@dataclass
class Embedding:
    vector: np.ndarray
    truncated: bool = False


class CountingEncoder:
    """A deterministic stand-in tower that counts how often each text reaches it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def embed_text(self, text: str) -> Embedding:
        self.calls.append(text)
        vector = np.random.default_rng(sum(text.encode())).standard_normal(8).astype(np.float32)
        return Embedding(vector / np.linalg.norm(vector), truncated=len(text) > 20)


def test_a_repeated_text_reaches_the_tower_once_and_gets_the_same_embedding():
    tower = CountingEncoder()
    cached: TextQueryEncoder = CachedTextEncoder(tower, max_entries=4)  # a type checker holds it to the protocol
    first = cached.embed_text("a red star")
    again = cached.embed_text("a red star")
    assert tower.calls == ["a red star"]
    assert again is first
    np.testing.assert_array_equal(again.vector, tower.embed_text("a red star").vector)
    assert (cached.hits, cached.misses) == (1, 1)


def test_truncation_is_remembered_with_the_vector():
    cached = CachedTextEncoder(CountingEncoder())
    assert cached.embed_text("x" * 30).truncated and cached.embed_text("x" * 30).truncated
    assert not cached.embed_text("short").truncated


def test_the_least_recently_used_text_goes_first_beyond_the_bound():
    tower = CountingEncoder()
    cached = CachedTextEncoder(tower, max_entries=2)
    cached.embed_text("one")
    cached.embed_text("two")
    cached.embed_text("one")  # now "two" is the least recently used
    cached.embed_text("three")
    assert len(cached) == 2
    cached.embed_text("one")
    cached.embed_text("two")  # evicted: embedded again
    assert tower.calls == ["one", "two", "three", "two"]


def test_handed_out_vectors_cannot_be_changed_by_a_caller():
    cached = CachedTextEncoder(CountingEncoder())
    vector = cached.embed_text("a dog").vector
    with pytest.raises(ValueError):
        vector *= 2


def test_a_bound_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        CachedTextEncoder(CountingEncoder(), max_entries=0)
