"""compress_embedding_tables: a large Gather table becomes int8 rows with per-row scales, same outputs within a step."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model_export.quantize import EMBEDDING_TABLE_MIN_BYTES, compress_embedding_tables


def _embedding_graph(path, table: np.ndarray, small: np.ndarray) -> None:
    """ids -> Gather(table) + Gather(small)[0]: a token table big enough to compress and one too small."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["tokens"]),
            helper.make_node("Gather", ["small", "zero"], ["position"]),
            helper.make_node("Add", ["tokens", "position"], ["embedded"]),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, None, table.shape[1]])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(small, "small"),
         numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_a_large_table_is_stored_as_int8_rows_and_gives_the_same_embeddings_within_one_step(tmp_path):
    rng = np.random.default_rng(7)
    table = (rng.standard_normal((1024, 512)) * 0.02).astype(np.float32)
    table[3] *= 50  # one outlier row must not coarsen the others: scales are per row
    assert table.nbytes >= EMBEDDING_TABLE_MIN_BYTES
    small = rng.standard_normal((4, 512)).astype(np.float32)
    graph = tmp_path / "model.onnx"
    _embedding_graph(graph, table, small)
    ids = np.array([[0, 3, 17, 1023, 3]], dtype=np.int64)
    before = _run(graph, ids)
    size_before = graph.stat().st_size

    compress_embedding_tables(graph)

    after = _run(graph, ids)
    assert after.shape == before.shape and after.dtype == np.float32
    steps = np.abs(table[ids[0]]).max(axis=1, keepdims=True) / 127.0
    assert np.all(np.abs(after[0] - before[0]) <= steps / 2 + 1e-7)
    assert np.abs(after[0, 0] - before[0, 0]).max() < 0.02 / 127 * 3  # an ordinary row keeps its fine step
    tables = {tensor.name: tensor for tensor in onnx.load(str(graph)).graph.initializer}
    assert tables["table"].data_type == TensorProto.INT8
    assert tables["small"].data_type == TensorProto.FLOAT  # under the size threshold: untouched
    assert graph.stat().st_size < size_before * 0.3
