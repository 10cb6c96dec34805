"""Fuse INT4-weight GEMMs (W4A16, and W4A8 with FP8 activations) into `qcompile::Int4GroupwiseGemm` plugin nodes.

Does the following transformation:
- MatMul(x, DQ(W_q int4/uint4 [K,N], scale [K/g,N], zp?, axis=0, block_size=g)) (+ Add(., b[N]))
  ->  Int4GroupwiseGemm(x, W_q, scale, zp, b; block_size=g)
- MatMul(DQ(Q(x, s, zero fp8e4m3fn)), DQ(W_q ...)) (+ Add)   [W4A8, static per tensor, s a constant scalar]
  ->  Int4GroupwiseGemm(x, W_q, scale, zp, b, s; act_quant="fp8_static")
- MatMul(DQ(Q(x, s(x), axis=-1, block_size=K, fp8)), DQ(W_q ...)) (+ Add)   [W4A8, dynamic per token: the
  in-graph row scale s(x) of `_graph.make_dynamic_row_qdq`, which `InsertQDQPass` emits]
  ->  Int4GroupwiseGemm(x, W_q, scale, zp, b; act_quant="fp8_dynamic")

An activation Q/DQ of another form stays in front of a weight-only node. The node keeps the MatMul's name and
output tensor; shared activation Q/DQ pairs are left to the cleanup; the plugin contract is
`qcompile.plugins.int4_gemm.onnx_schema` (its function bodies are added to the model on export).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes import _weight_gemm
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.plugins.int4_gemm import onnx_schema

logger = logging.getLogger(__name__)

__all__ = ["FuseInt4GemmPass", "int4_weight_dq"]

_INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def int4_weight_dq(tensor) -> gs.Node | None:
    """The DequantizeLinear of a 4-bit weight that produces `tensor`, else None."""
    dq = G.producer(tensor)
    return dq if dq is not None and dq.op == "DequantizeLinear" and G.onnx_dtype(dq.inputs[0]) in _INT4_TYPES else None


def _fp8_activation(x) -> tuple[str, gs.Node | None, object]:
    """(act_quant, the activation QuantizeLinear, the float input it quantizes) of the MatMul input `x`;
    ("none", None, x) when x is not FP8 Q/DQ of a form the plugin takes."""
    x_dq = G.producer(x)
    x_q = G.producer(x_dq.inputs[0]) if x_dq is not None and x_dq.op == "DequantizeLinear" else None
    if x_q is None or x_q.op != "QuantizeLinear" or G.quantized_format(x_q)[1] != "fp8":
        return "none", None, x
    scale, raw = x_q.inputs[1], x_q.inputs[0]
    if x_dq.inputs[1] is not scale or any(_nonzero(n) for n in (x_q, x_dq)):
        return "none", None, x
    if not x_q.attrs.get("block_size", 0):
        s = G.const_values(scale)
        return ("fp8_static", x_q, raw) if s is not None and s.size == 1 and float(s.reshape(-1)[0]) > 0 \
            else ("none", None, x)
    found = G.dynamic_row_scale_input(x_q)
    return ("fp8_dynamic", x_q, raw) if found is not None and found[0] is raw and found[1] == "fp8" \
        else ("none", None, x)


def _nonzero(node: gs.Node) -> bool:
    zp = G.const_values(node.inputs[2]) if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    return zp is not None and bool(np.any(zp.astype(np.float32)))


class Int4GemmRule(RewriteRule):
    """MatMul fed by a block-DequantizeLinear of a constant 4-bit weight (and optionally an FP8 activation
    Q/DQ) -> Int4GroupwiseGemm."""

    pattern = ("MatMul",)

    def match(self, graph, node):
        return _weight_gemm.bind(graph, node, lambda dq: G.onnx_dtype(dq.inputs[0]) in _INT4_TYPES)

    def check(self, graph, node, w_dq, bias_add):
        w = G.const_values(w_dq.inputs[0])
        if w is None or w.ndim != 2:
            return MatchResult.fail("4-bit weight is not a constant 2-D matrix")
        if int(w_dq.attrs.get("axis", 1)) != 0 or not w_dq.attrs.get("block_size", 0):
            return MatchResult.fail("weight DequantizeLinear is not blocked along K (axis=0, block_size)")
        for i in range(1, len(w_dq.inputs)):
            if not w_dq.inputs[i].is_empty() and G.const_values(w_dq.inputs[i]) is None:
                return MatchResult.fail("weight scale or zero point is not constant")
        if len(w_dq.outputs[0].outputs) != 1:
            return MatchResult.fail("the dequantized weight has other consumers")
        return MatchResult.ok()

    def rewrite(self, graph, node, w_dq, bias_add):
        bias, y = _weight_gemm.absorb_bias(node, bias_add, G.const_values(w_dq.inputs[0]).shape[1])
        base = node.name or G.unique_name(graph, onnx_schema.OP_TYPE)
        act_quant, x_q, x = _fp8_activation(node.inputs[0])
        zero = w_dq.inputs[2] if len(w_dq.inputs) > 2 and not w_dq.inputs[2].is_empty() else gs.Variable.empty()
        inputs = [x, w_dq.inputs[0], w_dq.inputs[1], zero]
        if bias is not None or act_quant == "fp8_static":
            inputs.append(G.make_constant(G.unique_name(graph, f"{base}/bias"), bias.astype(np.float32))
                          if bias is not None else gs.Variable.empty())
        if act_quant == "fp8_static":
            inputs.append(x_q.inputs[1])
        fused = _weight_gemm.replace(graph, node, onnx_schema, inputs, y,
                                     onnx_schema.attributes(int(w_dq.attrs["block_size"]), act_quant))
        G.drop_node(w_dq)  # the activation Q/DQ (maybe shared) goes with the cleanup once unread
        return [fused]


class FuseInt4GemmPass(RewritePass):
    """Applies `Int4GemmRule` everywhere it matches (declines carry the rule's reason)."""

    def __init__(self):
        super().__init__([Int4GemmRule()], name="FuseInt4GemmPass")
