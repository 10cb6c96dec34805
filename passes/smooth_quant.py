"""SmoothQuant: move activation outliers into the weights with per-input-channel factors s (exact in FP).

Does the following transformation (x [..., K] feeds the MatMuls of one group; W' = diag(s) W, x' = x / s):
- Mul(y, gamma[K]) -> x -> MatMul(x, W_i)        ->  Mul(y, gamma / s) -> MatMul(x', W_i')   (RMSNorm as exported)
- LayerNormalization / SimplifiedLayerNormalization / RMSNormalization(y, scale[, bias]) -> x
                                                  ->  the same with scale / s (and bias / s)
- MatMul(z, V[K', K]) (+ Add(·, b[K])) -> x        ->  MatMul(z, V / s) (+ b / s)   (previous linear layer)
- Mul(a, b) -> x, a from a previous linear layer    ->  a / s through that layer (SwiGLU's up_proj)
- anything else (or x read by other nodes too)     ->  MatMul(Mul(x, 1/s), W_i')   (explicit Mul; declined entry
                                                       "no fold: ..." says why, for the build report)
The note (build summary): "SmoothQuant: G groups (L layers), 1/s folded into the producer for F, an explicit Mul
kept for M (layers)".

Groups (`smoothing_groups`): the MatMuls with a constant 2-D weight whose recipe rule is `algorithm =
"smoothquant"` and that `plan_quantization` quantizes, grouped by their input x: they share one s (q/k/v).
The factors come from `qcompile.algorithms.smoothquant` (by the group's input tensor name).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.passes.insert_qdq import plan_quantization
from qcompile.recipes.schema import Recipe, Rule

logger = logging.getLogger(__name__)

__all__ = ["SmoothGroup", "smoothing_groups", "SmoothQuantPass"]

NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


@dataclass
class SmoothGroup:
    """The MatMuls reading activation `x` that share one smoothing vector (in graph order), and their rule."""

    x: str
    nodes: list[str]
    rule: Rule


def smoothing_groups(graph: gs.Graph, recipe: Recipe) -> list[SmoothGroup]:
    """The SmoothQuant groups of `graph` (see the module docstring)."""
    nodes = {n.name: n for n in graph.nodes}
    groups: dict[str, SmoothGroup] = {}
    for t in plan_quantization(graph, recipe):
        node = nodes.get(t.node)
        if not (t.quantized and t.rule.algorithm == "smoothquant" and node is not None and node.op == "MatMul"):
            continue
        w = G.const_values(node.inputs[1])
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            continue
        x = node.inputs[0].name
        groups.setdefault(x, SmoothGroup(x, [], t.rule)).nodes.append(node.name)
    return list(groups.values())


class SmoothQuantPass(InPlacePass):
    """Applies SmoothQuant factors: `s` into the group's weights, `1/s` folded into x's producer (or a Mul).

    Args:
        recipe: selects the groups (`smoothing_groups`).
        factors: s [K] (float, > 0) by the group's input tensor name; groups without factors are left alone.
    """

    def __init__(self, recipe: Recipe, factors: dict[str, np.ndarray]):
        self.recipe = recipe
        self.factors = factors

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        kept: list[str] = []
        tensors = graph.tensors()
        nodes = {n.name: n for n in graph.nodes}
        for group in smoothing_groups(graph, self.recipe):
            if group.x not in self.factors:
                continue
            s = np.asarray(self.factors[group.x], np.float64)
            members = [nodes[n] for n in group.nodes]
            for node in members:
                w = G.const_values(node.inputs[1]).astype(np.float64)
                node.inputs[1] = G.make_constant(G.unique_name(graph, f"{node.inputs[1].name}_smoothed"),
                                                 (w * s[:, None]).astype(np.float32))
            x = tensors[group.x]
            reason = _fold_reason(graph, x, members)
            edits = None if reason else _divide_at(x, s)
            if edits is None:
                reason = reason or f"producer {G.producer(x).op if G.producer(x) else 'graph input'} of '{x.name}' " \
                                   "cannot absorb 1/s"
                _insert_mul(graph, x, members, s)
                declined.append((members[0].name, f"no fold: {reason}; an explicit Mul(x, 1/s) stays"))
                kept.append(G.module_of(graph, members[0]) or members[0].name)
                stats["explicit_mul"] += 1
            else:
                for node, index, value in edits:
                    node.inputs[index] = G.make_constant(G.unique_name(graph, f"{node.inputs[index].name}_smoothed"),
                                                         value.astype(np.float32))
                stats[f"folded_into_{edits[0][0].op}"] += 1
            stats["groups"] += 1
            stats["layers"] += len(members)
        notes = []
        if stats["groups"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            notes.append(f"SmoothQuant: {stats['groups']} groups ({stats['layers']} layers), 1/s folded into the "
                         f"producer for {stats['groups'] - stats['explicit_mul']}, an explicit Mul kept for "
                         f"{stats['explicit_mul']}" + (f" ({', '.join(kept)})" if kept else ""))
        return PassResult(graph, bool(stats["groups"]), stats, declined, notes)


def _fold_reason(graph: gs.Graph, x, members: list[gs.Node]) -> str | None:
    """Why 1/s cannot be folded into x's producer because of x's other readers (None: it can be tried)."""
    if G.is_graph_output(graph, x):
        return f"'{x.name}' is a graph output"
    others = [n for n in x.outputs if n not in members]
    if others:
        return f"'{x.name}' also feeds {others[0].op} '{others[0].name}'"
    return None


def _vector(tensor, k: int) -> np.ndarray | None:
    """A constant that broadcasts along the last axis of a [..., K] tensor, as float64 [K] (None: not one)."""
    v = G.const_values(tensor)
    if v is None or v.dtype.kind != "f" or v.size not in (1, k) or (v.ndim and v.shape[-1] not in (1, k)):
        return None
    return np.broadcast_to(v.astype(np.float64).reshape(-1), (k,)).copy()


def _divide_at(x, s: np.ndarray, depth: int = 0) -> list[tuple[gs.Node, int, np.ndarray]] | None:
    """Constant edits (node, input index, new value) that divide tensor x [..., K] by s, or None."""
    node, k = G.producer(x), s.size
    if node is None or depth > 2:
        return None
    consts = [i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
    if node.op == "Mul" and len(node.inputs) == 2 and len(consts) == 1:  # y * gamma
        v = _vector(node.inputs[consts[0]], k)
        return None if v is None else [(node, consts[0], v / s)]
    if node.op in NORM_OPS and int(node.attrs.get("axis", -1)) == -1:
        edits = []
        for i in (1, 2):
            if i < len(node.inputs) and not node.inputs[i].is_empty():
                v = _vector(node.inputs[i], k)
                if v is None:
                    return None
                edits.append((node, i, v / s))
        return edits or None
    if node.op == "MatMul" and consts == [1]:  # previous linear layer: its output channels are x's channels
        v = G.const_values(node.inputs[1])
        return [(node, 1, v.astype(np.float64) / s)] if v.ndim == 2 and v.shape[1] == k else None
    if node.op == "Add" and len(consts) == 1 and len(node.inputs) == 2:  # linear + bias
        b, a = _vector(node.inputs[consts[0]], k), node.inputs[1 - consts[0]]
        inner = _divide_at(a, s, depth + 1) if b is not None and len(a.outputs) == 1 else None
        return None if inner is None or G.producer(a).op != "MatMul" else inner + [(node, consts[0], b / s)]
    if node.op == "Mul" and not consts and len(node.inputs) == 2 and node.inputs[0] is not node.inputs[1]:
        for a in node.inputs:  # a * b: divide the factor that comes from a linear layer (SwiGLU's up_proj)
            if len(a.outputs) == 1 and G.producer(a) is not None and G.producer(a).op in ("MatMul", "Add"):
                inner = _divide_at(a, s, depth + 1)
                if inner is not None:
                    return inner
    return None


def _insert_mul(graph: gs.Graph, x, members: list[gs.Node], s: np.ndarray) -> None:
    """x -> Mul(x, 1/s) -> the group's MatMuls."""
    inv = G.make_constant(G.unique_name(graph, f"{x.name}_smooth_inv_scale"), (1.0 / s).astype(np.float32))
    out = gs.Variable(G.unique_name(graph, f"{x.name}_smoothed"), dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", name=G.unique_name(graph, f"{members[0].name}/smooth_quant"),
                               inputs=[x, inv], outputs=[out]))
    for node in members:
        node.inputs[0] = out
