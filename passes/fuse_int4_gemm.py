"""Fuse weight-only INT4 GEMMs into `qcompile::Int4GroupwiseGemm` plugin nodes.

Does the following transformation:
- MatMul(x, DQ(W_q int4/uint4 [K,N], scale [K/g,N], zp?, axis=0, block_size=g)) (+ Add(., b[N]))
  ->  Int4GroupwiseGemm(x, W_q, scale, zp, b; block_size=g)

The node keeps the MatMul's name and output tensor; the plugin contract is
`qcompile.plugins.int4_gemm.onnx_schema` (its function body is added to the model on export).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.plugins.int4_gemm import onnx_schema

logger = logging.getLogger(__name__)

__all__ = ["FuseInt4GemmPass"]

_INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


class Int4GemmRule(RewriteRule):
    """MatMul fed by a block-DequantizeLinear of a constant 4-bit weight -> Int4GroupwiseGemm."""

    pattern = ("MatMul",)

    def match(self, graph, node):
        if len(node.inputs) < 2:
            return None
        w_dq = G.producer(node.inputs[1])
        if w_dq is None or w_dq.op != "DequantizeLinear" or G.onnx_dtype(w_dq.inputs[0]) not in _INT4_TYPES:
            return None
        y = node.outputs[0]
        bias_add = None
        if len(y.outputs) == 1 and y.outputs[0].op == "Add" and not G.is_graph_output(graph, y):
            bias_add = y.outputs[0]
        return {"node": node, "w_dq": w_dq, "bias_add": bias_add}

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
        y = node.outputs[0]
        n = G.const_values(w_dq.inputs[0]).shape[1]
        bias = None
        if bias_add is not None and sum(x is y for x in bias_add.inputs) == 1:
            other = next(x for x in bias_add.inputs if x is not y)
            b = G.bias_vector(other, n, strict=True)
            if b is not None:
                bias, y = b, bias_add.outputs[0]
                G.drop_node(bias_add)
        base = node.name or G.unique_name(graph, onnx_schema.OP_TYPE)
        zero = w_dq.inputs[2] if len(w_dq.inputs) > 2 and not w_dq.inputs[2].is_empty() else gs.Variable.empty()
        inputs = [node.inputs[0], w_dq.inputs[0], w_dq.inputs[1], zero]
        if bias is not None:
            inputs.append(G.make_constant(G.unique_name(graph, f"{base}/bias"), bias.astype(np.float32)))
        fused = gs.Node(onnx_schema.OP_TYPE, name=base, domain=onnx_schema.DOMAIN,
                        attrs=onnx_schema.attributes(int(w_dq.attrs["block_size"])), inputs=inputs, outputs=[y])
        meta = G.node_metadata(graph)
        if node.name in meta:
            meta[base] = dict(meta[node.name])
        G.drop_node(node)
        G.drop_node(w_dq)
        graph.nodes.append(fused)
        return [fused]


class FuseInt4GemmPass(RewritePass):
    """Applies `Int4GemmRule` everywhere it matches (declines carry the rule's reason)."""

    def __init__(self):
        super().__init__([Int4GemmRule()], name="FuseInt4GemmPass")
