"""FuseInt4GemmPass: block-DQ(int4) -> MatMul (+ bias Add) -> qcompile::Int4GroupwiseGemm, checked in ONNX Runtime."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.passes import _graph as G
from qcompile.passes.fuse_int4_gemm import FuseInt4GemmPass
from qcompile.passes.pipeline import export_model
from qcompile.passes.quantize_weights_int4 import QuantizeWeightsInt4Pass
from qcompile.recipes.schema import Recipe


def _model(with_bias: bool, k=128, n=32):
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if with_bias else "y"], name="proj")]
    if with_bias:
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="bias_add"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _qdq(model, symmetric):
    recipe = Recipe.from_dict({"name": "w4", "rules": [{"ops": ["MatMul"], "weight": {
        "format": "int4", "granularity": "group", "group_size": 32, "symmetric": symmetric}}]})
    graph = G.import_model(model)
    QuantizeWeightsInt4Pass(recipe).call(graph)
    return export_model(graph, like=model)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_node_runs_in_ort_like_the_qdq_graph(with_bias, symmetric):
    qdq = _qdq(_model(with_bias), symmetric)
    graph = G.import_model(qdq)
    result = FuseInt4GemmPass().call(graph)
    fused = export_model(graph, like=qdq)
    onnx.checker.check_model(fused, full_check=True)
    assert result.stats["Int4GemmRule"] == 1
    assert [n.op_type for n in fused.graph.node] == ["Int4GroupwiseGemm"]  # DQ, MatMul and the bias Add are gone
    node = fused.graph.node[0]
    assert node.name == "proj" and node.output[0] == "y" and node.domain == "qcompile"
    assert len(node.input) == (5 if with_bias else 4) and (node.input[3] != "") == (not symmetric)
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["block_size"] == 32
    x = np.random.default_rng(6).standard_normal((2, 3, 128)).astype(np.float32)
    want = ort_session(qdq).run(None, {"x": x})[0]
    got = ort_session(fused).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unblocked_dequantize_is_declined():
    model = _qdq(_model(False), True)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 1
    graph = G.import_model(model)
    result = FuseInt4GemmPass().call(graph)
    assert not result.modified and "not blocked along K" in result.declined[0][1]
