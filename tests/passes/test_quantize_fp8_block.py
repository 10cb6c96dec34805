"""QuantizeFp8BlockPass + FuseFp8BlockGemmPass: FP32 MatMul -> portable FP8 block Q/DQ (runs in ONNX Runtime,
checked against a float64 numpy block quantization) -> qcompile::Fp8BlockGemm (same numbers in ONNX Runtime)."""
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.passes import _graph as G
from qcompile.passes.fuse_fp8_block_gemm import FuseFp8BlockGemmPass
from qcompile.passes.pipeline import export_model
from qcompile.passes.quantize_fp8_block import QuantizeFp8BlockPass
from qcompile.recipes.schema import Recipe

RULE = {"ops": ["MatMul"], "weight": {"format": "fp8", "granularity": "block", "block": [128, 128]},
        "activation": {"format": "fp8", "granularity": "block", "block": [1, 128], "mode": "dynamic"}}


def _model(k=256, n=384, second=True):
    """x -> {MatMul(x, W1) + b, MatMul(x, W2)}: two GEMMs sharing one activation."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((k, 128)).astype(np.float32) * 0.1, "w2"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
             helper.make_node("Add", ["h", "b"], ["y"], name="bias_add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])]
    if second:
        nodes.append(helper.make_node("MatMul", ["x", "w2"], ["z"], name="gate"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "s", 128]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(model, passes):
    graph = G.import_model(model)
    results = [p.call(graph) for p in passes]
    return export_model(graph, like=model), results


def _np_blocks(a, rows):
    r, c = a.shape
    b = a.reshape(r // rows, rows, c // 128, 128)
    s = np.maximum(np.abs(b).max(axis=(1, 3)) / 448.0, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(b / s[:, None, :, None], -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (q * s[:, None, :, None]).reshape(r, c)


def test_portable_qdq_runs_in_ort_and_matches_float64_block_quantization():
    model = _model()
    recipe = Recipe.from_dict({"name": "fp8b", "rules": [RULE]})
    qdq, (result,) = _run(model, [QuantizeFp8BlockPass(recipe)])
    onnx.checker.check_model(qdq, full_check=True)
    assert result.stats["quantized"] == 2 and result.stats["dynamic_activation_qdq"] == 1  # shared activation Q/DQ
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 3
    x = (np.random.default_rng(1).standard_normal((2, 3, 256)) * np.array([1e-3, 50.0]).repeat(128)).astype(np.float32)
    y, z = ort_session(qdq).run(None, {"x": x})
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xd = _np_blocks(x.reshape(-1, 256).astype(np.float64), 1)
    want_y = xd @ _np_blocks(inits["w1"].T.astype(np.float64), 128).T + inits["b"]
    np.testing.assert_allclose(y.reshape(-1, 384), want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max())
    want_z = xd @ _np_blocks(inits["w2"].T.astype(np.float64), 128).T
    np.testing.assert_allclose(z.reshape(-1, 128), want_z, rtol=1e-5, atol=1e-5 * np.abs(want_z).max())

    fused, (fres,) = _run(qdq, [FuseFp8BlockGemmPass()])
    onnx.checker.check_model(fused, full_check=True)
    assert fres.stats["Fp8BlockGemmRule"] == 2
    assert sorted(n.op_type for n in fused.graph.node) == ["Fp8BlockGemm", "Fp8BlockGemm"]  # Q/DQ chain is gone
    for got, want in zip(ort_session(fused).run(None, {"x": x}), (y, z)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("change, reason", [
    ({"weight": {"format": "fp8", "granularity": "block", "block": [64, 128]}}, "not [128, 128]"),
    ({"activation": {"format": "fp8", "granularity": "token", "mode": "dynamic"}}, "block [1, 128]"),
])
def test_pass_declines_say_why(change, reason):
    recipe = Recipe.from_dict({"name": "fp8b", "rules": [RULE | change]})
    _, (result,) = _run(_model(second=False), [QuantizeFp8BlockPass(recipe)])
    assert not result.modified and reason in result.declined[0][1]


def test_k_not_a_multiple_of_128_is_declined():
    recipe = Recipe.from_dict({"name": "fp8b", "rules": [RULE]})
    _, (result,) = _run(_model(k=200, second=False), [QuantizeFp8BlockPass(recipe)])
    assert not result.modified and "K=200" in result.declined[0][1]


def test_fusion_declines_an_activation_quantized_otherwise():
    recipe = Recipe.from_dict({"name": "fp8b", "rules": [RULE]})
    qdq, _ = _run(_model(second=False), [QuantizeFp8BlockPass(recipe)])
    div = next(n for n in qdq.graph.node if n.op_type == "Div")
    qmax = next(t for t in qdq.graph.initializer if t.name == div.input[1])
    qmax.CopyFrom(numpy_helper.from_array(np.array(400.0, np.float32), qmax.name))  # not the FP8 max
    _, (result,) = _run(qdq, [FuseFp8BlockGemmPass()])
    assert not result.modified and "activation is not the dynamic 1x128" in result.declined[0][1]
