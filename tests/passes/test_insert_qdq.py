import numpy as np
import onnx
import pytest
from passes_testlib import (export, fake_quant, graph_of, initializer, mlp_residual, op_types, parse, random, run,
                            with_initializers)

from qcompile.errors import PassError
from qcompile.passes import InsertQDQPass, activation_tensors, plan_quantization
from qcompile.recipes import load_recipe
from qcompile.recipes.schema import Recipe


def recipe(weight="channel", fmt="int8", placement=None, **rule):
    rule = {"ops": ["MatMul", "Gemm", "Conv"], "weight": {"format": fmt, "granularity": weight},
            "activation": {"format": fmt}, **rule}
    return Recipe.from_dict({"name": "t", "rules": [rule], "placement": placement or {}})


def matmul(k=32, n=16, w=None, rows="B"):
    m = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[{rows}, {k}] x) => (float[{rows}, {n}] y) {{ y = MatMul(x, w) }}""")
    return with_initializers(m, w=random((k, n), 1) if w is None else w)


def test_matmul_int8_per_channel_matches_oracle():
    model = matmul()
    graph = graph_of(model)
    result = InsertQDQPass(recipe(), {"x": 2.5})(graph)
    assert result.modified and result.stats["quantized_nodes"] == 1
    assert op_types(graph) == ["QuantizeLinear", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
    out = export(graph, model)
    x, w = random((4, 32), 7, 1.5), initializer(model, "w")
    (y,) = run(out, x=x)
    w_scale = np.abs(w).max(axis=0) / 127
    want = fake_quant(x, np.float32(2.5 / 127), "int8") @ fake_quant(w, w_scale, "int8", axis=1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_fp8_per_tensor_matches_oracle():
    model = matmul()
    graph = graph_of(model)
    InsertQDQPass(recipe("tensor", "fp8"), {"x": 3.0})(graph)
    out = export(graph, model)
    zps = [t for t in out.graph.initializer if "zero_point" in t.name]
    assert {t.data_type for t in zps} == {onnx.TensorProto.FLOAT8E4M3FN}
    x, w = random((4, 32), 3), initializer(model, "w")
    (y,) = run(out, x=x)
    want = fake_quant(x, np.float32(3.0 / 448), "fp8") @ fake_quant(w, np.float32(np.abs(w).max() / 448), "fp8")
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text, shape, axis, k, n", [
    ("y = Gemm <transB = 1> (x, w)", (16, 32), 0, 32, 16),
    ("y = Gemm (x, w)", (32, 16), 1, 32, 16),
])
def test_gemm_channel_axis(text, shape, axis, k, n):
    model = with_initializers(parse(f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x) => (float[B, 16] y) {{ {text} }}"""), w=random(shape))
    (t,) = plan_quantization(model, recipe())
    assert (t.axis, t.k, t.n, t.declined) == (axis, k, n, [])


def test_conv_axis_and_k():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[1, 8, 6, 6] x) => (float[1, 16, 4, 4] y) { y = Conv(x, w) }"""), w=random((16, 8, 3, 3)))
    (t,) = plan_quantization(model, recipe())
    assert (t.axis, t.k, t.n, t.declined) == (0, 72, 16, [])


def test_weight_behind_transpose_gets_qdq_on_the_constant():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x) => (float[B, 16] y) { wt = Transpose <perm = [1, 0]> (w)
                                                  y = MatMul(x, wt) }"""), w=random((16, 32)))
    (t,) = plan_quantization(model, recipe())
    assert (t.weight, t.axis) == ("w", 0)
    graph = graph_of(model)
    InsertQDQPass(recipe(), {"x": 2.0})(graph)
    assert op_types(graph) == ["QuantizeLinear", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear",
                               "Transpose", "MatMul"]
    assert next(n for n in graph.nodes if n.op == "Transpose").inputs[0].inputs[0].op == "DequantizeLinear"


def test_shared_activation_qdq_for_two_consumers():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x) => (float[B, 16] y, float[B, 16] z) { y = MatMul(x, w1)
                                                              z = MatMul(x, w2) }"""),
                              w1=random((32, 16), 1), w2=random((32, 16), 2))
    graph = graph_of(model)
    result = InsertQDQPass(recipe(), {"x": 2.0})(graph)
    assert result.stats["activation_qdq"] == 1 and result.stats["shared_activation_qdq"] == 1
    assert op_types(graph).count("QuantizeLinear") == 3
    run(export(graph, model), x=random((2, 32)))


def test_module_globs_select_nodes():
    model = mlp_residual()
    r = recipe(modules=["*.down_proj"])
    assert [t.node for t in plan_quantization(model, r)] == ["down_proj"]
    assert activation_tensors(plan_quantization(model, r)) == ["h2"]


def test_keep_leaves_residual_add_and_its_inputs_float():
    model = mlp_residual()
    graph = graph_of(model)
    InsertQDQPass(load_recipe("int8"), {"x": 3.0, "h2": 3.0})(graph)
    add = next(n for n in graph.nodes if n.name == "residual")
    assert [x.name for x in add.inputs] == ["h4", "x"]  # the skip input is the float x, not its DQ


@pytest.mark.parametrize("model, reason", [
    (matmul(n=1), "GEMV (N=1)"),
    (matmul(rows=1), "GEMV (M=1)"),
    (matmul(k=8), "K=8 < min_k=16"),
    (matmul(n=8), "N=8 < min_n=16"),
])
def test_placement_declines(model, reason):
    (t,) = plan_quantization(model, recipe())
    assert not t.quantized and any(reason in d for d in t.declined)
    assert activation_tensors([t]) == []
    graph = graph_of(model)
    result = InsertQDQPass(recipe(), {})(graph)
    assert not result.modified and op_types(graph) == ["MatMul"]
    assert any(reason in r for _, r in result.declined)


def test_decline_weight_not_constant():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x, float[32, 16] w) => (float[B, 16] y) { y = MatMul(x, w) }""")
    (t,) = plan_quantization(model, recipe())
    assert t.declined == ["weight 'w' is not constant"]


def test_decline_reshape_merges_channel_axis():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x) => (float[B, 16] y) { wr = Reshape(w, shape)
                                                  y = MatMul(x, wr) }"""),
                              w=random((32, 4, 4)), shape=np.array([32, 16], np.int64))
    (t,) = plan_quantization(model, recipe())
    assert any("merged or split" in d for d in t.declined)
    (t,) = plan_quantization(model, recipe("tensor"))  # per-tensor does not care
    assert t.quantized


def test_missing_amax_names_the_tensor():
    with pytest.raises(PassError, match="no amax for activation tensor 'x'"):
        InsertQDQPass(recipe(), {})(graph_of(matmul()))


def test_quantize_output():
    model = matmul()
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x) => (float[B, 16] z) { y = MatMul(x, w)
                                                  z = Relu(y) }""")
    model = with_initializers(model, w=random((32, 16)))
    r = recipe(placement={"quantize_output": True})
    assert activation_tensors(plan_quantization(model, r)) == ["x", "y"]
    graph = graph_of(model)
    InsertQDQPass(r, {"x": 2.0, "y": 4.0})(graph)
    assert op_types(graph)[-3:] == ["QuantizeLinear", "DequantizeLinear", "Relu"]


def conv_residual():
    """x -> Conv -> Relu -> Conv -> Add(., x): a ResNet basic block (stride 1, same padding)."""
    m = parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[1, 16, 6, 6] x) => (float[1, 16, 6, 6] y) {
            c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)
            r1 = Relu(c1)
            c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
            y = Add(c2, x) }""")
    for i, node in enumerate(m.graph.node):
        node.name = f"n{i}"
    return with_initializers(m, w1=random((16, 16, 3, 3), 1, 0.1), w2=random((16, 16, 3, 3), 2, 0.1),
                             b2=random(16, 3))


def test_residual_quantize_quantizes_the_skip_input():
    model = conv_residual()
    r = recipe(placement={"residual_add": "quantize"})
    targets = plan_quantization(model, r)
    assert [(t.node, t.kind, t.activation) for t in targets][-1] == ("n3", "residual", "x")
    assert activation_tensors(targets) == ["x", "r1"]
    graph = graph_of(model)
    result = InsertQDQPass(r, {"x": 3.0, "r1": 3.0})(graph)
    assert result.stats["residual_qdq"] == 1 and result.stats["shared_activation_qdq"] == 1
    add = next(n for n in graph.nodes if n.op == "Add")
    assert add.inputs[1].inputs[0].op == "DequantizeLinear" and add.inputs[0].name == "c2"
    (y,) = run(export(graph, model), x=random((1, 16, 6, 6), 5))
    assert np.isfinite(y).all()


def test_residual_keep_is_the_default():
    targets = plan_quantization(conv_residual(), recipe())
    assert [t.kind for t in targets] == ["gemm", "gemm"]
