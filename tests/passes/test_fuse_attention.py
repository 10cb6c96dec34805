"""FuseAttentionPass (`prepare_for_engine`): softmax attention written out becomes one
`qcompile::ScaledDotProductAttention` node, whose lowering (torch's fused attention) gives the outputs ONNX Runtime
(optimizations off) gives for the unfused graph; the forms it must leave alone stay as they are."""
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.lowering import lower_onnx
from qcompile.passes.pipeline import prepare_for_engine

B, H, L, S, E = 2, 3, 5, 7, 8


def _attention_model(scale_op="Div", mask="add", q_factor=None, k_factor=None, axis=-1, extra_output=None,
                     q_rank=4, opset=21):
    """Q [B, H, L, E], K [B, H, S, E], V [B, H, S, E] -> Softmax(Q K^T / sqrt(E) + mask) V, written out in ONNX ops.
    `scale_op`: "Div" by sqrt(E), "Mul" by 1/sqrt(E) or None; `mask`: "add", "add-swapped" or None;
    `q_factor`/`k_factor`: scalar Muls on Q / on K before its transpose; `extra_output`: a tensor also made a
    graph output."""
    nodes, inits = [], [numpy_helper.from_array(np.float32(math.sqrt(E)), "root_e"),
                        numpy_helper.from_array(np.float32(1 / math.sqrt(E)), "inv_root_e")]
    q, k = "q", "k"
    if q_factor is not None:
        inits.append(numpy_helper.from_array(np.float32(q_factor), "qf"))
        nodes.append(helper.make_node("Mul", ["q", "qf"], ["q_scaled"]))
        q = "q_scaled"
    if k_factor is not None:
        inits.append(numpy_helper.from_array(np.float32(k_factor), "kf"))
        nodes.append(helper.make_node("Mul", ["k", "kf"], ["k_scaled"]))
        k = "k_scaled"
    nodes += [helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", [q, "kt"], ["qk"])]
    scores = "qk"
    if scale_op == "Div":
        nodes.append(helper.make_node("Div", ["qk", "root_e"], ["scaled"]))
        scores = "scaled"
    elif scale_op == "Mul":
        nodes.append(helper.make_node("Mul", ["inv_root_e", "qk"], ["scaled"]))
        scores = "scaled"
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", H, "l", E][-q_rank:]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", H, "s", E]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", H, "s", E])]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["l", "s"]))
        operands = [scores, "mask"] if mask == "add" else ["mask", scores]
        nodes.append(helper.make_node("Add", operands, ["masked"]))
        scores = "masked"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=axis),
              helper.make_node("MatMul", ["p", "v"], ["y"], name="pv")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"q": (B, H, L, E), "k": (B, H, S, E), "v": (B, H, S, E), "mask": (L, S)}
    feeds = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in (i.name for i in model.graph.input)}
    if "mask" in feeds:  # a causal-style mask: large negatives above the diagonal, and some noise
        feeds["mask"] = np.where(np.triu(np.ones((L, S)), 1) > 0, -1e9, feeds["mask"]).astype(np.float32)
    if len(model.graph.input[0].type.tensor_type.shape.dim) == 3:
        feeds["q"] = feeds["q"][0]
    return feeds


def _fused_nodes(model):
    return [n for n in model.graph.node if n.domain == "qcompile" and n.op_type == "ScaledDotProductAttention"]


def _lowered(model, feeds):
    outputs, _ = lower_onnx(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    return outputs["y"].numpy()


@pytest.mark.parametrize("variant", [
    dict(), dict(scale_op="Mul"), dict(scale_op=None), dict(mask=None), dict(mask="add-swapped"),
    dict(q_factor=0.5, k_factor=0.25, scale_op=None),
])
def test_written_out_attention_fuses_and_matches_onnx_runtime(variant):
    model = _attention_model(**variant)
    fused, result = prepare_for_engine(model)
    nodes = _fused_nodes(fused)
    assert len(nodes) == 1 and not [n for n in fused.graph.node if n.op_type in ("Softmax", "MatMul", "Transpose")]
    assert result.stats["FuseAttentionPass.AttentionRule"] == 1 and "softmax attention" in result.notes[-1]
    scale = {"Div": 1 / math.sqrt(E), "Mul": 1 / math.sqrt(E), None: 1.0}[variant.get("scale_op", "Div")]
    scale *= variant.get("q_factor", 1.0) * variant.get("k_factor", 1.0)
    assert helper.get_attribute_value(nodes[0].attribute[0]) == pytest.approx(scale, rel=1e-6)
    assert len(nodes[0].input) == (3 if variant.get("mask", "add") is None else 4)
    feeds = _feeds(model)
    want = ort_session(model).run(["y"], feeds)[0]
    np.testing.assert_allclose(_lowered(fused, feeds), want, rtol=1e-5, atol=1e-5)


def test_torch_onnx_sdpa_export_fuses_and_matches_float64():
    """torch.onnx writes F.scaled_dot_product_attention at opset 21 with K transposed as Reshape -> Transpose ->
    Reshape and sqrt(scale) on both Q and K^T; the fused node gives float64 attention's result."""

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)

    rng = np.random.default_rng(3)
    q, k, v = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in
               ((B, H, L, E), (B, H, S, E), (B, H, S, E)))
    mask = torch.from_numpy(rng.standard_normal((L, S)).astype(np.float32))
    batch = torch.export.Dim("batch")
    model = torch.onnx.export(Sdpa(), (q, k, v, mask), dynamo=True, opset_version=21, verbose=False,
                              dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, None)).model_proto
    assert "Reshape" in [n.op_type for n in model.graph.node]  # the form this test is about
    fused, _ = prepare_for_engine(model)
    nodes = _fused_nodes(fused)
    assert len(nodes) == 1 and "Softmax" not in [n.op_type for n in fused.graph.node]
    assert helper.get_attribute_value(nodes[0].attribute[0]) == pytest.approx(0.3, rel=1e-6)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    want = torch.softmax(q64 @ k64.transpose(-1, -2) * 0.3 + mask.double(), -1) @ v64
    outputs, _ = lower_onnx(fused).run({"q": q, "k": k, "v": v, "mask": mask})
    got = next(iter(outputs.values()))
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant, reason", [
    (dict(axis=2), "does not run over the keys"),
    (dict(q_rank=3), "4-D"),
])
def test_forms_it_cannot_fuse_are_declined_with_a_reason(variant, reason):
    model = _attention_model(**variant)
    fused, result = prepare_for_engine(model)
    assert not _fused_nodes(fused) and "Softmax" in [n.op_type for n in fused.graph.node]
    assert any(reason in why for _, why in result.declined), result.declined
    feeds = _feeds(model)
    np.testing.assert_allclose(_lowered(fused, feeds), ort_session(model).run(["y"], feeds)[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("shared", ["p", "scaled", "kt"])
def test_intermediate_results_read_elsewhere_keep_the_attention_written_out(shared):
    """Scores, probabilities or K^T that are graph outputs too: fusing would drop them."""
    model = _attention_model(extra_output=shared)
    fused, _ = prepare_for_engine(model)
    assert not _fused_nodes(fused)
    assert [o.name for o in fused.graph.output] == ["y", shared]


def test_attention_fusion_can_be_left_out():
    fused, result = prepare_for_engine(_attention_model(), attention=False)
    assert not _fused_nodes(fused) and not any(k.startswith("FuseAttentionPass") for k in result.stats)


@pytest.mark.gpu
def test_cuda_float16_fused_attention_matches_onnx_runtime():
    """On CUDA in float16 the node runs a fused kernel; with the -3.4e38 causal mask torch.onnx writes (-inf in
    float16) it agrees with the unfused graph in ONNX Runtime (float32)."""
    model = _attention_model()
    fused, _ = prepare_for_engine(model)
    feeds = _feeds(model, seed=4)
    feeds["mask"] = np.where(np.triu(np.ones((L, S)), 1) > 0, np.finfo(np.float32).min, 0).astype(np.float32)
    want = ort_session(model).run(["y"], feeds)[0]
    program = lower_onnx(fused, compute_dtype=torch.float16).to("cuda")
    got = program(*[torch.from_numpy(feeds[v.name]).cuda() for v in fused.graph.input])[0].float().cpu().numpy()
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=5e-3)


def test_inferred_shapes_resolve_computed_reshapes_and_leave_the_graph_alone():
    """`G.inferred_shapes` propagates shapes the graph computes (Shape -> Concat -> Reshape) past a weight it does
    not serialize, and the graph keeps its constants and recorded shapes."""
    from qcompile.passes import _graph as G

    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Shape", ["h"], ["hs"]),
             helper.make_node("Slice", ["hs", "zero", "two"], ["lead"]),
             helper.make_node("Concat", ["lead", "split"], ["target"], axis=0),
             helper.make_node("Reshape", ["h", "target"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([3, 32], np.int64), "split")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    g = G.import_model(model)
    shapes = G.inferred_shapes(g, max_constant=64)
    assert shapes["y"] == ["b", "s", 3, 32]
    weight = g.tensors()["w"]
    assert np.array_equal(G.const_values(weight), w) and g.tensors()["y"].shape is None
