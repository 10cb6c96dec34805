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


# ---------------------------------------------------------------- W4A8: FP8 activation Q/DQ folded into the node

def _w4a8_qdq(mode: str, x_scale: float = 0.02, k: int = 128):
    """The Q/DQ model of `_qdq` with an FP8 E4M3 activation Q/DQ in front of the MatMul, built by hand: static
    (constant scalar scale, E4M3 zero point) or dynamic per row (the in-graph scale of InsertQDQPass)."""
    model = _qdq(_model(True), True)
    g = model.graph
    mm = next(n for n in g.node if n.op_type == "MatMul")
    if mode == "static":
        g.initializer.extend([numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
                              helper.make_tensor("x_zp", TensorProto.FLOAT8E4M3FN, [], [0])])
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x_q"),
                 helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="x_dq")]
    else:
        g.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                              numpy_helper.from_array(np.array(448, np.float32), "qmax"),
                              numpy_helper.from_array(np.array(np.finfo(np.float32).tiny, np.float32), "tiny")])
        blocked = {"axis": -1, "block_size": k}
        nodes = [helper.make_node("Abs", ["x"], ["xa"]), helper.make_node("ReduceMax", ["xa", "axes"], ["am"], keepdims=1),
                 helper.make_node("Div", ["am", "qmax"], ["s0"]), helper.make_node("Max", ["s0", "tiny"], ["s"]),
                 helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="x_q",
                                  output_dtype=TensorProto.FLOAT8E4M3FN, **blocked),
                 helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="x_dq", **blocked)]
    mm.input[0] = "xd"
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fp8_activation_qdq_folds_into_the_node(mode):
    qdq = _w4a8_qdq(mode)
    graph = G.import_model(qdq)
    result = FuseInt4GemmPass().call(graph)
    graph.cleanup()
    fused = export_model(graph, like=qdq)
    onnx.checker.check_model(fused, full_check=True)
    assert result.stats["Int4GemmRule"] == 1
    assert [n.op_type for n in fused.graph.node] == ["Int4GroupwiseGemm"]  # activation Q/DQ (and scale) gone
    node = fused.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["act_quant"] == f"fp8_{mode}".encode() and attrs["plugin_version"] == b"2"
    assert node.input[0] == "x" and len(node.input) == (6 if mode == "static" else 5)
    x = (np.random.default_rng(7).standard_normal((2, 3, 128)) * 3).astype(np.float32)
    want = ort_session(qdq).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_session(fused).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    from qcompile.lowering import lower_onnx
    import torch

    got = lower_onnx(fused)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_other_activation_qdq_stays_in_front_of_a_weight_only_node():
    """An INT8 activation Q/DQ is no W4A8 form: the node fuses weight-only and reads the DQ output."""
    qdq = _w4a8_qdq("static")
    for t in qdq.graph.initializer:
        if t.name == "x_zp":
            t.CopyFrom(helper.make_tensor("x_zp", TensorProto.INT8, [], [0]))
    graph = G.import_model(qdq)
    FuseInt4GemmPass().call(graph)
    fused = export_model(graph, like=qdq)
    node = next(n for n in fused.graph.node if n.op_type == "Int4GroupwiseGemm")
    assert node.input[0] == "xd" and "act_quant" not in {a.name for a in node.attribute}
    x = np.random.default_rng(8).standard_normal((2, 3, 128)).astype(np.float32)
    np.testing.assert_allclose(ort_session(fused).run(None, {"x": x})[0], ort_session(qdq).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
