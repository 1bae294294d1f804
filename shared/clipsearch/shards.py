"""Fan-out's pure parts: shard plans of whole segments within a byte budget, merging shard rankings, the payload.

A dataset whose segments together exceed what one search function may hold is searched by shard
searchers (the ShardSearcher port), each holding a group of whole segments within its own budget. The
plan is a pure function of the segments and the budget, the same for the same set of segments however
the catalog lists them, so a shard searcher keeps finding the segments it already holds; a new segment
(newest id) joins the last shard or opens a new one and leaves the earlier shards as they were.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from clipsearch.errors import ClipsearchError
from clipsearch.ports import Dataset, SegmentRef, ShardQuery, ShardSearcher
from clipsearch.search_results import ImageFilter

Ranking = list[tuple[int, float]]  # (image id, score), best first, ties by id


class SegmentOverBudget(ClipsearchError):
    """One segment alone is larger than a shard searcher may hold: compaction must write smaller ones."""


@dataclass(frozen=True)
class SizedSegment:
    ref: SegmentRef
    nbytes: int  # its object's size: what it occupies once memory-mapped


@dataclass(frozen=True)
class Shard:
    number: int
    segments: tuple[SegmentRef, ...]
    nbytes: int


def plan_shards(segments: Sequence[SizedSegment], budget_bytes: float) -> tuple[Shard, ...]:
    """Whole segments in groups of at most `budget_bytes` each, filled in segment-id order (ids sort by
    creation time): the same groups for the same set, whatever order it comes in."""
    shards: list[Shard] = []
    group: list[SegmentRef] = []
    group_bytes = 0
    for segment in sorted(segments, key=lambda sized: sized.ref.id):
        if segment.nbytes > budget_bytes:
            raise SegmentOverBudget(
                f"segment {segment.ref.id} occupies {segment.nbytes} bytes, over a shard searcher's budget of "
                f"{budget_bytes:.0f}"
            )
        if group and group_bytes + segment.nbytes > budget_bytes:
            shards.append(Shard(len(shards), tuple(group), group_bytes))
            group, group_bytes = [], 0
        group.append(segment.ref)
        group_bytes += segment.nbytes
    if group:
        shards.append(Shard(len(shards), tuple(group), group_bytes))
    return tuple(shards)


def merge_rankings(rankings: Sequence[Ranking], k: int) -> Ranking:
    """The k best of several rankings by (score descending, id ascending), an id found twice counted once
    (at its best score): the order a single index's ranking has, so pages cut from it stay stable."""
    best: dict[int, float] = {}
    for ranking in rankings:
        for image_id, score in ranking:
            if image_id not in best or score > best[image_id]:
                best[image_id] = score
    return sorted(best.items(), key=lambda hit: (-hit[1], hit[0]))[:k]


@dataclass(frozen=True)
class ShardedIndex:
    """A dataset over the search function's budget, as of `index_version`: its shard plan, nothing loaded."""

    dataset_id: int
    dataset: str
    index_version: int
    shards: tuple[Shard, ...]
    nbytes: int = 0  # the snapshot holds no segment in this process

    @property
    def vector_count(self) -> int:
        return sum(ref.vector_count for shard in self.shards for ref in shard.segments)

    def is_current(self, dataset: Dataset) -> bool:
        return self.dataset_id == dataset.id and self.index_version >= dataset.index_version

    def search(
        self, searcher: ShardSearcher, pool: Executor, vector: np.ndarray, k: int, image_filter: ImageFilter
    ) -> Ranking:
        """Every shard's top k for `vector`, asked in parallel, merged. A shard's failure is the search's."""
        queries = [
            ShardQuery(self.dataset, self.dataset_id, self.index_version, shard.number, shard.segments,
                       np.asarray(vector, np.float32).reshape(-1), k, image_filter)
            for shard in self.shards
        ]
        return merge_rankings(list(pool.map(searcher.search_shard, queries)), k)


# --- the payload between the search function and a shard searcher (JSON) ----------------------------


def query_payload(query: ShardQuery) -> dict:
    image_filter = query.image_filter
    return {
        "dataset": query.dataset,
        "dataset_id": query.dataset_id,
        "index_version": query.index_version,
        "shard": query.shard,
        "segments": [
            {"id": ref.id, "object_key": ref.object_key, "vector_count": ref.vector_count, "index_type": ref.index_type}
            for ref in query.segments
        ],
        "vector": base64.b64encode(np.asarray(query.vector, "<f4").tobytes()).decode("ascii"),
        "k": query.k,
        "filter": {
            "key_prefix": image_filter.key_prefix,
            "since": image_filter.since.isoformat() if image_filter.since else None,
            "until": image_filter.until.isoformat() if image_filter.until else None,
        },
    }


def query_from_payload(payload: dict) -> ShardQuery:
    """The ShardQuery a payload carries; KeyError or ValueError when it is not one."""
    image_filter = payload["filter"]
    return ShardQuery(
        dataset=str(payload["dataset"]),
        dataset_id=int(payload["dataset_id"]),
        index_version=int(payload["index_version"]),
        shard=int(payload["shard"]),
        segments=tuple(
            SegmentRef(str(ref["id"]), str(ref["object_key"]), int(ref["vector_count"]), str(ref["index_type"]))
            for ref in payload["segments"]
        ),
        vector=np.frombuffer(base64.b64decode(payload["vector"]), "<f4").astype(np.float32),
        k=int(payload["k"]),
        image_filter=ImageFilter(
            key_prefix=image_filter.get("key_prefix"),
            since=_moment(image_filter.get("since")),
            until=_moment(image_filter.get("until")),
        ),
    )


def ranking_payload(ranking: Ranking) -> dict:
    return {"hits": [[int(image_id), float(score)] for image_id, score in ranking]}


def ranking_from_payload(payload: dict) -> Ranking:
    return [(int(image_id), float(score)) for image_id, score in payload["hits"]]


def _moment(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
