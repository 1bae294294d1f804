"""Filters on an IVF segment still fill k, and the catalog's filter query reads prefixes literally.

FAISS's own selector only filters the inverted lists a query probes: a folder of other subjects, or a
handful of images, sits in lists the query never probes and came back short of k (issue 9).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from clipsearch.adapters.faiss_index import FaissVectorIndex
from clipsearch.adapters.postgres_catalog import PostgresCatalog
from clipsearch.datasets import image_key, segment_key
from clipsearch.encoders import OnnxTextEncoder
from clipsearch.model_files import ModelFiles
from clipsearch.ports import IndexedImage, NewImage, NewSegment
from clipsearch.segments import SegmentVectors, ivf_spec
from search_stack import MODEL_ID, SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)

pytestmark = pytest.mark.integration

K = 10
QUERY = "a red circle on a white background"


def clustered(query: np.ndarray, clusters: int, per_cluster: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normalized vectors in tight clusters, and each one's cluster; cluster 0 is the farthest from `query`."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, len(query))).astype(np.float32)
    centres = centres[np.argsort(centres @ query)]
    cluster = np.repeat(np.arange(clusters), per_cluster)
    vectors = centres[cluster] + 0.3 * rng.standard_normal((len(cluster), len(query))).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), cluster


def exact_top(query: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int) -> set[int]:
    return set(ids[np.argsort(-(vectors @ query), kind="stable")[:k]].tolist())


def test_selections_outside_the_probed_lists_fill_k_with_the_nearest(tmp_path: Path) -> None:
    query = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    query /= np.linalg.norm(query)
    vectors, cluster = clustered(query, clusters=64, per_cluster=80)
    ids = np.arange(1000, 1000 + len(vectors), dtype=np.int64)
    spec = ivf_spec(len(vectors))
    vector_index = FaissVectorIndex()
    path = tmp_path / "segment.faiss"
    vector_index.write(SegmentVectors(ids, vectors), spec, path)
    segment = vector_index.open(path)
    far_folder = np.nonzero(cluster < 2)[0]  # two clusters, the farthest from the query
    scattered = np.random.default_rng(2).choice(len(ids), 12, replace=False)  # fewer than one list holds
    single = np.array([5])

    for rows in (far_folder, scattered, single):
        selection = vector_index.selection(ids[rows])
        inner = faiss.downcast_index(segment._index.index)
        plain = faiss.SearchParametersIVF(sel=selection.selector, nprobe=inner.nprobe)
        _, plain_found = segment._index.search(query[None], K, params=plain)
        assert (plain_found[0] >= 0).sum() < min(K, len(rows)), "the case FAISS's selector alone leaves short"

        scores, found = segment.search(query[None], K, selection)

        assert len(found) == min(K, len(rows))
        assert set(found.tolist()) <= set(ids[rows].tolist())
        expected = exact_top(query, vectors[rows], ids[rows], K)
        assert len(set(found.tolist()) & expected) >= 0.9 * len(expected)
        assert list(scores) == sorted(scores, reverse=True)


def test_a_folder_of_other_subjects_fills_k_through_the_search_function(stack: SearchStack, tiny_model_dir) -> None:
    """An IVF segment as compaction writes it beyond the flat limit, its rows in PostgreSQL, fetched from the
    S3 endpoint, queried with the tiny model's text embedding through the handler."""
    encoder = OnnxTextEncoder.from_model_files(ModelFiles.open(tiny_model_dir))
    query = np.asarray(encoder.embed_text(QUERY).vector, dtype=np.float32)
    vectors, cluster = clustered(query, clusters=64, per_cluster=80)
    folders = np.where(cluster < 2, "far", "near")
    relatives = [f"{folder}/img{position:05d}.jpg" for position, folder in enumerate(folders)]
    dataset = "folders"
    row = stack.catalog.ensure_dataset(dataset, MODEL_ID)
    claims = stack.catalog.claim_images(row.id, [
        NewImage(stack.store.bucket, image_key(dataset, relative), "etag", None, "0" * 64, 1) for relative in relatives
    ])
    id_of = {claim.key: claim.id for claim in claims}
    ids = np.array([id_of[image_key(dataset, relative)] for relative in relatives], dtype=np.int64)
    segment = NewSegment("ivf", segment_key(dataset, "ivf"), len(ids), ivf_spec(len(ids)).kind)
    stack.store.put(segment.object_key, FaissVectorIndex().build(SegmentVectors(ids, vectors), ivf_spec(len(ids))))
    stack.catalog.commit_batch(row.id, segment, [IndexedImage(int(i), 64, 64) for i in ids], [])

    status, body = stack.call(stack.search, "search_text", dataset=dataset,
                              body={"query": QUERY, "k": K, "prefix": "far/"})

    assert status == 200, body
    keys = [hit["key"] for hit in body["results"]]
    assert len(keys) == K
    far = np.nonzero(folders == "far")[0]
    expected = {image_key(dataset, relatives[position])
                for position in far[np.argsort(-(vectors[far] @ query), kind="stable")[:K]]}
    assert len(set(keys) & expected) >= 9


def test_a_prefix_matches_its_characters_literally(catalog: PostgresCatalog) -> None:
    """`_` and `%` in a folder name are characters, not LIKE wildcards; pending images never match."""
    dataset = "literal"
    row = catalog.ensure_dataset(dataset, MODEL_ID)
    relatives = ["a_b/1.jpg", "axb/2.jpg", "50%/3.jpg", "500/4.jpg"]
    claims = catalog.claim_images(row.id, [
        NewImage("bucket", image_key(dataset, relative), "etag", None, "0" * 64, 1) for relative in relatives
    ])
    pending = catalog.claim_images(row.id, [NewImage("bucket", image_key(dataset, "a_b/7.jpg"), "e", None, "0" * 64, 1)])
    id_of = {claim.key.removeprefix(f"datasets/{dataset}/"): claim.id for claim in claims}
    segment = NewSegment("s", segment_key(dataset, "s"), len(claims), "flat")
    catalog.commit_batch(row.id, segment, [IndexedImage(claim.id, 1, 1) for claim in claims], [])

    def matching(prefix: str) -> set[int]:
        return set(catalog.filtered_image_ids(row.id, f"datasets/{dataset}/{prefix}", None, None))

    assert matching("a_b/") == {id_of["a_b/1.jpg"]}
    assert matching("50%") == {id_of["50%/3.jpg"]}
    assert matching("") == set(id_of.values())
    assert pending[0].id not in matching("a_b/")
    assert matching("nowhere/") == set()


def test_a_prefix_is_a_key_range_that_holds_at_the_edges_of_unicode(catalog: PostgresCatalog) -> None:
    """The prefix is read as the range [prefix, its last character + 1): a last character of U+10FFFF has no
    successor, and the one after U+D7FF is U+E000 (surrogates are no characters)."""
    dataset = "unicode"
    row = catalog.ensure_dataset(dataset, MODEL_ID)
    relatives = ["a\U0010ffff/1.jpg", "a\U0010ffff\U0010ffff/2.jpg", "b/3.jpg", "\ud7ff/4.jpg", "\ue000/5.jpg",
                 "é/6.jpg", "éa/7.jpg", "ê/8.jpg", "\U0010ffff/9.jpg"]
    claims = catalog.claim_images(row.id, [
        NewImage("bucket", image_key(dataset, relative), "etag", None, "0" * 64, 1) for relative in relatives
    ])
    id_of = {claim.key.removeprefix(f"datasets/{dataset}/"): claim.id for claim in claims}
    segment = NewSegment("u", segment_key(dataset, "u"), len(claims), "flat")
    catalog.commit_batch(row.id, segment, [IndexedImage(claim.id, 1, 1) for claim in claims], [])

    def matching(prefix: str) -> set[str]:
        ids = catalog.filtered_image_ids(row.id, f"datasets/{dataset}/{prefix}", None, None)
        assert ids.dtype.name == "int64"
        return {relative for relative, image_id in id_of.items() if image_id in set(ids.tolist())}

    assert matching("a\U0010ffff") == {"a\U0010ffff/1.jpg", "a\U0010ffff\U0010ffff/2.jpg"}
    assert matching("a\U0010ffff\U0010ffff") == {"a\U0010ffff\U0010ffff/2.jpg"}
    assert matching("\U0010ffff") == {"\U0010ffff/9.jpg"}
    assert matching("\ud7ff") == {"\ud7ff/4.jpg"}
    assert matching("é") == {"é/6.jpg", "éa/7.jpg"}
    assert matching("") == set(relatives)
