"""Fuse FP4 GEMMs (TensorRT's NVFP4 / MXFP4 ONNX form) into `qcompile::Fp4Gemm` / `Fp4GemmW4A4` plugin nodes.

Does the following transformation:
- MatMul(x, Transpose(DQ(W_f4 [N,K], S, axis=-1, block_size=B)))   with S = DQ(S_f8, g_w) (NVFP4) or
  S = FP32 powers of two (MXFP4)  ->  Fp4Gemm(x, W_f4, S_f8 | S, g_w | 1.0; block_size=B)
- the same with x = DQ(x_f4, DQ(sx_f8, g_x), axis=-1, block_size=16), `x_f4, sx_f8 =
  trt::TRT_FP4DynamicQuantize(x0, g_x)`  ->  Fp4GemmW4A4(x0, W_f4, S_f8, g_w, g_x; block_size=16)
  (the activation chain is dropped once no other node reads it)

The node keeps the MatMul's name and output tensor; the plugin contract is
`qcompile.plugins.fp4_gemm.onnx_schema` (its function bodies are added to the model on export).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.plugins.fp4_gemm import onnx_schema

logger = logging.getLogger(__name__)

__all__ = ["FuseFp4GemmPass"]

T = onnx.TensorProto


def _is_dq(node) -> bool:
    return node is not None and node.op == "DequantizeLinear" and node.domain in ("", "ai.onnx", None)


class Fp4GemmRule(RewriteRule):
    """MatMul fed by TensorRT's FP4 weight form (and optionally its NVFP4 activation form) -> FP4 plugin node."""

    pattern = ("MatMul",)

    def match(self, graph, node):
        if len(node.inputs) < 2:
            return None
        t = G.producer(node.inputs[1])
        if t is None or t.op != "Transpose":
            return None
        w_dq = G.producer(t.inputs[0])
        if not _is_dq(w_dq) or G.onnx_dtype(w_dq.inputs[0]) != T.FLOAT4E2M1:
            return None
        s_dq = G.producer(w_dq.inputs[1])
        x_dq = G.producer(node.inputs[0])
        if not (_is_dq(x_dq) and G.onnx_dtype(x_dq.inputs[0]) == T.FLOAT4E2M1):
            x_dq = None
        return {"node": node, "t": t, "w_dq": w_dq, "s_dq": s_dq if _is_dq(s_dq) else None, "x_dq": x_dq}

    def check(self, graph, node, t, w_dq, s_dq, x_dq):
        if list(t.attrs.get("perm", [1, 0])) != [1, 0]:
            return MatchResult.fail("the weight Transpose is not perm=[1, 0]")
        w = G.const_values(w_dq.inputs[0])
        if w is None or w.ndim != 2:
            return MatchResult.fail("the FP4 weight is not a constant 2-D matrix")
        block = int(w_dq.attrs.get("block_size", 0))
        if int(w_dq.attrs.get("axis", 1)) not in (-1, 1) or block not in (16, 32):
            return MatchResult.fail("the weight DequantizeLinear is not blocked along K (axis=-1, block_size 16|32)")
        if s_dq is not None:
            if G.onnx_dtype(s_dq.inputs[0]) != T.FLOAT8E4M3FN or block != 16 \
                    or any(G.const_values(i) is None for i in s_dq.inputs[:2]):
                return MatchResult.fail("the NVFP4 block scales are not constant E4M3 with a constant global scale")
        elif G.const_values(w_dq.inputs[1]) is None or block != 32:
            return MatchResult.fail("the MXFP4 block scales are not constant (or block_size is not 32)")
        if any(len(v.outputs) != 1 for v in (w_dq.outputs[0], t.outputs[0])):
            return MatchResult.fail("the dequantized weight has other consumers")
        if x_dq is not None:
            return _check_activation(x_dq, s_dq)
        return MatchResult.ok()

    def rewrite(self, graph, node, t, w_dq, s_dq, x_dq):
        base = node.name or G.unique_name(graph, onnx_schema.OP_TYPE)
        if s_dq is not None:
            scale, glob = s_dq.inputs[0], s_dq.inputs[1]
        else:
            scale, glob = w_dq.inputs[1], G.make_constant(G.unique_name(graph, f"{base}/w_global"),
                                                          np.asarray(1.0, np.float32))
        inputs = [node.inputs[0], w_dq.inputs[0], scale, glob]
        op_type = onnx_schema.OP_TYPE
        if x_dq is not None:
            quant = G.producer(x_dq.inputs[0])
            inputs = [quant.inputs[0], w_dq.inputs[0], scale, glob, quant.inputs[1]]
            op_type = onnx_schema.OP_TYPE_W4A4
        fused = gs.Node(op_type, name=base, domain=onnx_schema.DOMAIN,
                          attrs=onnx_schema.attributes(int(w_dq.attrs["block_size"])), inputs=inputs,
                          outputs=[node.outputs[0]])
        meta = G.node_metadata(graph)
        if node.name in meta:
            meta[base] = dict(meta[node.name])
        for dead in (node, t, w_dq) + ((s_dq,) if s_dq is not None else ()):
            G.drop_node(dead)
        graph.nodes.append(fused)
        return [fused]


def _check_activation(x_dq, s_dq) -> MatchResult:
    """The activation must be TensorRT's NVFP4 dynamic form, with an NVFP4 weight."""
    sx_dq = G.producer(x_dq.inputs[1])
    quant = G.producer(x_dq.inputs[0])
    if s_dq is None:
        return MatchResult.fail("an FP4 activation goes with NVFP4 weights only")
    if quant is None or quant.op != onnx_schema.TRT_DYNAMIC_QUANTIZE or quant.domain != onnx_schema.TRT_DOMAIN \
            or not _is_dq(sx_dq) or G.producer(sx_dq.inputs[0]) is not quant:
        return MatchResult.fail("the FP4 activation is not trt::TRT_FP4DynamicQuantize -> DQ(scales) -> DQ")
    g = G.const_values(quant.inputs[1])
    if g is None or g.size != 1 or sx_dq.inputs[1] is not quant.inputs[1]:
        return MatchResult.fail("the activation global scale is not one constant scalar shared by the chain")
    if int(x_dq.attrs.get("block_size", 0)) != 16 or int(x_dq.attrs.get("axis", 1)) != -1:
        return MatchResult.fail("the activation DequantizeLinear is not blocked by 16 along the last axis")
    return MatchResult.ok()


class FuseFp4GemmPass(RewritePass):
    """Applies `Fp4GemmRule` everywhere it matches (declines carry the rule's reason)."""

    def __init__(self):
        super().__init__([Fp4GemmRule()], name="FuseFp4GemmPass")
