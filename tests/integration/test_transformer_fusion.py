"""fuse_attention on the tiny random CLIP's exported text tower: one causal Attention per layer, the same
embeddings as the exported graph at true length and padded, and a refusal that leaves the graph untouched."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export.checkpoint import build_random_checkpoint
from model_export.fusion import TowerShape, fuse_attention
from model_export.samples import text_samples
from model_export.towers import TEXT_GRAPH, export_towers

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    checkpoint = build_random_checkpoint("tiny", 0)
    directory = tmp_path_factory.mktemp("towers")
    export_towers(checkpoint.model, directory, None)
    return checkpoint, directory / TEXT_GRAPH


def _embedder(graph: Path):
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return lambda ids: session.run(["text_embeds"], {"input_ids": ids})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_the_text_tower_fuses_into_one_causal_attention_per_layer_with_the_same_embeddings(exported, tmp_path):
    checkpoint, exported_graph = exported
    graph = tmp_path / "model.onnx"
    shutil.copy(exported_graph, graph)
    texts = text_samples(checkpoint.tokenizer_json)
    config = checkpoint.model.config.text_config

    counts = fuse_attention(graph, TowerShape.of(config), [{"input_ids": texts.padded}])

    assert counts is not None and counts["Attention"] == config.num_hidden_layers == 2
    assert counts["SkipLayerNormalization"] == 0
    attentions = [node for node in onnx.load(str(graph)).graph.node if node.op_type == "Attention"]
    for node in attentions:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["num_heads"] == config.num_attention_heads and attributes["unidirectional"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no scratch file left behind
    fused_embed, exported_embed = _embedder(graph), _embedder(exported_graph)
    with torch.inference_mode():
        for ids, padded in zip(texts.token_ids, texts.padded, strict=True):
            true_length = fused_embed(ids[None])
            assert _cosine(true_length, exported_embed(ids[None])).min() >= 0.9999999
            expected = checkpoint.model.get_text_features(input_ids=torch.from_numpy(ids[None])).numpy()
            assert _cosine(true_length, expected).min() >= 0.99999
            # the causal mask survives the fusion: tokens after <|endoftext|> change nothing
            np.testing.assert_allclose(fused_embed(padded[None]), true_length, atol=1e-6)


def test_a_head_count_the_graph_does_not_have_leaves_it_as_exported(exported, tmp_path):
    checkpoint, exported_graph = exported
    graph = tmp_path / "model.onnx"
    shutil.copy(exported_graph, graph)
    texts = text_samples(checkpoint.tokenizer_json)
    config = checkpoint.model.config.text_config
    wrong = TowerShape(config.num_hidden_layers, config.num_attention_heads * 2, config.hidden_size)

    assert fuse_attention(graph, wrong, [{"input_ids": texts.padded}]) is None

    assert graph.read_bytes() == exported_graph.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
