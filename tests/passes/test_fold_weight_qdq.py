import ml_dtypes
import numpy as np
from passes_testlib import export, graph_of, initializer, op_types, parse, random, run, with_initializers

from qcompile.passes import FoldWeightQDQPass


def weight_qdq(zp, scale, axis=1, scale_input="s"):
    """x @ DQ(Q(W)) with W a float constant."""
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x{', float[16] s' if scale_input == 'input' else ''}) => (float[B, 16] y) {{
            wq = QuantizeLinear <axis = {axis}> (w, s, zp)
            wd = DequantizeLinear <axis = {axis}> (wq, s, zp)
            y = MatMul(x, wd) }}""")
    arrays = {"w": random((32, 16), 1), "zp": zp}
    if scale_input != "input":
        arrays["s"] = scale
    return with_initializers(model, **arrays)


def test_fold_int8_per_channel_shrinks_and_matches():
    s = (np.abs(random((32, 16), 1)).max(axis=0) / 127).astype(np.float32)
    model = weight_qdq(np.zeros(16, np.int8), s)
    graph = graph_of(model)
    result = FoldWeightQDQPass()(graph)
    assert result.modified and result.stats["folded"] == 1 and result.stats["bytes_saved"] == 32 * 16 * 3
    assert op_types(graph) == ["DequantizeLinear", "MatMul"]
    out = export(graph, model)
    assert initializer(out, "w_int8").dtype == np.int8
    assert not any(t.name == "w" for t in out.graph.initializer)
    x = random((4, 32), 2)
    np.testing.assert_array_equal(run(out, x=x)[0], run(model, x=x)[0])


def test_fold_fp8_per_tensor_matches():
    model = weight_qdq(np.array(0, ml_dtypes.float8_e4m3fn), np.array(0.004, np.float32))
    graph = graph_of(model)
    assert FoldWeightQDQPass()(graph).modified
    out = export(graph, model)
    assert initializer(out, "w_fp8").dtype == ml_dtypes.float8_e4m3fn
    x = random((4, 32), 2)
    np.testing.assert_array_equal(run(out, x=x)[0], run(model, x=x)[0])


def test_decline_scale_not_constant():
    model = weight_qdq(np.zeros(16, np.int8), None, scale_input="input")
    result = FoldWeightQDQPass()(graph_of(model))
    assert not result.modified and result.declined[0][1] == "weight scale is not constant"


def test_decline_nonzero_zero_point():
    model = weight_qdq(np.ones(16, np.int8), np.full(16, 0.01, np.float32))
    result = FoldWeightQDQPass()(graph_of(model))
    assert not result.modified and "zero point is not zero" in result.declined[0][1]
