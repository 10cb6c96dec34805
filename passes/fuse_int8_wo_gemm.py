"""Fuse INT8 weight-only GEMMs into `qcompile::Int8WeightOnlyGemm` plugin nodes.

Does the following transformation (TensorRT's weight-only INT8 form, which `InsertQDQPass` +
`FoldWeightQDQPass` emit for a rule with an int8 per-channel weight and no activation quantization):
- MatMul(x, DQ(W_q int8 [K,N], scale [N], zp 0?, axis=1)) (+ Add(., b[N]))
  ->  Int8WeightOnlyGemm(x, W_q, scale, b)        (b = zeros without a bias Add)

Runs after `FuseScaledGemmPass`, so GEMMs with a quantized activation are already ScaledGemm nodes. The node
keeps the MatMul's name; the plugin contract is `qcompile.plugins.int8_wo_gemm.onnx_schema` (its function
body is added to the model on export).
"""
from __future__ import annotations

import numpy as np
import onnx

from qcompile.passes import _graph as G
from qcompile.passes import _weight_gemm
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.plugins.int8_wo_gemm import onnx_schema

__all__ = ["FuseInt8WoGemmPass"]


def _int8_dq(dq) -> bool:
    return G.onnx_dtype(dq.inputs[0]) == onnx.TensorProto.INT8


class Int8WoGemmRule(RewriteRule):
    """MatMul fed by a per-column DequantizeLinear of a constant INT8 weight -> Int8WeightOnlyGemm."""

    pattern = ("MatMul",)

    def match(self, graph, node):
        return _weight_gemm.bind(graph, node, _int8_dq)

    def check(self, graph, node, w_dq, bias_add):
        w, s = G.const_values(w_dq.inputs[0]), G.const_values(w_dq.inputs[1])
        if w is None or w.ndim != 2:
            return MatchResult.fail("int8 weight is not a constant 2-D matrix")
        if s is None:
            return MatchResult.fail("weight scale is not constant")
        if w_dq.attrs.get("block_size", 0) or G.qdq_axis(w_dq, 2) != 1 or s.shape != (w.shape[1],):
            return MatchResult.fail(f"weight scale {list(s.shape)} is not per output channel (axis=1, [N])")
        if not np.all(s > 0):
            return MatchResult.fail("weight scale is not strictly positive")
        if len(w_dq.inputs) > 2 and not w_dq.inputs[2].is_empty():
            zp = G.const_values(w_dq.inputs[2])
            if zp is None or np.any(zp):
                return MatchResult.fail("weight zero point is not zero")
        if len(w_dq.outputs[0].outputs) != 1:
            return MatchResult.fail("the dequantized weight has other consumers")
        return MatchResult.ok()

    def rewrite(self, graph, node, w_dq, bias_add):
        w_q = w_dq.inputs[0]
        bias, y = _weight_gemm.take_bias(node, bias_add, w_q.shape[1])
        base = node.name or onnx_schema.OP_TYPE
        inputs = [node.inputs[0], w_q,
                  G.make_constant(G.unique_name(graph, f"{base}/w_scale"),
                                  G.const_values(w_dq.inputs[1]).astype(np.float32)),
                  G.make_constant(G.unique_name(graph, f"{base}/bias"), bias)]
        G.drop_node(w_dq)
        return [_weight_gemm.replace(graph, node, onnx_schema, inputs, y, onnx_schema.attributes())]


class FuseInt8WoGemmPass(RewritePass):
    """Applies `Int8WoGemmRule` everywhere it matches (declines carry the rule's reason)."""

    def __init__(self):
        super().__init__([Int8WoGemmRule()], name="FuseInt8WoGemmPass")
