"""Attention fusion for the engine: explicit softmax attention becomes one scaled-dot-product-attention node.

Does the following transformation (on the graph the engine is lowered from, as `FuseSiblingGemmsPass`):
- MatMul(Softmax(Add(Mul(MatMul(Q', K'^T), c), mask), axis=-1), V)
  -> qcompile::ScaledDotProductAttention(Q, K, V, mask; scale = a * b * c)
  where Q' = Q or Q * a, K' = K or K * b (the factor before or after the transpose), the scale c a Mul or a Div
  (1 / c) or absent, the mask Add absent or with its operands swapped; a, b, c scalar constants; K'^T a
  Transpose of the last two axes, or the Reshape -> Transpose -> Reshape that torch.onnx writes for it.
Only where each intermediate result feeds the next op alone (and is no graph output), Q, K and V are 4-D with
the batch and head dims the export recorded equal, and Softmax runs over the last axis.

Why: written out, attention materializes the [batch, heads, queries, keys] scores (matmul, scale, mask,
softmax: several kernels, the scores through memory twice). The node lowers to torch's
`scaled_dot_product_attention`, whose fused kernels keep the scores on chip. This is the form torch.onnx writes
for `F.scaled_dot_product_attention` below opset 23, and the form of attention modules that spell it out.
Numerics: the same math; the fused kernels accumulate in fp32 in another order.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.infra import PassResult
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.plugins import attention as schema

__all__ = ["FuseAttentionPass"]

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _feeds_only(graph: gs.Graph, tensor, consumer: gs.Node) -> bool:
    """`tensor` is read by `consumer` alone and is no graph output."""
    return (len(tensor.outputs) == 1 and tensor.outputs[0] is consumer
            and not G.is_graph_output(graph, tensor))


def _scalar(tensor) -> float | None:
    """The value of a one-element constant of rank <= 4 (multiplying 4-D scores by it keeps their shape)."""
    values = G.const_values(tensor)
    return float(values.reshape(())) if values is not None and values.size == 1 and values.ndim <= 4 else None


def _unscaled(graph: gs.Graph, tensor, consumer: gs.Node) -> tuple[object, float, gs.Node]:
    """(x, a, the node reading x) for `tensor` = Mul(x, a) or Div(x, 1 / a), a scalar constant, when `tensor`
    feeds `consumer` only; else (tensor, 1.0, consumer)."""
    node = G.producer(tensor)
    if node is None or node.op not in ("Mul", "Div") or not _feeds_only(graph, tensor, consumer):
        return tensor, 1.0, consumer
    for i in ((1, 0) if node.op == "Mul" else (1,)):
        c = _scalar(node.inputs[i])
        if c is not None and c != 0.0:
            return node.inputs[1 - i], (c if node.op == "Mul" else 1.0 / c), node
    return tensor, 1.0, consumer


def _shape(shapes: dict[str, list], tensor) -> list | None:
    """`tensor`'s dims: as inferred with data propagation (`G.inferred_shapes`), else as recorded on the graph."""
    shape = shapes.get(tensor.name)
    return shape if shape is not None else (None if tensor.shape is None else list(tensor.shape))


def _rank(shapes: dict[str, list], tensor) -> int | None:
    shape = _shape(shapes, tensor)
    return None if shape is None else len(shape)


def _untransposed(graph: gs.Graph, shapes: dict[str, list], kt,
                  consumer: gs.Node) -> tuple[object, gs.Node] | tuple[None, None]:
    """(K, the node reading K) for `kt` = K^T over the last two axes of a 4-D K: Transpose(K, perm=[0, 1, 3, 2]),
    or Reshape(Transpose(Reshape(K, [BH, S, E]), perm=[0, 2, 1]), [B, H, E, S]) (the shapes `_shape` knows);
    else (None, None)."""
    node = G.producer(kt)
    if node is None or not _feeds_only(graph, kt, consumer):
        return None, None
    if node.op == "Transpose":
        k = node.inputs[0]
        perm = list(node.attrs.get("perm", []))
        return (k, node) if _rank(shapes, k) == 4 and perm == [0, 1, 3, 2] else (None, None)
    if node.op != "Reshape" or _rank(shapes, kt) != 4:
        return None, None
    transpose = G.producer(node.inputs[0])
    if transpose is None or transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 2, 1]:
        return None, None
    inner = G.producer(transpose.inputs[0])
    if (inner is None or inner.op != "Reshape" or not _feeds_only(graph, node.inputs[0], node)
            or not _feeds_only(graph, transpose.inputs[0], transpose)):
        return None, None
    k = inner.inputs[0]
    k_shape = _shape(shapes, k)
    if k_shape is None or len(k_shape) != 4 or None in k_shape or _rank(shapes, transpose.inputs[0]) != 3:
        return None, None
    b, h, s, e = k_shape
    return (k, inner) if _shape(shapes, kt) == [b, h, e, s] else (None, None)


class AttentionRule(RewriteRule):
    """MatMul(Softmax(scaled Q K^T (+ mask)), V) -> ScaledDotProductAttention (module docstring)."""

    pattern = ("MatMul",)

    def __init__(self):
        self.shapes: dict[str, list] = {}  # `G.inferred_shapes` of the graph being rewritten (set by the pass)

    def match(self, graph, node):
        softmax = G.producer(node.inputs[0])
        if softmax is None or softmax.op != "Softmax" or not _feeds_only(graph, node.inputs[0], node):
            return None
        scores, mask, consumer = softmax.inputs[0], None, softmax
        add = G.producer(scores)
        if add is not None and add.op == "Add" and _feeds_only(graph, scores, softmax):
            found = [(i, *self._product(graph, add.inputs[i], add)) for i in (0, 1)]
            i, qk, scale = next(((i, qk, scale) for i, qk, scale in found if qk is not None), (None, None, None))
            if qk is None:
                return None
            mask = add.inputs[1 - i]
        else:
            qk, scale = self._product(graph, scores, consumer)
            if qk is None:
                return None
        q, a, _ = _unscaled(graph, qk.inputs[0], qk)
        kt, b, kt_reader = _unscaled(graph, qk.inputs[1], qk)
        k, k_reader = _untransposed(graph, self.shapes, kt, kt_reader)
        if k is None:
            return None
        k, c, _ = _unscaled(graph, k, k_reader)
        return dict(node=node, softmax=softmax, q=q, k=k, v=node.inputs[1], mask=mask, scale=scale * a * b * c)

    @staticmethod
    def _product(graph, tensor, consumer):
        """(the MatMul node, its scale) for `tensor` = MatMul(...) times an optional scalar constant."""
        x, scale, reader = _unscaled(graph, tensor, consumer)
        matmul = G.producer(x)
        if matmul is None or matmul.op != "MatMul" or not _feeds_only(graph, x, reader):
            return None, None
        return matmul, scale

    def check(self, graph, node, softmax, q, k, v, mask, scale):
        default_axis = -1 if (graph.opset or 13) >= 13 else 1
        if softmax.attrs.get("axis", default_axis) not in (-1, 3):
            return MatchResult.fail("the softmax does not run over the keys (last axis)")
        shapes = [_shape(self.shapes, t) for t in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes):
            return MatchResult.fail(f"Q, K, V are not all 4-D with recorded shapes ({shapes})")
        (qb, qh, _, qe), (kb, kh, ks, ke), (vb, vh, vs, _) = shapes
        dims = (qb, qh, qe, kb, kh, ke, vb, vh, vs, ks)
        if None in dims or not (qb == kb == vb and qh == kh == vh and qe == ke and ks == vs):
            return MatchResult.fail(f"Q, K, V shapes {shapes} do not share batch and head dims")
        if any(G.onnx_dtype(t) not in FLOAT_TYPES for t in (q, k, v)):
            return MatchResult.fail("Q, K, V are not float tensors of one known type")
        if mask is not None and (_rank(self.shapes, mask) or 0) > 4:
            return MatchResult.fail(f"the mask has rank {_rank(self.shapes, mask)} > 4")
        return MatchResult.ok()

    def rewrite(self, graph, node, softmax, q, k, v, mask, scale):
        y = node.outputs[0]
        node.outputs.clear()
        fused = gs.Node(schema.OP_TYPE, name=G.unique_name(graph, f"{softmax.name}/attention"), domain=schema.DOMAIN,
                        inputs=[q, k, v] + ([mask] if mask is not None else []), outputs=[y],
                        attrs={"scale": float(scale)})
        graph.nodes.append(fused)
        return [fused]


class FuseAttentionPass(RewritePass):
    """Applies `AttentionRule` everywhere it matches (declines carry the rule's reason)."""

    def __init__(self):
        self.rule = AttentionRule()
        super().__init__([self.rule], name="FuseAttentionPass")

    def call(self, graph: gs.Graph) -> PassResult:
        if not any(n.op == "Softmax" for n in graph.nodes):
            return PassResult(graph, False)
        self.rule.shapes = G.inferred_shapes(graph)  # shapes the graph computes (torch.onnx's K^T reshapes)
        try:
            result = super().call(graph)
        finally:
            self.rule.shapes = {}
        fused = result.stats[AttentionRule.__name__]
        if fused:
            result.notes.append(f"{fused} softmax attention{'s' if fused > 1 else ''} fused into one "
                                "scaled-dot-product attention each for the engine")
        return result
