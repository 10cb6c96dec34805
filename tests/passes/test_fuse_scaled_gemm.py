import ml_dtypes
import numpy as np
import pytest
from passes_testlib import export, graph_of, op_types, parse, random, run, with_initializers

from qcompile.passes import FuseScaledGemmPass

RNG = np.random.default_rng(0)


def qdq_gemm(gemm="h = MatMul(xd, wd)\n y = Add(h, b)", w_shape=(32, 16), w_axis=1, s_len=16,
             x_fmt=np.int8, w_fmt=np.int8, sx=np.array(0.02, np.float32), inputs="", x_axis=1, outputs="y"):
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x{inputs}) => ({', '.join(f'float[B, 16] {o}' for o in outputs.split(','))}) {{
            xq = QuantizeLinear <axis = {x_axis}> (x, sx, zx)
            xd = DequantizeLinear <axis = {x_axis}> (xq, sx, zx)
            wd = DequantizeLinear <axis = {w_axis}> (wq, sw, zw)
            {gemm} }}""")
    arrays = {"sx": sx, "zx": np.zeros(sx.shape, x_fmt), "b": random(16, 5), "c": random((1, 16), 6)}
    arrays["wq"] = RNG.integers(-100, 100, w_shape).astype(np.float32).astype(w_fmt)
    if "sw" not in inputs:
        sw = (0.01 + 0.01 * RNG.random(max(s_len, 1))).astype(np.float32)
        arrays["sw"] = sw.reshape(() if s_len == 0 else (s_len,))
    arrays["zw"] = np.zeros(arrays["sw"].shape if "sw" in arrays else (s_len,), w_fmt)
    return with_initializers(model, **arrays)


def fuse(model):
    graph = graph_of(model)
    result = FuseScaledGemmPass()(graph)
    return graph, result


def check_equal(model, graph, **extra):
    x = random((4, 32), 9)
    got = run(export(graph, model), x=x, **extra)
    want = run(model, x=x, **extra)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", [np.int8, ml_dtypes.float8_e4m3fn])
def test_matmul_bias_fuses(fmt):
    model = qdq_gemm(x_fmt=fmt, w_fmt=fmt)
    graph, result = fuse(model)
    assert result.modified and result.stats["ScaledGemmRule"] == 1
    assert op_types(graph) == ["ScaledGemm"]
    node = graph.nodes[0]
    assert node.domain == "qcompile" and node.attrs["plugin_namespace"] == "qcompile"
    assert tuple(node.inputs[3].shape) == (16, 32) and node.outputs[0].name == "y"
    check_equal(model, graph)


def test_per_tensor_weight_and_no_bias():
    model = qdq_gemm(gemm="y = MatMul(xd, wd)", s_len=0)
    graph, result = fuse(model)
    assert op_types(graph) == ["ScaledGemm"]
    assert not graph.nodes[0].inputs[5].values.any()  # zero bias
    check_equal(model, graph)


def test_gemm_transb_alpha_beta():
    model = qdq_gemm(gemm="y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (xd, wd, c)", w_shape=(16, 32), w_axis=0)
    graph, result = fuse(model)
    assert op_types(graph) == ["ScaledGemm"]
    check_equal(model, graph)


def test_shared_activation_keeps_its_qdq():
    model = qdq_gemm(gemm="y = MatMul(xd, wd)\n z = Relu(xd)", outputs="y")
    model.graph.output.append(model.graph.output[0])
    model.graph.output[1].name = "z"
    model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 32
    graph, _ = fuse(model)
    assert sorted(op_types(graph)) == ["DequantizeLinear", "QuantizeLinear", "Relu", "ScaledGemm"]
    check_equal(model, graph)


@pytest.mark.parametrize("kwargs, reason", [
    ({"inputs": ", float[16] sw"}, "weight scale is not constant"),
    ({"sx": np.full(32, 0.02, np.float32)}, "activation scale is not per-tensor"),
    ({"w_axis": 0, "s_len": 32}, "weight scale [32] is not per-tensor or per-channel along N (axis=1)"),
    ({"w_fmt": ml_dtypes.float8_e4m3fn}, "activation format int8 and weight format fp8 differ"),
    ({"w_shape": (2, 32, 16), "w_axis": 2, "gemm": "y = MatMul(xd, wd)"}, "MatMul weight rank is 3, expected 2"),
    ({"gemm": "y = MatMul(x, wd)"}, "activation is not quantized (weight-only GEMM)"),
])
def test_declines(kwargs, reason):
    model = qdq_gemm(**kwargs)
    graph, result = fuse(model)
    assert not result.modified and "ScaledGemm" not in op_types(graph)
    assert [r for _, r in result.declined] == [f"ScaledGemmRule: {reason}"]
