"""A model directory: manifest validation, checksums, and the verified-files marker."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from clipsearch.errors import ModelFilesInvalid
from clipsearch.model_files import TEXT_GRAPH, VERIFIED_MARKER, ModelFiles, file_sha256

pytestmark = pytest.mark.integration


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy, ignore=shutil.ignore_patterns(VERIFIED_MARKER))
    return copy


def rewrite_manifest(model_dir: Path, **changes) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_exposes_the_manifest_and_paths(model_dir: Path) -> None:
    files = ModelFiles.open(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert (files.model_id, files.embedding_dim, files.quantization) == (
        manifest["model_id"], manifest["embedding_dim"], manifest["quantization"])
    assert files.text_graph == model_dir / "text" / "model.onnx" and files.text_graph.is_file()
    assert files.vision_graph.is_file() and files.tokenizer_path.is_file() and files.preprocess_path.is_file()
    assert files.preprocess().crop_size > 0


def test_a_changed_file_is_named(model_dir: Path) -> None:
    with (model_dir / "tokenizer.json").open("a") as stream:
        stream.write(" ")
    with pytest.raises(ModelFilesInvalid, match="tokenizer.json: sha256 does not match"):
        ModelFiles.open(model_dir).verify()


def test_a_missing_file_is_named(model_dir: Path) -> None:
    (model_dir / TEXT_GRAPH).unlink()
    with pytest.raises(ModelFilesInvalid, match="text/model.onnx: missing"):
        ModelFiles.open(model_dir).verify([TEXT_GRAPH])


def test_verified_files_are_not_hashed_again_until_they_change(model_dir: Path) -> None:
    ModelFiles.open(model_dir).verify()
    assert (model_dir / VERIFIED_MARKER).is_file()
    graph = model_dir / TEXT_GRAPH
    stat = graph.stat()
    # Same size and mtime: trusted from the marker (a warm start costs a stat, not a hash).
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ModelFiles.open(model_dir).verify([TEXT_GRAPH])
    # A new mtime: hashed again, and the change is caught.
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelFilesInvalid, match="text/model.onnx"):
        ModelFiles.open(model_dir).verify([TEXT_GRAPH])


def test_a_new_manifest_invalidates_the_marker(model_dir: Path) -> None:
    ModelFiles.open(model_dir).verify()
    rewrite_manifest(model_dir, files={**json.loads((model_dir / "manifest.json").read_text())["files"],
                                       TEXT_GRAPH: "0" * 64})
    with pytest.raises(ModelFilesInvalid, match="text/model.onnx"):
        ModelFiles.open(model_dir).verify([TEXT_GRAPH])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "other/9"}, "format"),
        ({"model_id": "../escape"}, "model_id"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"quantization": "fp16"}, "quantization"),
        ({"files": {"../../etc/passwd": "0" * 64}}, "invalid entry"),
        ({"files": {"tokenizer.json": "0" * 64}}, "not listed"),
    ],
)
def test_an_invalid_manifest_is_refused(model_dir: Path, changes: dict, message: str) -> None:
    rewrite_manifest(model_dir, **changes)
    with pytest.raises(ModelFilesInvalid, match=message):
        ModelFiles.open(model_dir)


def test_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesInvalid, match="manifest.json"):
        ModelFiles.open(tmp_path)


@pytest.mark.parametrize("size", [0, 1, 300_000])
def test_a_file_hashes_to_the_sha256_of_its_bytes(tmp_path, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    (tmp_path / "file").write_bytes(data)
    assert file_sha256(tmp_path / "file") == hashlib.sha256(data).hexdigest()
