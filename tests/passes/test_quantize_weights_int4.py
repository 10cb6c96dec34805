"""QuantizeWeightsInt4Pass: FP MatMul weights -> pre-quantized INT4 + block DequantizeLinear (opset 21)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.passes import _graph as G
from qcompile.passes.quantize_weights_int4 import QuantizeWeightsInt4Pass
from qcompile.recipes.schema import Recipe


def _recipe(group_size=64, symmetric=True, exclude=()):
    weight = {"format": "int4", "granularity": "group", "group_size": group_size, "symmetric": symmetric}
    return Recipe.from_dict({"name": "w4", "rules": [{"ops": ["MatMul"], "exclude": list(exclude), "weight": weight}]})


def _model(k=256, n=48, seed=0):
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((n, 40)).astype(np.float32), "w2")  # K=48: not a multiple of 64
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 40])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run_pass(model, recipe):
    graph = G.import_model(model)
    result = QuantizeWeightsInt4Pass(recipe).call(graph)
    from qcompile.passes.pipeline import export_model

    return export_model(result.graph, like=model), result


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_weights_run_in_ort_and_match_float64(group_size, symmetric):
    model = _model()
    out, result = _run_pass(model, _recipe(group_size, symmetric))
    onnx.checker.check_model(out, full_check=True)
    assert result.stats["quantized"] == 1 and result.declined == [("fc2", "K=48 is not a multiple of the group size "
                                                                          f"{group_size}")]
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": group_size}
    inits = {i.name: i for i in out.graph.initializer}
    w_q = numpy_helper.to_array(inits[dq.input[0]])
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    assert inits[dq.input[0]].data_type == (TensorProto.INT4 if symmetric else TensorProto.UINT4)
    assert w_q.shape == (256, 48) and scale.shape == (256 // group_size, 48)
    # independent float64 reconstruction of the weight, and the error bound of round-to-nearest
    q = w_q.astype(np.float64).reshape(-1, group_size, 48)
    if not symmetric:
        q = q - numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)[:, None, :]
    w_hat = (q * scale[:, None, :]).reshape(256, 48)
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1")).astype(np.float64)
    assert np.all(np.abs(w_hat - w) <= np.repeat(scale, group_size, axis=0) / 2 + 1e-6)
    x = np.random.default_rng(9).standard_normal((5, 256)).astype(np.float32)
    w2 = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    want = np.maximum(x.astype(np.float64) @ w_hat, 0) @ w2
    got = ort_session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_excluded_and_nonconstant_weights_are_left_alone():
    model = _model()
    out, result = _run_pass(model, _recipe(64, exclude=["fc1"]))
    assert result.stats["quantized"] == 0 and not any(n.op_type == "DequantizeLinear" for n in out.graph.node)
    dyn = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])]), opset_imports=[helper.make_opsetid("", 21)])
    _, result = _run_pass(dyn, _recipe(64))
    assert result.declined and "not a constant" in result.declined[0][1]
