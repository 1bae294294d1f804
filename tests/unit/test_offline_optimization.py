"""optimize_offline: a graph is replaced by its fused form with the same results; side-file graphs stay as they are."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model_export.optimize import optimize_offline


def _quick_gelu_graph(path) -> None:
    """x @ w, then CLIP's activation written out as exported: y * sigmoid(1.702 * y)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Mul", ["y", "alpha"], ["scaled"]),
            helper.make_node("Sigmoid", ["scaled"], ["gate"]),
            helper.make_node("Mul", ["y", "gate"], ["out"]),
        ],
        "activation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8])],
        [
            numpy_helper.from_array(np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array(1.702, dtype=np.float32), "alpha"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_graph_is_replaced_by_its_fused_form_with_the_same_results(tmp_path):
    graph = tmp_path / "model.onnx"
    _quick_gelu_graph(graph)
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    before = _run(graph, x)

    assert optimize_offline(graph) is True

    nodes = onnx.load(str(graph)).graph.node
    assert "QuickGelu" in {node.op_type for node in nodes} and len(nodes) < 4
    np.testing.assert_allclose(_run(graph, x), before, rtol=1e-6, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no scratch file left behind


def test_a_graph_with_a_weights_side_file_is_left_as_exported(tmp_path):
    graph = tmp_path / "model.onnx"
    _quick_gelu_graph(graph)
    (tmp_path / "model.onnx_data").write_bytes(b"weights")
    exported = graph.read_bytes()

    assert optimize_offline(graph) is False

    assert graph.read_bytes() == exported
