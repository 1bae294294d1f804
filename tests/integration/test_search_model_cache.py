"""ModelCache against the S3 endpoint: fetch only a tower's files, once, with checksums verified."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from clipsearch import model_files
from clipsearch.adapters.s3_store import S3ObjectStore
from clipsearch.errors import ModelFilesInvalid
from clipsearch.model_cache import TEXT_TOWER_FILES, VISION_TOWER_FILES, ModelCache
from clipsearch.model_files import ModelFiles
from search_stack import MODEL_ID, upload_model

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3_client, bucket: str, tiny_model_dir: Path) -> S3ObjectStore:
    upload_model(s3_client, bucket, tiny_model_dir)
    return S3ObjectStore(s3_client, bucket)


def test_fetches_only_the_tower_asked_for_and_only_once(store: S3ObjectStore, tmp_path: Path) -> None:
    cache = ModelCache(store, tmp_path)
    files = cache.model_files(MODEL_ID, TEXT_TOWER_FILES)
    assert files.model_id == MODEL_ID and files.text_graph.is_file() and not files.vision_graph.exists()

    # Once cached, the bucket is not read again for these files.
    store.delete_many([f"models/{MODEL_ID}/{name}" for name in ("manifest.json", *TEXT_TOWER_FILES)])
    again = ModelCache(store, tmp_path).model_files(MODEL_ID, TEXT_TOWER_FILES)
    assert again.text_graph == files.text_graph

    vision = cache.model_files(MODEL_ID, VISION_TOWER_FILES)
    assert vision.vision_graph.is_file() and vision.preprocess_path.is_file()


def test_a_corrupt_file_is_refused_and_not_kept(store: S3ObjectStore, tmp_path: Path, tiny_model_dir: Path) -> None:
    graph = (tiny_model_dir / "text" / "model.onnx").read_bytes()
    store.put(f"models/{MODEL_ID}/text/model.onnx", graph[:-1] + bytes([graph[-1] ^ 1]))
    with pytest.raises(ModelFilesInvalid, match="sha256"):
        ModelCache(store, tmp_path).model_files(MODEL_ID, TEXT_TOWER_FILES)
    assert not (tmp_path / MODEL_ID / "text" / "model.onnx").exists()

    store.put(f"models/{MODEL_ID}/text/model.onnx", graph)  # repaired upstream: the next try succeeds
    assert ModelCache(store, tmp_path).model_files(MODEL_ID, TEXT_TOWER_FILES).text_graph.is_file()


def test_a_missing_or_misnamed_model_is_refused(store: S3ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ModelFilesInvalid, match="no models/other-model/manifest.json"):
        ModelCache(store, tmp_path).model_files("other-model", TEXT_TOWER_FILES)

    manifest = store.get(f"models/{MODEL_ID}/manifest.json").data
    store.put("models/renamed-model/manifest.json", manifest)
    with pytest.raises(ModelFilesInvalid, match="names model 'random-tiny-seed0'"):
        ModelCache(store, tmp_path).model_files("renamed-model", TEXT_TOWER_FILES)


def test_a_missing_tower_file_is_refused_and_leaves_nothing_behind(store: S3ObjectStore, tmp_path: Path) -> None:
    store.delete_many([f"models/{MODEL_ID}/text/model.onnx"])
    with pytest.raises(ModelFilesInvalid, match=f"has no models/{MODEL_ID}/text/model.onnx in the bucket"):
        ModelCache(store, tmp_path).model_files(MODEL_ID, TEXT_TOWER_FILES)
    text_dir = tmp_path / MODEL_ID / "text"
    assert not text_dir.exists() or list(text_dir.iterdir()) == []  # neither the graph nor a staging file


class MeetingStore:
    """The bucket, except that a model file's download waits until the other thread's has started: only two
    fetches made at the same time get through. Counts the manifest's GETs."""

    def __init__(self, store: S3ObjectStore) -> None:
        self._store = store
        self.meeting = threading.Barrier(2, timeout=10)
        self.manifest_gets = 0

    def get(self, key: str):
        assert key.endswith("/manifest.json"), f"{key} read whole into memory"
        self.manifest_gets += 1
        return self._store.get(key)

    def download_file(self, key: str, destination: Path) -> None:
        self.meeting.wait()
        self._store.download_file(key, destination)


def test_files_asked_for_at_once_by_two_threads_are_fetched_together_and_both_recorded(
    store: S3ObjectStore, tmp_path: Path, monkeypatch
) -> None:
    """The search function asks for the tokenizer and the text graph on two threads (the tokenizer loads while
    the graph downloads): the two downloads run at once, the manifest is fetched once, and the record of
    verified files keeps both."""
    meeting = MeetingStore(store)
    cache = ModelCache(meeting, tmp_path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        graph, tokenizer = pool.map(lambda name: cache.model_files(MODEL_ID, [name]),
                                    ["text/model.onnx", "tokenizer.json"])
    assert graph.text_graph.is_file() and tokenizer.tokenizer_path.is_file()
    assert meeting.manifest_gets == 1

    # Both files are recorded as verified: neither is fetched or hashed again.
    marker = json.loads((tmp_path / MODEL_ID / ".verified.json").read_text())
    assert set(marker["files"]) == {"text/model.onnx", "tokenizer.json"}
    monkeypatch.setattr(model_files, "file_sha256", lambda path: pytest.fail(f"{path} hashed again"))
    again = ModelCache(MeetingStore(store), tmp_path).model_files(MODEL_ID, TEXT_TOWER_FILES)
    assert again.text_graph == graph.text_graph


def test_one_file_asked_for_by_two_threads_is_fetched_once(store: S3ObjectStore, tmp_path: Path) -> None:
    """A file is fetched and checked by one caller at a time: the second finds it in place."""
    fetched: list[str] = []

    class CountingStore:
        def get(self, key: str):
            return store.get(key)

        def download_file(self, key: str, destination: Path) -> None:
            fetched.append(key)
            store.download_file(key, destination)

    cache = ModelCache(CountingStore(), tmp_path)
    start = threading.Barrier(2)

    def ask(_) -> ModelFiles:
        start.wait()
        return cache.model_files(MODEL_ID, ["text/model.onnx"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(ask, range(2))
    assert first.text_graph == second.text_graph and first.text_graph.is_file()
    assert fetched.count(f"models/{MODEL_ID}/text/model.onnx") == 1
