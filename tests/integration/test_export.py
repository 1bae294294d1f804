"""The CLIP -> ONNX exporter on the tiny random CLIP: model directory contract, parity, int8, refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import BertConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

from model_export import clip_vocab
from model_export.checkpoint import build_random_checkpoint, load_checkpoint
from model_export.errors import CheckpointNotClip, ParityFailure
from model_export.export import export_model
from model_export.options import ExportOptions
from model_export.verify import SampleEmbeddings, check_onnx_vs_torch

# Tracing warnings are expected while exporting in-process; the parity assertions are what count.
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

REPO = Path(__file__).resolve().parents[2]
SEED_EVAL = REPO.parent / "shared" / "datasets" / "seed-eval"
TEXTS = ["a photo of a cat", "", "two dogs playing in the snow at night", "Über café 東京 🐱", "snow " * 40]


def run_export(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "model_export", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def token_ids(model_dir: Path, text: str) -> np.ndarray:
    tokenizer = Tokenizer.from_str((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = tokenizer.encode(text).ids
    if len(ids) > 77:
        ids = [*ids[:76], tokenizer.token_to_id("<|endoftext|>")]
    return np.asarray(ids, dtype=np.int64)


def session(model_dir: Path, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / graph), providers=["CPUExecutionProvider"])


def sample_pixels(model_dir: Path) -> np.ndarray:
    """Real photos through transformers' own CLIP preprocessing (when present), plus random tensors."""
    preprocess = json.loads((model_dir / "preprocess.json").read_text(encoding="utf-8"))
    size = preprocess["crop_size"]
    pixels = [np.random.default_rng(7).standard_normal((3, 3, size, size)).astype(np.float32)]
    photos = sorted(SEED_EVAL.glob("val/*.jp*g"))[:6]
    if photos:
        processor = CLIPImageProcessor(
            size={"shortest_edge": preprocess["size"]},
            crop_size={"height": size, "width": size},
            image_mean=preprocess["mean"],
            image_std=preprocess["std"],
        )
        images = [Image.open(path).convert("RGB") for path in photos]
        pixels.append(processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32))
    return np.concatenate(pixels)


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("models") / "random-tiny-seed0-int8"
    manifest = export_model(build_random_checkpoint("tiny", 0), ExportOptions(out=out, quantization="int8"))
    return out, manifest


def test_tiny_export_writes_the_model_directory(tiny_model_dir: Path) -> None:
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text(encoding="utf-8"))

    assert manifest["model_id"] == "random-tiny-seed0"
    assert manifest["random_weights"] is True
    assert manifest["embedding_dim"] == 32
    assert manifest["context_length"] == 77
    assert manifest["quantization"] == "none"
    assert isinstance(manifest["opset"], int) and manifest["opset"] >= 14
    assert manifest["format"] and manifest["source"]
    datetime.fromisoformat(manifest["created"])
    # Hidden files are not part of the model: the runtime keeps its verification marker there.
    written = {
        p.relative_to(tiny_model_dir).as_posix()
        for p in tiny_model_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert written == {"manifest.json", *manifest["files"]}
    assert set(manifest["files"]) == {"text/model.onnx", "vision/model.onnx", "tokenizer.json", "preprocess.json"}
    for relative, digest in manifest["files"].items():
        assert sha256(tiny_model_dir / relative) == digest, relative
    preprocess = json.loads((tiny_model_dir / "preprocess.json").read_text(encoding="utf-8"))
    assert preprocess["size"] == preprocess["crop_size"] == 224
    assert preprocess["resample"] == "bicubic"
    assert json.loads((tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"] == []
    parity = manifest["parity"]["onnx_vs_torch"]
    assert parity["text"]["min_cosine"] >= 0.99999
    assert parity["image"]["min_cosine"] >= 0.99999
    assert_optimized_offline(tiny_model_dir, manifest)
    assert_text_attention_fused(tiny_model_dir, manifest, "Attention")


def assert_text_attention_fused(model_dir: Path, manifest: dict, operator: str) -> None:
    """The text tower ships with one fused attention operator per layer (model_export.fusion); vision as exported."""
    assert set(manifest["graph_fusion"]) == {"text/model.onnx"}
    assert manifest["graph_fusion"]["text/model.onnx"]["Attention"] == 2  # the tiny CLIP's layers
    text_ops = [node.op_type for node in onnx.load(str(model_dir / "text/model.onnx")).graph.node]
    assert text_ops.count(operator) == 2
    assert "Softmax" not in text_ops


def assert_optimized_offline(model_dir: Path, manifest: dict) -> None:
    """The graphs ship with onnxruntime's fusions saved (its own operators), as the manifest says."""
    assert manifest["graph_optimization"] == {
        "level": "extended", "onnxruntime": ort.__version__, "graphs": ["text/model.onnx", "vision/model.onnx"]
    }
    for graph in manifest["graph_optimization"]["graphs"]:
        domains = {node.domain for node in onnx.load(str(model_dir / graph)).graph.node}
        assert "com.microsoft" in domains, graph


def test_graphs_have_the_contracted_inputs_and_outputs(tiny_model_dir: Path) -> None:
    text, vision = session(tiny_model_dir, "text/model.onnx"), session(tiny_model_dir, "vision/model.onnx")

    assert [(i.name, i.type) for i in text.get_inputs()] == [("input_ids", "tensor(int64)")]
    assert [o.name for o in text.get_outputs()] == ["text_embeds"]
    assert [i.name for i in vision.get_inputs()] == ["pixel_values"]
    assert vision.get_inputs()[0].shape[1:] == [3, 224, 224]
    assert [o.name for o in vision.get_outputs()] == ["image_embeds"]


def test_onnx_matches_pytorch_recomputed_independently(tiny_model_dir: Path) -> None:
    # The same seed rebuilds the same weights, so this checks the published graphs, not the exporter's own figures.
    clip = build_random_checkpoint("tiny", 0).model
    text, vision = session(tiny_model_dir, "text/model.onnx"), session(tiny_model_dir, "vision/model.onnx")
    pixels = sample_pixels(tiny_model_dir)

    with torch.inference_mode():
        for sample in TEXTS:
            ids = token_ids(tiny_model_dir, sample)[None]
            expected = clip.get_text_features(input_ids=torch.from_numpy(ids)).numpy()
            assert cosine(text.run(None, {"input_ids": ids})[0], expected).min() >= 0.99999
        expected_images = clip.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
    assert cosine(vision.run(None, {"pixel_values": pixels})[0], expected_images).min() >= 0.99999


def test_text_graph_accepts_any_sequence_length_and_batch(tiny_model_dir: Path) -> None:
    text = session(tiny_model_dir, "text/model.onnx")

    for length in (2, 5, 77):
        ids = np.full((3, length), 320, dtype=np.int64)
        ids[:, 0], ids[:, -1] = 49406, 49407
        embeds = text.run(None, {"input_ids": ids})[0]
        assert embeds.shape == (3, 32)
        assert np.isfinite(embeds).all()


def test_padded_and_true_length_text_give_the_same_embedding(tiny_model_dir: Path) -> None:
    text = session(tiny_model_dir, "text/model.onnx")

    for sample in TEXTS:
        ids = token_ids(tiny_model_dir, sample)
        padded = np.zeros((1, 77), dtype=np.int64)
        padded[0, : len(ids)] = ids
        true_length = text.run(None, {"input_ids": ids[None]})[0]
        np.testing.assert_allclose(text.run(None, {"input_ids": padded})[0], true_length, atol=1e-6)


def test_int8_export_holds_only_int8_graphs_and_records_parity(tiny_int8: tuple[Path, dict]) -> None:
    out, manifest = tiny_int8
    parity = manifest["parity"]["int8_vs_fp32"]

    assert manifest == json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model_id"] == "random-tiny-seed0-int8"
    assert manifest["quantization"] == "int8"
    assert manifest["quantization_weight_type"] == parity["weight_type"]
    assert set(parity["candidates"]) == {"QInt8", "QUInt8"}
    chosen = parity["candidates"][parity["weight_type"]]["image_neighbours"]["mean_overlap"]
    assert chosen == max(c["image_neighbours"]["mean_overlap"] for c in parity["candidates"].values())
    for tower in ("text", "image"):
        assert 0.99 < parity[tower]["min_cosine"] <= parity[tower]["mean_cosine"] <= 1.0
    assert parity["image_neighbours"]["k"] == 10 and parity["image_neighbours"]["vectors"] >= 60
    assert 0.5 < parity["image_neighbours"]["mean_overlap"] <= 1.0
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "manifest.json",
        *manifest["files"],
    }
    for graph in ("text/model.onnx", "vision/model.onnx"):
        assert sha256(out / graph) == manifest["files"][graph]
        ops = {node.op_type for node in onnx.load(str(out / graph)).graph.node}
        assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}, graph
    assert_optimized_offline(out, manifest)
    assert_text_attention_fused(out, manifest, "QAttention")


def test_exports_a_local_checkpoint_directory(tmp_path: Path) -> None:
    checkpoint_dir = tmp_path / "My CLIP checkpoint"
    clip = build_random_checkpoint("tiny", 5).model
    clip.save_pretrained(checkpoint_dir)
    CLIPTokenizerFast(
        tokenizer_object=Tokenizer.from_str(clip_vocab.build_tokenizer_json()),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    ).save_pretrained(checkpoint_dir)
    CLIPImageProcessor().save_pretrained(checkpoint_dir)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")

    result = run_export("--model", checkpoint_dir, "--out", out, "--force", "--sample-photos", tmp_path / "none")

    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model_id"] == "my-clip-checkpoint"
    assert manifest["random_weights"] is False
    assert manifest["source"] == str(checkpoint_dir.resolve())
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["My CLIP checkpoint", "model"]
    reloaded = CLIPModel.from_pretrained(checkpoint_dir).eval()
    ids = token_ids(out, "a red bicycle")[None]
    with torch.inference_mode():
        expected = reloaded.get_text_features(input_ids=torch.from_numpy(ids)).numpy()
    assert cosine(session(out, "text/model.onnx").run(None, {"input_ids": ids})[0], expected).min() >= 0.99999


def assert_refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_a_checkpoint_that_is_not_clip(tmp_path: Path) -> None:
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path / "bert"
    )

    result = run_export("--model", tmp_path / "bert", "--out", tmp_path / "out")

    assert_refused(result, "is not a CLIP checkpoint")
    assert "bert" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]


def test_refuses_a_directory_without_config_json(tmp_path: Path) -> None:
    # "empty" would otherwise be read as model type "mpt", guessed from the folder name.
    (tmp_path / "empty").mkdir()

    with pytest.raises(CheckpointNotClip, match=r"no config\.json"):
        load_checkpoint(str(tmp_path / "empty"))


def test_refuses_a_model_id_it_cannot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = run_export("--model", "openai/clip-vit-base-patch32", "--out", tmp_path / "out")

    assert_refused(result, "cannot download 'openai/clip-vit-base-patch32': pass a local directory")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_output_directory_without_force(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    result = run_export("--random-arch", "tiny", "--out", tmp_path / "out")

    assert_refused(result, "--force")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_refuses_to_publish_graphs_that_drift_from_pytorch() -> None:
    rng = np.random.default_rng(0)
    reference = SampleEmbeddings(
        text=rng.standard_normal((4, 32)), text_padded=rng.standard_normal((4, 32)), image=rng.standard_normal((8, 32))
    )
    drifted = SampleEmbeddings(
        text=reference.text,
        text_padded=reference.text_padded,
        image=reference.image + 0.05 * rng.standard_normal((8, 32)),
    )

    assert check_onnx_vs_torch(reference, reference)["image"]["min_cosine"] == pytest.approx(1.0)
    with pytest.raises(ParityFailure, match="drift"):
        check_onnx_vs_torch(reference, drifted)
