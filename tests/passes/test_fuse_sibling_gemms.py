"""FuseSiblingGemmsPass (`prepare_for_engine`): GEMMs that share their input become one wider GEMM + Split,
with the same outputs as the unfused graph (float64 numpy, ONNX Runtime with optimizations off, our lowering)."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.passes import _graph as G
from qcompile.passes.fuse_int4_gemm import FuseInt4GemmPass
from qcompile.passes.fuse_int8_wo_gemm import FuseInt8WoGemmPass
from qcompile.passes.insert_qdq import InsertQDQPass
from qcompile.passes.fold_weight_qdq import FoldWeightQDQPass
from qcompile.passes.pipeline import export_model, prepare_for_engine
from qcompile.passes.quantize_weights_int4 import QuantizeWeightsInt4Pass
from qcompile.recipes import load_recipe
from qcompile.recipes.schema import Recipe

K = 128
WIDTHS = {"q_proj": 64, "k_proj": 32, "v_proj": 32}


def _siblings_model(seed=0, bias=False, other_input=True, opset=21):
    """x -> three MatMuls (q/k/v, constant weights, optional bias Adds); and a fourth MatMul on Relu(x), which
    shares no input with them."""
    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], []
    for name, n in WIDTHS.items():
        w = (rng.standard_normal((K, n)) / np.sqrt(K)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_h" if bias else name], name=name))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{name}_b"))
            nodes.append(helper.make_node("Add", [f"{name}_h", f"{name}_b"], [name], name=f"{name}_bias"))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "s", n]))
    if other_input:
        inits.append(numpy_helper.from_array(rng.standard_normal((K, 16)).astype(np.float32), "o_w"))
        nodes += [helper.make_node("Relu", ["x"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", "o_w"], ["o"], name="o_proj")]
        outs.append(helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", "s", 16]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _x(seed=1):
    return np.random.default_rng(seed).standard_normal((2, 3, K)).astype(np.float32)


def _run(model, x):
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ort_session(model).run(names, {"x": x})))


def test_matmul_siblings_fuse_into_one_and_match_float64():
    model = _siblings_model()
    fused, result = prepare_for_engine(model)
    onnx.checker.check_model(fused, full_check=True)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1  # q/k/v in one; o_proj reads another tensor
    assert result.stats["FuseSiblingGemmsPass.fused_nodes"] == 3 and result.stats["FuseSiblingGemmsPass.groups"] == 1
    wide = next(n for n in fused.graph.node if n.op_type == "MatMul" and n.input[0] == "x")
    w = {i.name: numpy_helper.to_array(i) for i in fused.graph.initializer}[wide.input[1]]
    assert w.shape == (K, sum(WIDTHS.values()))
    x = _x()
    got = _run(fused, x)
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    for name in WIDTHS:
        np.testing.assert_allclose(got[name], x.astype(np.float64) @ weights[f"{name}_w"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["o"], np.maximum(x, 0).astype(np.float64) @ weights["o_w"], rtol=1e-5, atol=1e-5)


def _plugin_model(kind: str, symmetric: bool = True):
    """The siblings model (with biases) quantized and fused into weight-only plugin nodes: (Q/DQ, plugin)."""
    model = _siblings_model(bias=True, other_input=False)
    if kind == "int4":
        recipe = Recipe.from_dict({"name": "w4", "rules": [{"ops": ["MatMul"], "weight": {
            "format": "int4", "granularity": "group", "group_size": 32, "symmetric": symmetric}}]})
        qdq_passes, fuse = [QuantizeWeightsInt4Pass(recipe)], FuseInt4GemmPass()
    else:
        recipe = load_recipe("w8a16")
        qdq_passes, fuse = [InsertQDQPass(recipe, {}), FoldWeightQDQPass()], FuseInt8WoGemmPass()
    graph = G.import_model(model)
    for p in qdq_passes:
        p.call(graph)
    qdq = export_model(graph, like=model)
    graph = G.import_model(qdq)
    fuse.call(graph)
    return qdq, export_model(graph, like=qdq)


@pytest.mark.parametrize("kind, symmetric", [("int4", True), ("int4", False), ("int8", True)])
def test_plugin_siblings_fuse_and_match_the_qdq_graph(kind, symmetric):
    """Weight-only plugin nodes (with bias, and INT4 zero points) fused: ONNX Runtime runs the fused graph's
    function bodies, and our lowering runs its torch ops, both like the portable Q/DQ graph in ONNX Runtime."""
    from qcompile.lowering import lower_onnx

    qdq, plugin = _plugin_model(kind, symmetric)
    op = "Int4GroupwiseGemm" if kind == "int4" else "Int8WeightOnlyGemm"
    assert [n.op_type for n in plugin.graph.node].count(op) == 3
    fused, result = prepare_for_engine(plugin)
    onnx.checker.check_model(fused)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count(op) == 1 and ops.count("Split") == 1, ops
    x = _x(2)
    want = _run(qdq, x)
    got = _run(fused, x)
    lowered = lower_onnx(fused)(torch.from_numpy(x))
    for i, name in enumerate(WIDTHS):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lowered[i].numpy(), want[name], rtol=1e-4, atol=1e-4)


def test_siblings_of_different_forms_stay_apart():
    """An INT4 node and FP MatMuls on the same input, INT4 nodes with different group sizes, and a MatMul whose
    weight is computed in the graph: nothing fuses."""
    model = _siblings_model(other_input=False)
    extra = [helper.make_node("Transpose", ["q_proj_w"], ["wt"], perm=[1, 0], name="t"),
             helper.make_node("Transpose", ["wt"], ["w_computed"], perm=[1, 0], name="t2"),
             helper.make_node("MatMul", ["x", "w_computed"], ["c"], name="computed")]
    model.graph.node.extend(extra)
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["b", "s", 64]))
    recipe = Recipe.from_dict({"name": "w4", "rules": [
        {"ops": ["MatMul"], "names": ["q_proj"], "weight": {"format": "int4", "granularity": "group",
                                                             "group_size": 32}},
        {"ops": ["MatMul"], "names": ["k_proj"], "weight": {"format": "int4", "granularity": "group",
                                                             "group_size": 64}}]})
    graph = G.import_model(model)
    QuantizeWeightsInt4Pass(recipe).call(graph)
    FuseInt4GemmPass().call(graph)
    plugin = export_model(graph, like=model)
    assert [n.op_type for n in plugin.graph.node].count("Int4GroupwiseGemm") == 2
    fused, result = prepare_for_engine(plugin)
    assert result.stats["FuseSiblingGemmsPass.groups"] == 0
    assert "Split" not in [n.op_type for n in fused.graph.node]


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_siblings_fuse_when_their_global_scales_agree(fmt):
    """MXFP4 nodes (global scale 1.0) fuse, and so do NVFP4 ones (siblings are quantized with one global scale); the
    fused graph lowered in float64 matches ONNX's reference evaluator on the portable Q/DQ graph."""
    from onnx.reference import ReferenceEvaluator

    from qcompile.lowering import lower_onnx
    from qcompile.passes.fuse_fp4_gemm import FuseFp4GemmPass
    from qcompile.passes.quantize_weights_fp4 import QuantizeWeightsFp4Pass

    model = _siblings_model(bias=True, other_input=False, opset=23)
    recipe = Recipe.from_dict({"name": "t", "opset": 23, "rules": [{"ops": ["MatMul"], "weight": {
        "format": fmt, "granularity": "group", "group_size": 16 if fmt == "nvfp4" else 32}}],
        "placement": {"min_k": 16, "min_n": 16, "skip_gemv": False}})
    graph = G.import_model(model)
    QuantizeWeightsFp4Pass(recipe, {}).call(graph)
    qdq = export_model(graph, like=model, opset=23)
    graph = G.import_model(qdq)
    FuseFp4GemmPass().call(graph)
    graph.cleanup()
    plugin = export_model(graph, like=qdq)
    assert [n.op_type for n in plugin.graph.node].count("Fp4Gemm") == 3
    fused, result = prepare_for_engine(plugin)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Fp4Gemm") == 1 and ops.count("Split") == 1, ops
    x = _x(3)
    want = ReferenceEvaluator(qdq).run(None, {"x": x})
    got = lower_onnx(fused, compute_dtype=torch.float64)(torch.from_numpy(x).double())
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)


def test_w4a4_siblings_share_their_global_scales_and_fuse():
    """W4A4 (nvfp4) layers on one x get one weight global scale (the group's largest amax) and read one quantized
    activation, so the engine fuses them into one Fp4GemmW4A4; lowered in float64 the fused graph gives each
    sibling's output as the unfused plugin graph does."""
    from qcompile.lowering import lower_onnx
    from qcompile.passes.fuse_fp4_gemm import FuseFp4GemmPass
    from qcompile.passes.quantize_weights_fp4 import QuantizeWeightsFp4Pass

    model = _siblings_model(bias=True, opset=23)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    recipe = Recipe.from_dict({"name": "t", "opset": 23, "rules": [{"ops": ["MatMul"], "weight": {
        "format": "nvfp4", "granularity": "group", "group_size": 16}, "activation": {
        "format": "nvfp4", "granularity": "group", "group_size": 16, "mode": "static"}}],
        "placement": {"min_k": 16, "min_n": 16, "skip_gemv": False}})
    graph = G.import_model(model)
    QuantizeWeightsFp4Pass(recipe, {"x": 4.0, "r": 3.0}).call(graph)
    qdq = export_model(graph, like=model, opset=23)
    globals_ = {t.name: float(numpy_helper.to_array(t)) for t in qdq.graph.initializer
                if t.name.endswith("_w_global_scale")}
    group = max(np.abs(weights[f"{n}_w"]).max() for n in WIDTHS) / (6 * 448)
    assert all(np.isclose(globals_[f"{n}_w_global_scale"], group, rtol=1e-6) for n in WIDTHS)
    assert np.isclose(globals_["o_w_global_scale"], np.abs(weights["o_w"]).max() / (6 * 448), rtol=1e-6)
    graph = G.import_model(qdq)
    FuseFp4GemmPass().call(graph)
    graph.cleanup()
    plugin = export_model(graph, like=qdq)
    assert [n.op_type for n in plugin.graph.node].count("Fp4GemmW4A4") == 4
    fused, result = prepare_for_engine(plugin, attention=False)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("Fp4GemmW4A4") == 2 and ops.count("Split") == 1, ops  # q/k/v as one; o_proj apart
    x = torch.from_numpy(_x(5)).double()
    want = lower_onnx(plugin, compute_dtype=torch.float64)(x)
    got = lower_onnx(fused, compute_dtype=torch.float64)(x)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-12, atol=1e-12)


def test_nvfp4_siblings_share_one_global_scale_from_the_largest_amax():
    """Weight-only NVFP4 layers reading the same x are quantized with one global scale, amax / (6 * 448) of the
    group's largest weight (k_proj's, 8x; v_proj's 1/4); o_proj, on another input, keeps its own. Each sibling's
    output stays within NVFP4's usual error of its float output (ONNX's reference evaluator on the portable graph)."""
    from onnx.reference import ReferenceEvaluator

    from qcompile.passes.quantize_weights_fp4 import QuantizeWeightsFp4Pass

    model = _siblings_model(opset=23)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, factor in (("k_proj_w", 8.0), ("v_proj_w", 0.25)):
        weights[name] = weights[name] * np.float32(factor)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    recipe = Recipe.from_dict({"name": "t", "opset": 23, "rules": [{"ops": ["MatMul"], "weight": {
        "format": "nvfp4", "granularity": "group", "group_size": 16}}],
        "placement": {"min_k": 16, "min_n": 16, "skip_gemv": False}})
    graph = G.import_model(model)
    QuantizeWeightsFp4Pass(recipe, {}).call(graph)
    qdq = export_model(graph, like=model, opset=23)
    globals_ = {t.name: float(numpy_helper.to_array(t)) for t in qdq.graph.initializer if "global_scale" in t.name}
    group = max(np.abs(weights[f"{n}_w"]).max() for n in WIDTHS) / (6 * 448)
    assert sorted(globals_) == sorted(f"{w}_global_scale" for w in weights)  # one per weight
    assert all(np.isclose(globals_[f"{n}_w_global_scale"], group, rtol=1e-6) for n in WIDTHS)
    assert np.isclose(globals_["o_w_global_scale"], np.abs(weights["o_w"]).max() / (6 * 448), rtol=1e-6)
    x = _x(4)
    got = dict(zip([o.name for o in qdq.graph.output], ReferenceEvaluator(qdq).run(None, {"x": x})))
    for n in WIDTHS:
        want = x @ weights[f"{n}_w"]
        assert np.linalg.norm(got[n] - want) / np.linalg.norm(want) < 0.12, n
