"""Fold AWQ's input scaling into the op that produces the input, where that is exact.

Does the following transformation, for a tensor x whose every consumer is an AWQ `Mul(x, 1/s)` of
`QuantizeWeightsInt4Pass` (tagged `qcompile.rule = awq_input_scale`) with the same s [K]:
- Mul(h, g const) -> x  ->  Mul(h, g / s)     (a norm's weight; g a scalar or per channel on the last axis)
- LayerNormalization / SimplifiedLayerNormalization / RMSNormalization(h, scale[, bias]) -> x  ->
  the same norm with scale / s and bias / s
- MatMul(h, W const) -> x  ->  MatMul(h, W / s)  (W's output columns; W may be a DequantizeLinear of a constant
  with blocked or per-column scales: its scales / s); Gemm(h, B, C) likewise (B per transB, and C / s)
- Add(a, c const) -> x  ->  Add(a / s, c / s), a folded the same way (e.g. MatMul -> bias Add)
and then the Muls go: their consumers read x, renamed to the first Mul's output name (`<x>_awq`). Every op
that absorbed the scale gets `qcompile.rule = awq_scale_folded` and its output a new name (`<name>_awq`): its
values changed, so it must not be matched by name with the FP graph's tensor (per-layer validation does that).

Kept as a Mul (declined with the reason, per Mul): x is also read by another op or is a graph output, the
layers reading x have different scales, or its producer is none of the above or has a non-constant operand.
Stats: "folded" (Muls removed), "kept_as_mul"; the note (build summary) and the INFO log line:
"AWQ scales: N folded into previous ops, M kept as Mul (layers)".
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.passes.quantize_weights_int4 import AWQ_SCALE_RULE

logger = logging.getLogger(__name__)

__all__ = ["FoldAwqScalesPass", "FOLD_RULE"]

Edit = tuple[gs.Node, int, np.ndarray]  # node.inputs[index] <- a new constant holding these values
NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
FOLD_RULE = "awq_scale_folded"  # the qcompile.rule metadata of the ops that absorbed a scale


class FoldAwqScalesPass(InPlacePass):
    """Folds AWQ's `Mul(x, 1/s)` into the producer of x where exact (see the module docstring)."""

    def call(self, graph: gs.Graph) -> PassResult:
        meta = G.node_metadata(graph)
        by_input: dict[str, list[gs.Node]] = {}
        for node in graph.nodes:
            if node.op == "Mul" and meta.get(node.name, {}).get(G.RULE_KEY) == AWQ_SCALE_RULE:
                by_input.setdefault(node.inputs[0].name, []).append(node)
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        kept: list[str] = []
        for muls in by_input.values():
            edits = _plan(graph, muls)
            if isinstance(edits, str):
                declined += [(m.name, edits) for m in muls]
                kept += [_layer(graph, m) for m in muls]
                stats["kept_as_mul"] += len(muls)
                continue
            _apply(graph, muls, edits)
            stats["folded"] += len(muls)
        if stats["folded"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        notes = []
        if by_input:
            notes.append(f"AWQ scales: {stats['folded']} folded into previous ops, {stats['kept_as_mul']} kept as Mul"
                         + (f" ({', '.join(kept)})" if kept else ""))
            logger.info("%s", notes[0])
        return PassResult(graph, bool(stats["folded"]), stats, declined, notes)


def _plan(graph: gs.Graph, muls: list[gs.Node]) -> list[Edit] | str:
    """The edits folding the Muls (all reading one x) into x's producer, or why they must stay."""
    x = muls[0].inputs[0]
    if G.is_graph_output(graph, x):
        return f"'{x.name}' is a graph output"
    other = next((c for c in x.outputs if all(c is not m for m in muls)), None)
    if other is not None:
        return f"'{x.name}' is also read by {other.op} '{other.name}'"
    scales = [G.const_values(m.inputs[1]) for m in muls]
    if any(s is None for s in scales):
        return "an AWQ scale is not a constant"
    if any(s.shape != scales[0].shape or not np.array_equal(s, scales[0]) for s in scales):
        return f"the layers reading '{x.name}' have different AWQ scales"
    return _fold(graph, x, scales[0].astype(np.float64).reshape(-1))


def _apply(graph: gs.Graph, muls: list[gs.Node], edits: list[Edit]) -> None:
    x = muls[0].inputs[0]
    edited: list[gs.Node] = []
    for node, index, values in edits:
        node.inputs[index] = G.make_constant(G.unique_name(graph, f"{node.inputs[index].name}_awq"), values)
        if all(node is not e for e in edited):
            edited.append(node)
    for node in edited:  # each now outputs its old values / s: new names, and the rule tag
        if node.outputs[0] is not x:
            node.outputs[0].name = G.unique_name(graph, f"{node.outputs[0].name}_awq")
        if node.name:
            G.node_metadata(graph).setdefault(node.name, {})[G.RULE_KEY] = FOLD_RULE
    name = muls[0].outputs[0].name
    for mul in muls:
        out = mul.outputs[0]
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = x
        G.drop_node(mul)
    x.name = name


def _layer(graph: gs.Graph, mul: gs.Node) -> str:
    """The AWQ layer a Mul feeds, by module name where known."""
    layer = next(iter(mul.outputs[0].outputs), None)
    return mul.name if layer is None else G.module_of(graph, layer) or layer.name


# ---- folding rules: which inputs of the producer change so that it outputs x / s (inv = 1/s, last axis) ----

def _fold(graph: gs.Graph, tensor, inv: np.ndarray) -> list[Edit] | str:
    node = G.producer(tensor)
    if node is None:
        return f"'{tensor.name}' has no producer op (a graph input or constant)"
    if node.outputs[0] is not tensor:
        return f"'{tensor.name}' is not the first output of {node.op} '{node.name}'"
    rule = FOLD_RULES.get(node.op)
    if rule is None:
        return f"its producer {node.op} '{node.name}' cannot absorb a per-channel scale"
    return rule(graph, node, inv)


def _fold_mul(graph, node, inv):  # (h * g) / s = h * (g / s)
    index = _const_operand(node)
    return f"Mul '{node.name}' has no constant operand" if index is None else _scale_input(node, index, inv)


def _fold_add(graph, node, inv):  # (a + c) / s = a / s + c / s
    index = _const_operand(node)
    if index is None:
        return f"Add '{node.name}' has no constant operand"
    a = node.inputs[1 - index]
    if len(a.outputs) != 1 or G.is_graph_output(graph, a):
        return f"'{a.name}' (into Add '{node.name}') is also read elsewhere"
    return _combine(_scale_input(node, index, inv), _fold(graph, a, inv))


def _fold_norm(graph, node, inv):  # normalized(h) * scale + bias: scale / s, bias / s
    present = [i for i in (1, 2) if i < len(node.inputs) and not node.inputs[i].is_empty()]
    return _combine(*(_scale_input(node, i, inv) for i in present))


def _fold_matmul(graph, node, inv):  # h @ W: W's output columns / s
    return _scale_weight(graph, node, 1, -1, inv)


def _fold_gemm(graph, node, inv):  # alpha * A' @ B' + beta * C: B' columns / s (B's axis 0 when transB), C / s
    edits = [_scale_weight(graph, node, 1, 0 if node.attrs.get("transB", 0) else -1, inv)]
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        edits.append(_scale_input(node, 2, inv))
    return _combine(*edits)


FOLD_RULES = {"Mul": _fold_mul, "Add": _fold_add, "MatMul": _fold_matmul, "Gemm": _fold_gemm,
              **dict.fromkeys(NORM_OPS, _fold_norm)}


# ---- helpers ----

def _const_operand(node: gs.Node) -> int | None:
    """The index (0 or 1) of a binary op's only constant operand, else None."""
    consts = [i for i, t in enumerate(node.inputs[:2]) if G.const_values(t) is not None]
    return consts[0] if len(consts) == 1 else None


def _scale_input(node: gs.Node, index: int, inv: np.ndarray, axis: int = -1) -> list[Edit] | str:
    values = G.const_values(node.inputs[index])
    scaled = None if values is None else _times(values, inv, axis)
    if scaled is None:
        return (f"input '{node.inputs[index].name}' of {node.op} '{node.name}' is not a float constant with "
                f"{inv.size} channels on the scaled axis")
    return [(node, index, scaled)]


def _scale_weight(graph: gs.Graph, node: gs.Node, index: int, axis: int, inv: np.ndarray) -> list[Edit] | str:
    """A GEMM weight's output columns (on `axis`) / s: a float constant, or the scales of its DequantizeLinear."""
    w = node.inputs[index]
    if w.shape is not None and len(w.shape) < 2:
        return f"weight '{w.name}' of {node.op} '{node.name}' is not a matrix"
    if G.const_values(w) is not None:
        return _scale_input(node, index, inv, axis)
    dq = G.producer(w)
    if dq is None or dq.op != "DequantizeLinear" or len(w.outputs) != 1 or G.const_values(dq.inputs[0]) is None:
        return f"weight '{w.name}' of {node.op} '{node.name}' is not a constant (nor a DequantizeLinear of one)"
    scale = G.const_values(dq.inputs[1])
    rank = G.const_values(dq.inputs[0]).ndim
    if scale is not None and scale.ndim == 1 and scale.size > 1 and not dq.attrs.get("block_size", 0):
        if int(dq.attrs.get("axis", 1)) % rank != axis % rank:  # per-axis scales on another axis
            return f"DequantizeLinear '{dq.name}' has per-axis scales on another axis than the output columns"
        return _scale_input(dq, 1, inv)
    if scale is None or scale.ndim != rank:
        return f"DequantizeLinear '{dq.name}' has no per-column scales to scale"
    return _scale_input(dq, 1, inv, axis)


def _times(values: np.ndarray, inv: np.ndarray, axis: int) -> np.ndarray | None:
    """values * inv along `axis` in float64, in values' dtype (a scalar becomes the vector); None: no such axis."""
    if values.dtype.kind != "f":
        return None
    if values.size == 1 and values.ndim <= 1 and axis == -1:
        return (values.astype(np.float64).reshape(()) * inv).astype(values.dtype)
    if values.ndim == 0 or values.shape[axis] != inv.size:
        return None
    shape = [1] * values.ndim
    shape[axis] = inv.size
    return (values.astype(np.float64) * inv.reshape(shape)).astype(values.dtype)


def _combine(*parts: list[Edit] | str) -> list[Edit] | str:
    """All edits, or the first reason one of them could not be made."""
    reason = next((p for p in parts if isinstance(p, str)), None)
    return reason if reason is not None else [e for p in parts for e in p]
