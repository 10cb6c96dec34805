"""Weight-only INT4: replace the constant FP weight of a selected MatMul by a pre-quantized INT4 weight + DQ.

Does the following transformation (TensorRT's and ModelOpt's INT4 form, opset 21):
- MatMul(x, W[K,N] float const)  ->  MatMul(x, DequantizeLinear(W_q int4[K,N], scale[K/g,N], axis=0,
  block_size=g))   (asymmetric: plus a uint4 zero point [K/g,N])

Selected: MatMul nodes whose recipe rule has an `int4` weight (W4A16; and W4A8, whose activation Q/DQ
`InsertQDQPass` places after this pass, in front of the MatMul). The
quantized weights come from `qcompile.algorithms` (round to nearest here; AWQ/GPTQ results can be handed
in precomputed by node name). AWQ's per-input-channel scales s come with them: the layer's input is
divided by s (`Mul(x, 1/s)` in front of the MatMul) and the weight was quantized as W * s. Declined, with a reason: a non-constant or non-2-D weight (reached through
copy ops), K not a multiple of the group size, K < min_k or N < min_n.
"""
from __future__ import annotations

import collections
import logging

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompile.algorithms.int4 import QuantizedWeight, quantize_rtn
from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.recipes.schema import Recipe

logger = logging.getLogger(__name__)

__all__ = ["QuantizeWeightsInt4Pass", "int4_targets", "decline_reason", "AWQ_SCALE_RULE"]

AWQ_SCALE_RULE = "awq_input_scale"  # the qcompile.rule metadata of AWQ's Mul(x, 1/s) (FoldAwqScalesPass folds it)


def int4_targets(graph: gs.Graph, recipe: Recipe) -> list[tuple[gs.Node, object]]:
    """(MatMul node, rule) pairs whose rule asks for INT4 weights."""
    found = []
    for node in graph.nodes:
        if node.op != "MatMul":
            continue
        rule = recipe.rule_for(node.op, node.name, G.module_of(graph, node))
        if rule is not None and rule.weight is not None and rule.weight.format == "int4":
            found.append((node, rule))
    return found


def decline_reason(node: gs.Node, w: np.ndarray | None, rule, recipe: Recipe) -> str | None:
    """Why the MatMul `node` with weight values `w` cannot take an INT4 weight (None: it can)."""
    if w is None:
        return f"weight '{node.inputs[1].name}' is not a constant initializer (int4 needs a constant [K, N])"
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return f"weight '{node.inputs[1].name}' is not a 2-D float matrix (shape {w.shape}, {w.dtype})"
    k, n = w.shape
    opts = recipe.placement.for_op(node.op)
    g = rule.weight.group_size or k
    if k % g:
        return f"K={k} is not a multiple of the group size {g}"
    if k < opts.min_k:
        return f"K={k} < min_k={opts.min_k}"
    if n < opts.min_n:
        return f"N={n} < min_n={opts.min_n}"
    return None


class QuantizeWeightsInt4Pass(InPlacePass):
    """Quantizes the weights of the recipe's weight-only INT4 MatMuls (see the module docstring).

    Args:
        recipe: selects the layers (rules with `weight.format = "int4"`) and the group size.
        quantized: precomputed results (AWQ, GPTQ) by node name; other layers are rounded to nearest.
        input_scales: AWQ scales s [K] by node name (the node's input is divided by them).
    """

    def __init__(self, recipe: Recipe, quantized: dict[str, QuantizedWeight] | None = None,
                 input_scales: dict[str, np.ndarray] | None = None):
        self.recipe = recipe
        self.quantized = quantized or {}
        self.input_scales = input_scales or {}

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        for node, rule in int4_targets(graph, self.recipe):
            w = G.const_values(node.inputs[1])
            reason = decline_reason(node, w, rule, self.recipe)
            if reason:
                declined.append((node.name, reason))
                continue
            spec = rule.weight
            qw = self.quantized.get(node.name) or quantize_rtn(torch.from_numpy(w.astype(np.float32)),
                                                                spec.group_size, symmetric=spec.symmetric)
            node.inputs[1] = self._dequantize(graph, node, qw)
            if node.name in self.input_scales:
                node.inputs[0] = self._divide_input(graph, node, self.input_scales[node.name])
                stats["input_scaled"] += 1
            stats["quantized"] += 1
            stats["bytes_saved"] += int(w.nbytes - qw.q.numel() // 2 - qw.scale.numel() * 4)
        if stats["quantized"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, bool(stats["quantized"]), stats, declined)

    @staticmethod
    def _divide_input(graph: gs.Graph, node: gs.Node, scales: np.ndarray) -> gs.Variable:
        """x / s as Mul(x, 1/s) in front of `node` (AWQ); returns the scaled input."""
        x = node.inputs[0]
        inv = G.make_constant(G.unique_name(graph, f"{node.name}/awq_inv_scale"),
                              (1.0 / scales.astype(np.float64)).astype(np.float32))
        out = gs.Variable(G.unique_name(graph, f"{x.name}_awq"), dtype=x.dtype, shape=x.shape)
        mul = gs.Node("Mul", name=G.unique_name(graph, f"{node.name}/awq_scale"), inputs=[x, inv], outputs=[out])
        G.node_metadata(graph)[mul.name] = {G.RULE_KEY: AWQ_SCALE_RULE}
        graph.nodes.append(mul)
        return out

    @staticmethod
    def _dequantize(graph: gs.Graph, node: gs.Node, qw: QuantizedWeight) -> gs.Variable:
        """DQ(W_q, scale[, zero], axis=0, block_size=g) in front of `node`; returns its output."""
        base = node.inputs[1].name
        q = qw.q.cpu().numpy()
        if qw.symmetric:
            w_q = G.make_constant(G.unique_name(graph, f"{base}_int4"), q.astype(ml_dtypes.int4))
            inputs = [w_q, G.make_constant(G.unique_name(graph, f"{base}_scale"), qw.scale.cpu().numpy())]
        else:
            w_q = G.make_constant(G.unique_name(graph, f"{base}_uint4"), q.astype(ml_dtypes.uint4))
            inputs = [w_q, G.make_constant(G.unique_name(graph, f"{base}_scale"), qw.scale.cpu().numpy()),
                      G.make_constant(G.unique_name(graph, f"{base}_zero"), qw.zero.cpu().numpy().astype(ml_dtypes.uint4))]
        out = gs.Variable(G.unique_name(graph, f"{base}_dq"), dtype=np.float32, shape=list(q.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", name=G.unique_name(graph, f"{node.name}/weight_dq"),
                                   inputs=inputs, outputs=[out],
                                   attrs={"axis": 0, "block_size": qw.group_size}))
        return out
