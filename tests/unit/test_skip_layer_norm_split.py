"""split_skip_layer_norms: a SkipLayerNormalization becomes bias Add, residual Add and LayerNormalization with the
same outputs, including the residual sum a later layer reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model_export.fusion import split_skip_layer_norms

WIDTH = 16


def _skip_layer_norm_graph(with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    weights = {
        "gamma": rng.standard_normal(WIDTH), "beta": rng.standard_normal(WIDTH), "bias": rng.standard_normal(WIDTH)
    }
    inputs = ["x", "skip", "gamma", "beta", *(["bias"] if with_bias else [])]
    graph = helper.make_graph(
        [
            helper.make_node(
                "SkipLayerNormalization", inputs, ["normed", "", "", "residual"], domain="com.microsoft", epsilon=1e-5
            ),
            # the next layer reads the residual sum, as in an encoder
            helper.make_node("Mul", ["residual", "normed"], ["out"]),
        ],
        "skip_layer_norm",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 5, WIDTH]) for name in ("x", "skip")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, WIDTH])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_the_split_graph_gives_the_fused_operator_results_with_and_without_bias():
    rng = np.random.default_rng(12)
    feeds = {name: rng.standard_normal((2, 5, WIDTH)).astype(np.float32) for name in ("x", "skip")}
    for with_bias in (True, False):
        model = _skip_layer_norm_graph(with_bias)
        fused_result = _run(model, feeds)

        assert split_skip_layer_norms(model) == 1

        assert [node.op_type for node in model.graph.node] == [
            *(["Add"] if with_bias else []), "Add", "LayerNormalization", "Mul"
        ]
        np.testing.assert_allclose(_run(model, feeds), fused_result, rtol=1e-5, atol=1e-5)
