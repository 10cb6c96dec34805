"""FP8 block scaling (DeepSeek style): pre-quantized 128x128-block FP8 weights and dynamic 1x128-block FP8
activations, in standard ONNX (opset 21).

Does the following transformation, for MatMul nodes whose recipe rule has an fp8 weight with
`granularity = "block", block = [128, 128]` and an fp8 activation with `granularity = "block", block = [1, 128],
mode = "dynamic"`:
- MatMul(x, W[K,N] float const)  ->  MatMul(DQ(Q(x, s(x))), DQ(W_q fp8 [K,N], S[K/128, N], axis=0, block_size=128))
  * weights: one scale per 128x128 block (`plugins.fp8_block_gemm.format.quantize_weight_blocks`), written as
    ONNX/TensorRT's blocked DequantizeLinear along K whose scale row repeats each block's scale over its 128
    columns (ONNX blocks run along one axis; the values are exactly the 128x128 block scales).
  * activations: `s(x) = Max(Div(ReduceMax(Abs(Reshape(x, [..., K/128, 128])), axes=[-1], keepdims=0), 448),
    MIN_SCALE)` [..., K/128], then `QuantizeLinear(x, s, axis=-1, block_size=128, output_dtype=FLOAT8E4M3FN)`
    -> `DequantizeLinear(., s, axis=-1, block_size=128)` (one Q/DQ per activation tensor, shared by its GEMMs).
TensorRT cannot build the activation part as written (its Q scales must be build-time constants); the
equivalent TensorRT form is `trt::TRT_DynamicQuantize(x, block_shape=[1, 128], output_type=FP8,
scale_type=FLOAT)` + DQ (README, recipe fp8_block). Declined, with a reason: a non-constant or non-2-D weight,
K or N not a multiple of 128, K < min_k or N < min_n, an activation spec other than dynamic 1x128 FP8.
"""
from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.plugins import formats
from qcompile.plugins.fp8_block_gemm.format import BLOCK, quantize_weight_blocks
from qcompile.recipes.schema import Recipe

__all__ = ["QuantizeFp8BlockPass", "fp8_block_targets", "make_dynamic_block_qdq", "dynamic_block_input"]

WEIGHT_BLOCK, ACT_BLOCK = (BLOCK, BLOCK), (1, BLOCK)


def fp8_block_targets(graph: gs.Graph, recipe: Recipe) -> list[tuple[gs.Node, object]]:
    """(MatMul node, rule) pairs whose rule asks for an FP8 block-scaled weight."""
    found = []
    for node in graph.nodes:
        rule = recipe.rule_for(node.op, node.name, G.module_of(graph, node)) if node.op == "MatMul" else None
        if rule is not None and rule.weight is not None and rule.weight.format == "fp8" \
                and rule.weight.granularity == "block":
            found.append((node, rule))
    return found


def decline_reason(node: gs.Node, w: np.ndarray | None, rule, recipe: Recipe) -> str | None:
    """Why MatMul `node` with weight values `w` cannot be FP8 block-quantized (None: it can)."""
    act = rule.activation
    if rule.weight.block != WEIGHT_BLOCK:
        return f"fp8 weight block {list(rule.weight.block)} is not [128, 128]"
    if act is None or act.format != "fp8" or act.granularity != "block" or act.block != ACT_BLOCK \
            or act.mode != "dynamic":
        return "fp8 block weights need fp8 activations with granularity \"block\", block [1, 128], mode \"dynamic\""
    if w is None:
        return f"weight '{node.inputs[1].name}' is not a constant initializer"
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return f"weight '{node.inputs[1].name}' is not a 2-D float matrix (shape {w.shape}, {w.dtype})"
    k, n = w.shape
    opts = recipe.placement.for_op(node.op)
    if k % BLOCK or n % BLOCK:
        return f"K={k} or N={n} is not a multiple of {BLOCK} (128x128 weight blocks)"
    if k < opts.min_k or n < opts.min_n:
        return f"K={k} < min_k={opts.min_k} or N={n} < min_n={opts.min_n}"
    if node.inputs[0].shape is None:
        return f"activation '{node.inputs[0].name}' has no known rank"
    return None


def make_dynamic_block_qdq(graph: gs.Graph, x, k: int, tag: str) -> tuple[list[gs.Node], gs.Variable]:
    """The dynamic 1x128 FP8 Q -> DQ of x [..., K] (nodes not yet added; returns (nodes, dequantized x))."""
    def const(name, value):
        return G.make_constant(G.unique_name(graph, f"{tag}_{name}"), np.asarray(value))

    def var(name, dtype=np.float32, shape=None):
        return gs.Variable(G.unique_name(graph, f"{tag}_{name}"), dtype=dtype, shape=shape)

    def node(op, inputs, out, **attrs):
        return gs.Node(op, name=G.unique_name(graph, f"{tag}/{op}"), inputs=inputs, outputs=[out], attrs=attrs)

    lead = [0] * (len(x.shape) - 1)  # Reshape's 0 keeps the leading (dynamic) dims
    xb, a, amax, s0, s = var("blocks"), var("abs"), var("amax"), var("scale_unclamped"), var("block_scale")
    xq = var("quantized", ml_dtypes.float8_e4m3fn, x.shape)
    out = var("dequantized", x.dtype, x.shape)
    blocked = {"axis": -1, "block_size": BLOCK}
    nodes = [
        node("Reshape", [x, const("block_shape", np.array(lead + [k // BLOCK, BLOCK], np.int64))], xb),
        node("Abs", [xb], a),
        node("ReduceMax", [a, const("axes", np.array([-1], np.int64))], amax, keepdims=0),
        node("Div", [amax, const("qmax", np.float32(formats.qmax("fp8")))], s0),
        node("Max", [s0, const("min_scale", np.float32(formats.MIN_SCALE))], s),
        node("QuantizeLinear", [x, s], xq, output_dtype=onnx.TensorProto.FLOAT8E4M3FN, **blocked),
        node("DequantizeLinear", [xq, s], out, **blocked),
    ]
    return nodes, out


def dynamic_block_input(q: gs.Node):
    """x when QuantizeLinear `q` is the dynamic 1x128 FP8 quantization of `make_dynamic_block_qdq`, else None."""
    x, scale = q.inputs[0], q.inputs[1]
    chain = []
    for op in ("Max", "Div", "ReduceMax", "Abs", "Reshape"):
        producer = G.producer(scale)
        if producer is None or producer.op != op:
            return None
        chain.append(producer)
        scale = producer.inputs[0]
    mx, div, rmax, _, reshape = chain
    shape, axes = G.const_values(reshape.inputs[1]), G.const_values(rmax.inputs[1])
    qmax, tiny = G.const_values(div.inputs[1]), G.const_values(mx.inputs[1])
    if reshape.inputs[0] is not x or shape is None or axes is None or qmax is None or tiny is None:
        return None
    if int(shape.reshape(-1)[-1]) != BLOCK or [int(a) for a in axes.reshape(-1)] != [-1] \
            or int(rmax.attrs.get("keepdims", 1)) or float(qmax.reshape(-1)[0]) != formats.qmax("fp8") \
            or float(tiny.reshape(-1)[0]) != formats.MIN_SCALE:
        return None
    if q.attrs.get("output_dtype") != onnx.TensorProto.FLOAT8E4M3FN or int(q.attrs.get("block_size", 0)) != BLOCK \
            or int(q.attrs.get("axis", 1)) not in (-1, len(x.shape or ()) - 1):
        return None
    return x


class QuantizeFp8BlockPass(InPlacePass):
    """Quantizes the recipe's FP8 block-scaled MatMuls (see the module docstring)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        shared: dict[str, gs.Variable] = {}
        for node, rule in fp8_block_targets(graph, self.recipe):
            w = G.const_values(node.inputs[1])
            reason = decline_reason(node, w, rule, self.recipe)
            if reason:
                declined.append((node.name, reason))
                continue
            node.inputs[1] = self._weight(graph, node, w)
            x = node.inputs[0]
            if x.name not in shared:
                nodes, shared[x.name] = make_dynamic_block_qdq(graph, x, w.shape[0], x.name)
                graph.nodes.extend(nodes)
                stats["dynamic_activation_qdq"] += 1
            node.inputs[0] = shared[x.name]
            stats["quantized"] += 1
            stats["bytes_saved"] += int(w.nbytes - w.size - w.size // BLOCK * 4)
        if stats["quantized"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, bool(stats["quantized"]), stats, declined)

    @staticmethod
    def _weight(graph: gs.Graph, node: gs.Node, w: np.ndarray) -> gs.Variable:
        """DQ(W_q fp8 [K,N], S [K/128, N], axis=0, block_size=128) in front of `node`; returns its output."""
        q, s = quantize_weight_blocks(torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)))
        base = node.inputs[1].name
        w_q = q.t().contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        scale = np.repeat(s.t().numpy(), BLOCK, axis=1)  # [K/128, N]: each 128x128 block's scale on its columns
        out = gs.Variable(G.unique_name(graph, f"{base}_dq"), dtype=np.float32, shape=list(w.shape))
        graph.nodes.append(gs.Node(
            "DequantizeLinear", name=G.unique_name(graph, f"{node.name}/weight_dq"),
            inputs=[G.make_constant(G.unique_name(graph, f"{base}_fp8"), w_q),
                    G.make_constant(G.unique_name(graph, f"{base}_scale"), scale)],
            outputs=[out], attrs={"axis": 0, "block_size": BLOCK}))
        return out
