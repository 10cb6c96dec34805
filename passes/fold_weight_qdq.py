"""Fold weight quantization into the initializer, so weights really shrink.

Does the following transformation:
- Q(const float W, scale, zp) -> DQ  ->  const quantized W_q (int8 / fp8 / int4 bytes) -> DQ
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.plugins import formats

logger = logging.getLogger(__name__)

__all__ = ["FoldWeightQDQPass"]


class FoldWeightQDQPass(InPlacePass):
    """Replaces every QuantizeLinear of a constant float weight by its quantized constant.

    Uses `qcompile.plugins.formats.quantize`, which matches ONNX QuantizeLinear bit for bit.
    """

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
            w = G.const_values(q.inputs[0])
            if w is None:
                continue  # an activation Q: not ours
            reason = self._check(graph, q)
            if reason:
                declined.append((q.name, reason))
                continue
            scale = G.const_values(q.inputs[1])
            _, fmt = G.quantized_format(q)
            axis = G.qdq_axis(q, w.ndim)
            wq = formats.quantize(w, scale.astype(np.float32), fmt, axis)
            out = q.outputs[0]
            folded = G.make_constant(G.unique_name(graph, f"{q.inputs[0].name}_{fmt}"), wq)
            for dq in list(out.outputs):
                dq.inputs[0] = folded
            G.drop_node(q)
            stats["folded"] += 1
            stats["bytes_saved"] += int(w.nbytes - (wq.nbytes if fmt != "int4" else (wq.size + 1) // 2))
        if stats["folded"]:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(graph, bool(stats["folded"]), stats, declined)

    @staticmethod
    def _check(graph: gs.Graph, q: gs.Node) -> str | None:
        if G.const_values(q.inputs[1]) is None:
            return "weight scale is not constant"
        if len(q.inputs) > 2 and not q.inputs[2].is_empty():
            zp = G.const_values(q.inputs[2])
            if zp is None:
                return "weight zero point is not constant"
            if np.any(zp.astype(np.float32) != 0):
                return "weight zero point is not zero (asymmetric quantization is not folded)"
        _, fmt = G.quantized_format(q)
        if fmt is None:
            return "quantized type is not int8, fp8 (E4M3FN) or int4"
        if q.attrs.get("block_size", 0):
            return "blocked quantization is not folded yet"
        if int(q.attrs.get("saturate", 1)) != 1:
            return "saturate=0 is not folded"
        out = q.outputs[0]
        if G.is_graph_output(graph, out) or any(c.op != "DequantizeLinear" for c in out.outputs):
            return "the quantized weight feeds something other than DequantizeLinear"
        return None
