"""Fuse FP8 block-scaled GEMMs into `qcompile::Fp8BlockGemm` plugin nodes.

Does the following transformation (the form `QuantizeFp8BlockPass` emits):
- MatMul(DQ(Q(x, s(x), axis=-1, block_size=128, fp8)), DQ(W_q fp8 [K,N], S [K/128,N], axis=0, block_size=128))
  (+ Add(., b[N]))  ->  Fp8BlockGemm(x, W_q.T [N,K], S_blocks [N/128, K/128], b)
  where s(x) is the dynamic 1x128 block scale subgraph (`quantize_fp8_block.dynamic_block_input`) and S repeats
  each 128x128 block's scale over its 128 columns (S_blocks = S[:, ::128].T).

The node keeps the MatMul's name; a shared activation Q/DQ goes with the cleanup once nothing reads it. The
plugin contract is `qcompile.plugins.fp8_block_gemm.onnx_schema` (its function body is added on export).
"""
from __future__ import annotations

import numpy as np
import onnx

from qcompile.passes import _graph as G
from qcompile.passes import _weight_gemm
from qcompile.passes.quantize_fp8_block import dynamic_block_input
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.plugins.fp8_block_gemm import BLOCK, onnx_schema

__all__ = ["FuseFp8BlockGemmPass"]


def _fp8_block_dq(dq) -> bool:
    return G.onnx_dtype(dq.inputs[0]) == onnx.TensorProto.FLOAT8E4M3FN and bool(dq.attrs.get("block_size", 0))


def _activation(x):
    """(x before quantization, activation DQ) when MatMul input `x` is the dynamic 1x128 FP8 Q/DQ, else None."""
    dq = G.producer(x)
    q = G.producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    if q is None or q.op != "QuantizeLinear" or dynamic_block_input(q) is None:
        return None
    if dq.inputs[1] is not q.inputs[1] or int(dq.attrs.get("block_size", 0)) != BLOCK or len(dq.inputs) > 2:
        return None
    return q.inputs[0], dq


class Fp8BlockGemmRule(RewriteRule):
    """MatMul of a dynamic 1x128 FP8 activation and a 128x128-block FP8 weight -> Fp8BlockGemm."""

    pattern = ("MatMul",)

    def match(self, graph, node):
        return _weight_gemm.bind(graph, node, _fp8_block_dq)

    def check(self, graph, node, w_dq, bias_add):
        w, s = G.const_values(w_dq.inputs[0]), G.const_values(w_dq.inputs[1])
        if w is None or w.ndim != 2 or s is None:
            return MatchResult.fail("fp8 weight or its scale is not a constant 2-D matrix")
        k, n = w.shape
        if k % BLOCK or n % BLOCK:
            return MatchResult.fail(f"K={k} or N={n} is not a multiple of {BLOCK}")
        if G.qdq_axis(w_dq, 2) not in (0, None) or int(w_dq.attrs.get("axis", 1)) % 2 != 0 \
                or int(w_dq.attrs["block_size"]) != BLOCK or s.shape != (k // BLOCK, n):
            return MatchResult.fail(f"weight scale {list(s.shape)} is not blocked by {BLOCK} along K (axis=0)")
        if np.any(s.reshape(k // BLOCK, n // BLOCK, BLOCK) != s[:, ::BLOCK, None]):
            return MatchResult.fail("weight scale is not constant over 128x128 blocks")
        if len(w_dq.inputs) > 2 and not w_dq.inputs[2].is_empty():
            return MatchResult.fail("weight DequantizeLinear has a zero point")
        if len(w_dq.outputs[0].outputs) != 1:
            return MatchResult.fail("the dequantized weight has other consumers")
        if _activation(node.inputs[0]) is None:
            return MatchResult.fail("activation is not the dynamic 1x128 FP8 Q/DQ of QuantizeFp8BlockPass")
        return MatchResult.ok()

    def rewrite(self, graph, node, w_dq, bias_add):
        w, s = G.const_values(w_dq.inputs[0]), G.const_values(w_dq.inputs[1])
        bias, y = _weight_gemm.take_bias(node, bias_add, w.shape[1])
        x, _ = _activation(node.inputs[0])
        base = node.name or onnx_schema.OP_TYPE
        inputs = [x,
                  G.make_constant(G.unique_name(graph, f"{base}/w_q"), np.ascontiguousarray(w.T)),
                  G.make_constant(G.unique_name(graph, f"{base}/w_scale"),
                                  np.ascontiguousarray(s[:, ::BLOCK].T, dtype=np.float32)),
                  G.make_constant(G.unique_name(graph, f"{base}/bias"), bias)]
        G.drop_node(w_dq)
        return [_weight_gemm.replace(graph, node, onnx_schema, inputs, y, onnx_schema.attributes())]


class FuseFp8BlockGemmPass(RewritePass):
    """Applies `Fp8BlockGemmRule` everywhere it matches (declines carry the rule's reason)."""

    def __init__(self):
        super().__init__([Fp8BlockGemmRule()], name="FuseFp8BlockGemmPass")
