"""The pure choice of index kind by vector count and memory budget, and segment ids: no vectors needed."""

from __future__ import annotations

import time

import pytest
from clipsearch.segments import (
    FLAT,
    FLAT_LIMIT,
    IVF_SQ8,
    bytes_per_vector,
    choose_index,
    ivf_spec,
    new_segment_id,
)

pytestmark = pytest.mark.unit

GiB = 2**30


def test_small_segments_stay_exact() -> None:
    assert choose_index(0).kind == FLAT
    assert choose_index(FLAT_LIMIT).kind == FLAT
    assert choose_index(FLAT_LIMIT + 1).kind == IVF_SQ8
    assert choose_index(500, flat_limit=100).kind == IVF_SQ8


def test_a_flat_segment_over_the_budget_is_compressed_even_below_the_flat_limit() -> None:
    budget = bytes_per_vector(FLAT) * 10_000 - 1
    assert choose_index(10_000, budget).kind == IVF_SQ8
    assert choose_index(10_000, budget + 1).kind == FLAT


def test_a_million_vectors_fit_a_search_function_and_ten_million_must_be_sharded() -> None:
    search_budget = 1.9 * GiB  # a 3008 MB function less its runtime reserve
    spec = choose_index(1_000_000, search_budget)
    assert spec.kind == IVF_SQ8 and bytes_per_vector(IVF_SQ8) * 1_000_000 < 0.6 * GiB
    with pytest.raises(ValueError, match="shard the dataset"):
        choose_index(10_000_000, search_budget)


def test_ivf_lists_grow_with_the_square_root_and_probes_with_the_lists() -> None:
    assert ivf_spec(1_000_000).lists == 4000 and ivf_spec(1_000_000).probes == 63
    assert ivf_spec(100_000).lists == 1264
    assert ivf_spec(100_000_000).lists == 8192  # capped
    assert ivf_spec(7).lists == 1 and ivf_spec(7).probes == 1  # tiny merges (tests) still train
    for count in (60_000, 1_000_000, 5_000_000):
        spec = ivf_spec(count)
        assert count / spec.lists >= 39 and 1 <= spec.probes <= spec.lists


def test_bytes_per_vector_counts_codes_ids_and_links() -> None:
    assert bytes_per_vector(FLAT) == 512 * 4 + 8
    assert bytes_per_vector(IVF_SQ8) == 512 + 16
    assert bytes_per_vector(FLAT, dim=32) == 32 * 4 + 8


def test_segment_ids_sort_by_creation_and_never_repeat() -> None:
    ids = [new_segment_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert ids[0][:13] <= ids[-1][:13] and ids[0][:13].isdigit()
    time.sleep(0.002)
    assert new_segment_id() > ids[-1]
