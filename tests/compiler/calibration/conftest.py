"""Shared specs and a tiny ONNX source for the calibration tests (no torch export needed)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.frontend import IOSpec, load_source


@pytest.fixture
def specs():
    return [IOSpec("x", "float32", ["batch", 4], {"batch": (1, 8)}),
            IOSpec("ids", "int64", ["batch"], {"batch": (1, 8)}, value_range=(0, 10))]


def mlp_model():
    """y = relu(x @ W1) @ W2; x [batch, 8]; intermediate tensors "h" and "r"."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.fixture(scope="session")
def mlp_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib-src") / "mlp.onnx"
    onnx.save(mlp_model(), path)
    return load_source(str(path))
