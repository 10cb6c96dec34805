"""Sink weight DequantizeLinear nodes through copy ops, so DQ feeds the GEMM directly.

Does the following transformation:
- DQ(W_q, s, axis=a) -> Transpose(perm) -> MatMul  ->  DQ(Transpose(W_q), s, axis=perm.index(a)) -> MatMul
- DQ(W_q, s) -> Reshape / Flatten / Squeeze / Unsqueeze -> X  ->  DQ(reshaped W_q, s, remapped axis) -> X
  (repeated until the DQ reaches a non-copy op)

Declines (with a reason) when the per-channel axis is merged or split by a reshape, the DQ output has
several consumers, the copy op's parameters are not constant, or the DQ is blocked. Given the recipe, the FP4
form's DQ -> Transpose -> MatMul (QuantizeWeightsFp4Pass's, fused as it is by FuseFp4GemmPass) is left alone,
not declined.
"""
from __future__ import annotations

import collections
import logging

import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes._forms import FP4, rule_form
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.recipes.schema import Recipe

logger = logging.getLogger(__name__)

__all__ = ["SinkDequantizePass"]


class SinkDequantizePass(InPlacePass):
    """Applies copy ops to quantized constants (and remaps the per-channel axis) until DQ meets its consumer.

    Args:
        recipe: the recipe being applied (optional): copy ops that are part of another pass's form (FP4's weight
            Transpose) are kept without a decline. Without it every weight DQ in front of a copy op is tried.
    """

    def __init__(self, recipe: Recipe | None = None):
        self.recipe = recipe

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        declined: dict[str, str] = {}
        changed = True
        while changed:
            changed = False
            for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and n.outputs]:
                if G.const_values(dq.inputs[0]) is None or len(dq.outputs[0].outputs) != 1:
                    if G.const_values(dq.inputs[0]) is not None and dq.outputs[0].outputs and any(
                            c.op in G.COPY_OPS for c in dq.outputs[0].outputs):
                        declined[dq.name] = "the DQ output has several consumers"
                    continue
                op = dq.outputs[0].outputs[0]
                if op.op not in G.COPY_OPS or op.inputs[0] is not dq.outputs[0] or self._form_keeps(graph, op):
                    continue
                reason = self._sink(graph, dq, op)
                if reason:
                    declined[dq.name] = f"cannot sink through {op.op} '{op.name}': {reason}"
                    continue
                declined.pop(dq.name, None)
                stats[f"sunk_through_{op.op}"] += 1
                changed = True
        modified = sum(stats.values()) > 0
        if modified:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, modified, stats, list(declined.items()))

    def _form_keeps(self, graph: gs.Graph, op: gs.Node) -> bool:
        """Whether copy op `op` feeds a layer of the FP4 form, whose DQ -> Transpose -> MatMul stays as written."""
        if self.recipe is None:
            return False
        rules = (self.recipe.rule_for(c.op, c.name, G.module_of(graph, c)) for c in op.outputs[0].outputs)
        return any(rule is not None and rule_form(rule) == FP4 for rule in rules)

    @staticmethod
    def _sink(graph: gs.Graph, dq: gs.Node, op: gs.Node) -> str | None:
        if dq.attrs.get("block_size", 0):
            return "blocked DQ is not sunk yet"
        if G.is_graph_output(graph, dq.outputs[0]):
            return "the DQ output is a graph output"
        scale = G.const_values(dq.inputs[1])
        if scale is None:
            return "weight scale is not constant"
        wq = G.const_values(dq.inputs[0])
        moved = G.apply_copy_op(op, wq)
        if moved is None:
            return "its parameters are not constant"
        attrs = dict(dq.attrs)
        axis = G.qdq_axis(dq, wq.ndim)
        if axis is not None:
            new_axis = G.map_axis(op, wq.shape, moved.shape, axis)
            if new_axis is None:
                return f"per-channel axis {axis} (size {wq.shape[axis]}) is merged or split by the {op.op}"
            attrs["axis"] = new_axis
        new_w = G.make_constant(G.unique_name(graph, f"{dq.inputs[0].name}_{op.op.lower()}"), moved)
        out = op.outputs[0]
        new_dq = gs.Node("DequantizeLinear", name=dq.name, attrs=attrs, inputs=[new_w, *dq.inputs[1:]],
                         outputs=[out])
        G.drop_node(op)
        G.drop_node(dq)
        graph.nodes.append(new_dq)
        return None
