"""FuseInt8WoGemmPass: DQ(int8 [K,N], scale [N], axis=1) -> MatMul (+ bias Add) -> qcompile::Int8WeightOnlyGemm,
checked in ONNX Runtime against the Q/DQ graph, plus its declines."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.passes import _graph as G
from qcompile.passes.fuse_int8_wo_gemm import FuseInt8WoGemmPass
from qcompile.passes.pipeline import export_model


def _qdq(with_bias: bool, k=64, n=32, scale=None, zero=0, block=False):
    rng = np.random.default_rng(2)
    s = np.full(n, 0.02, np.float32) if scale is None else scale
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w_q"),
             numpy_helper.from_array(s, "w_scale"), numpy_helper.from_array(np.full(n, zero, np.int8), "w_zp"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    dq_attrs = {"axis": 0, "block_size": 32} if block else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq", **dq_attrs),
             helper.make_node("MatMul", ["x", "w"], ["h" if with_bias else "y"], name="proj")]
    if with_bias:
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="bias_add"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _fuse(model):
    graph = G.import_model(model)
    result = FuseInt8WoGemmPass().call(graph)
    return export_model(graph, like=model), result


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_node_runs_in_ort_like_the_qdq_graph(with_bias):
    qdq = _qdq(with_bias)
    fused, result = _fuse(qdq)
    onnx.checker.check_model(fused, full_check=True)
    assert result.stats["Int8WoGemmRule"] == 1
    assert [n.op_type for n in fused.graph.node] == ["Int8WeightOnlyGemm"]  # DQ, MatMul and bias Add are gone
    node = fused.graph.node[0]
    assert node.name == "proj" and node.domain == "qcompile" and node.output[0] == "y"
    x = np.random.default_rng(6).standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(ort_session(fused).run(None, {"x": x})[0], ort_session(qdq).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, reason", [
    (_qdq(False, zero=3), "zero point is not zero"),
    (_qdq(False, scale=np.linspace(-0.1, 0.1, 32).astype(np.float32)), "not strictly positive"),
    (_qdq(False, block=True), None),  # a blocked int8 DQ: not this rule's pattern (scale is 2-D)
])
def test_declines_say_why(model, reason):
    if reason is None:  # build the blocked scale the DQ needs
        model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full((2, 32), 0.02, np.float32), "w_scale"))
        model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros((2, 32), np.int8), "w_zp"))
        reason = "not per output channel"
    fused, result = _fuse(model)
    assert result.stats["Int8WoGemmRule.declined"] == 1 and not result.modified
    assert reason in result.declined[0][1]
    assert [n.op_type for n in fused.graph.node] == ["DequantizeLinear", "MatMul"]
