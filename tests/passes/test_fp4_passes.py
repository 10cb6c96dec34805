"""QuantizeWeightsFp4Pass and FuseFp4GemmPass on a small graph: TensorRT's FP4 ONNX forms (exact op lists),
numerics of the portable graph in our float64 lowering vs ONNX's reference evaluator (with a float64 numpy
TRT_FP4DynamicQuantize), the fused plugin graph vs the portable one, and one negative test per reason."""
import ml_dtypes
import numpy as np
import onnx
import onnx.inliner
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qcompile.errors import PassError
from qcompile.lowering import lower_onnx
from qcompile.passes import _graph as G
from qcompile.passes.fuse_fp4_gemm import FuseFp4GemmPass
from qcompile.passes.pipeline import export_model
from qcompile.passes.quantize_weights_fp4 import QuantizeWeightsFp4Pass, fp4_activation_tensors
from qcompile.plugins.fp4_gemm import onnx_schema
from qcompile.recipes.schema import Recipe

K, N = 64, 32
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def _np_e2m1(y):
    """float64 cast to E2M1: nearest grid value, ties to the even code, saturating at 6."""
    mag = np.minimum(np.abs(y), 6.0)
    d = np.abs(mag[..., None] - E2M1)
    tie = (d == d.min(-1, keepdims=True))
    idx = np.where(tie.sum(-1) > 1, np.argmax(tie & (np.arange(8) % 2 == 0), -1), np.argmin(d, -1))
    return np.sign(y) * E2M1[idx]


class TRT_FP4DynamicQuantize(OpRun):
    """float64 numpy TRT_FP4DynamicQuantize for ONNX's reference evaluator (values, E4M3 block scales)."""

    op_domain = "trt"

    def _run(self, x, g, axis=-1, block_size=16, scale_type=None):
        g = np.float32(np.asarray(g).reshape(()))
        xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, block_size)
        sx = (np.abs(xb).max(-1) / 6 / g).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
        eff = sx.astype(np.float32) * g
        safe = np.where(eff > 0, eff, 1).astype(np.float32)
        q = np.where(eff[..., None] > 0, _np_e2m1((xb.astype(np.float32) / safe[..., None]).astype(np.float64)), 0)
        return q.reshape(x.shape).astype(ml_dtypes.float4_e2m1fn), sx


def _model(w_dtype=np.float32):
    w = (np.random.default_rng(0).standard_normal((K, N)) * 0.1).astype(w_dtype)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [2, 3, K])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 3, N])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _recipe(fmt, act=False, min_k=16):
    rule = {"ops": ["MatMul"], "weight": {"format": fmt, "granularity": "group", "group_size": 16 if fmt == "nvfp4" else 32}}
    if act:
        rule["activation"] = {"format": "nvfp4", "granularity": "group", "group_size": 16}
    return Recipe.from_dict({"name": "t", "description": "", "opset": 23, "rules": [rule],
                             "placement": {"min_k": min_k, "min_n": 16, "skip_gemv": False}})


def _quantize(fmt, act=False, amax=None, **kw):
    m = _model()
    result = QuantizeWeightsFp4Pass(_recipe(fmt, act, **kw), {"x": 3.0} if amax is None else amax).call(G.import_model(m))
    return export_model(result.graph, like=m, opset=23), result


X = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)

FORMS = {
    ("nvfp4", False): ["DequantizeLinear", "DequantizeLinear", "Transpose", "MatMul"],
    ("mxfp4", False): ["DequantizeLinear", "Transpose", "MatMul"],
    ("nvfp4", True): ["TRT_FP4DynamicQuantize", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear",
                      "DequantizeLinear", "Transpose", "MatMul"],
}


@pytest.mark.parametrize("fmt,act", list(FORMS))
def test_portable_form_and_numerics_vs_reference_evaluator(fmt, act):
    q, result = _quantize(fmt, act)
    assert result.modified and sorted(n.op_type for n in q.graph.node) == sorted(FORMS[(fmt, act)])
    onnx.checker.check_model(q, full_check=True)
    assert not any("FP4QDQ" in n.op_type for n in q.graph.node)
    inits = {t.name: t for t in q.graph.initializer}
    w_dq = next(n for n in q.graph.node if n.name == "mm/weight_dq")
    assert inits[w_dq.input[0]].data_type == T.FLOAT4E2M1 and list(inits[w_dq.input[0]].dims) == [N, K]
    assert {a.name: helper.get_attribute_value(a) for a in w_dq.attribute} == \
        {"axis": -1, "block_size": 16 if fmt == "nvfp4" else 32}
    if fmt == "nvfp4":
        s_dq = next(n for n in q.graph.node if n.output[0] == w_dq.input[1])
        assert inits[s_dq.input[0]].data_type == T.FLOAT8E4M3FN and list(inits[s_dq.input[0]].dims) == [N, K // 16]
    want = ReferenceEvaluator(q, new_ops=[TRT_FP4DynamicQuantize]).run(None, {"x": X})[0]
    got = lower_onnx(q, compute_dtype=torch.float64)(torch.from_numpy(X).double())[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    exact = X @ numpy_helper.to_array(_model().graph.initializer[0])
    assert np.abs(got - exact).max() < 0.2 * np.abs(exact).max()  # 4-bit, but the right answer


@pytest.mark.parametrize("fmt,act", list(FORMS))
def test_fusion_to_plugin_nodes_matches_the_portable_graph(fmt, act):
    q, _ = _quantize(fmt, act)
    graph = G.import_model(q)
    result = FuseFp4GemmPass().call(graph)
    graph.cleanup()
    fused = export_model(graph, like=q)
    assert [n.op_type for n in fused.graph.node] == [onnx_schema.OP_TYPE_W4A4 if act else onnx_schema.OP_TYPE]
    assert result.modified and {(f.domain, f.name) for f in fused.functions} >= {("qcompile", "Fp4Gemm")}
    onnx.checker.check_model(fused)
    want = lower_onnx(q, compute_dtype=torch.float64)(torch.from_numpy(X).double())[0].numpy()
    got = lower_onnx(fused)(torch.from_numpy(X))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the function body is the same math (the reference evaluator wants trailing optional inputs spelled out)
    padded = onnx.ModelProto()
    padded.CopyFrom(fused)
    node = padded.graph.node[0]
    node.input.extend([""] * (len(onnx_schema.INPUTS_W4A4 if act else onnx_schema.INPUTS) - len(node.input)))
    inlined = onnx.inliner.inline_local_functions(padded)
    body = ReferenceEvaluator(inlined, new_ops=[TRT_FP4DynamicQuantize]).run(None, {"x": X})[0]
    np.testing.assert_allclose(body, want, rtol=1e-5, atol=1e-6)


def test_engine_holds_only_packed_weights():
    q, _ = _quantize("nvfp4")
    graph = G.import_model(q)
    FuseFp4GemmPass().call(graph)
    program = lower_onnx(export_model(graph, like=q))
    dtypes = sorted(str(b.dtype) for b in program.buffers())
    assert "torch.uint8" in dtypes and "torch.float8_e4m3fn" in dtypes
    assert max(b.numel() for b in program.buffers() if b.dtype == torch.uint8) == N * K // 2


def test_declines_and_errors():
    _, result = _quantize("mxfp4", min_k=128)
    assert not result.modified and "K=64 < min_k=128" in result.declined[0][1]
    with pytest.raises(PassError, match="no amax for activation tensor 'x'"):
        _quantize("nvfp4", act=True, amax={})
    assert fp4_activation_tensors(_model(), _recipe("nvfp4", act=True)) == ["x"]
    assert fp4_activation_tensors(_model(), _recipe("nvfp4")) == []


def test_fusion_declines_a_non_transposing_perm():
    q, _ = _quantize("nvfp4")
    t = next(n for n in q.graph.node if n.op_type == "Transpose")
    t.attribute[0].CopyFrom(helper.make_attribute("perm", [0, 1]))
    result = FuseFp4GemmPass().call(G.import_model(q))
    assert not result.modified and "perm=[1, 0]" in result.declined[0][1]
