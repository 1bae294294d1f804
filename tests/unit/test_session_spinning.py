"""create_session's worker spinning: off by default; bounded and stopped after each run when asked; from settings."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from clipsearch.config import Settings
from clipsearch.encoders import create_session


def _graph(path) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _config(session, key: str) -> str:
    return session.get_session_options().get_session_config_entry(key)


def test_workers_sleep_between_operators_by_default(tmp_path):
    _graph(tmp_path / "model.onnx")
    session = create_session(tmp_path / "model.onnx", 2)

    assert _config(session, "session.intra_op.allow_spinning") == "0"


def test_bounded_spinning_stops_when_each_run_ends(tmp_path):
    _graph(tmp_path / "model.onnx")
    session = create_session(tmp_path / "model.onnx", 2, spin_microseconds=50)

    assert _config(session, "session.intra_op.allow_spinning") == "1"
    assert _config(session, "session.intra_op.spin_duration_us") == "50"
    assert _config(session, "session.force_spinning_stop") == "1"
    np.testing.assert_array_equal(session.run(None, {"x": np.ones((1, 4), np.float32)})[0], [[4.0, 4.0]])


def test_the_text_spin_comes_from_the_environment():
    base = {"CLIPSEARCH_BUCKET": "b", "CLIPSEARCH_MODEL_ID": "m", "CLIPSEARCH_DATABASE_URL": "postgresql://localhost/x"}

    assert Settings.from_env(base).text_spin_microseconds == 500
    assert Settings.from_env({**base, "CLIPSEARCH_TEXT_SPIN_MICROSECONDS": "0"}).text_spin_microseconds == 0
