"""Graph cleanup: algebraic no-ops, constant folding, dead nodes, order and shapes.

Does the following transformation:
- Identity(x) -> x;  Cast(x, to=dtype(x)) -> x;  Transpose(x, perm=identity) -> x;  Reshape(x, shape(x)) -> x
- constant subgraphs (not Q/DQ: graph-surgeon never folds those) -> initializers
- nodes whose outputs nobody reads -> removed; nodes -> topological order
- tensor dtypes/shapes -> filled in by ONNX shape inference
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult

__all__ = ["CleanupPass"]


def _same_static_shape(x, shape) -> bool:
    s, v = G.static_shape(x), G.const_values(shape)
    return s is not None and v is not None and tuple(int(d) for d in v) == s and 0 not in s and -1 not in v


def _identity_perm(perm) -> bool:
    return perm is not None and list(perm) == list(range(len(perm)))


# (op type, predicate) -> the node is a no-op and its output can be replaced by its first input.
NOOP_TABLE = [
    ("Identity", lambda n: True),  # Identity(x) -> x
    ("Cast", lambda n: G.onnx_dtype(n.inputs[0]) == int(n.attrs.get("to", -1))),  # Cast(x: T, to=T) -> x
    ("Transpose", lambda n: _identity_perm(n.attrs.get("perm"))),  # Transpose(x, perm=[0..r-1]) -> x
    ("Reshape", lambda n: _same_static_shape(n.inputs[0], n.inputs[1])),  # Reshape(x, shape(x)) -> x
]


class CleanupPass(InPlacePass):
    """Removes no-ops (`NOOP_TABLE`), folds constants, drops dead nodes, sorts, infers shapes.

    Args:
        fold_constants (bool): run graph-surgeon constant folding (needs ONNX Runtime). Defaults to True.
        infer_shapes (bool): run ONNX shape inference and copy the results onto the graph. Defaults to True.
    """

    def __init__(self, fold_constants: bool = True, infer_shapes: bool = True):
        self.fold_constants = fold_constants
        self.infer_shapes = infer_shapes

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        before = len(graph.nodes)
        for node in list(graph.nodes):
            for op, is_noop in NOOP_TABLE:
                if node.op == op and node.inputs and node.outputs and is_noop(node) and _bypass(graph, node):
                    stats[f"removed_{op}"] += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats["removed_dead"] = before - sum(stats.values()) - len(graph.nodes)
        if self.fold_constants and graph.nodes:
            n = len(graph.nodes)
            graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
            stats["folded"] = n - len(graph.nodes)
        if self.infer_shapes:
            stats["shapes_inferred"] = _infer_shapes(graph)
        modified = any(v for k, v in stats.items() if k != "shapes_inferred")
        return PassResult(graph, modified, +stats)


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove single-output `node` by connecting its input to its consumers (keeps graph output names)."""
    x, y = node.inputs[0], node.outputs[0]
    if G.is_graph_output(graph, y):
        prod = G.producer(x)
        if prod is None or G.is_graph_output(graph, x) or None not in (x.dtype, y.dtype) and x.dtype != y.dtype:
            return False
        # The producer writes straight into the graph output; x's other readers read y instead.
        for consumer in list(x.outputs):
            if consumer is not node:
                consumer.inputs[[i for i, t in enumerate(consumer.inputs) if t is x][0]] = y
        prod.outputs[[i for i, t in enumerate(prod.outputs) if t is x][0]] = y
        G.drop_node(node)
        return True
    for consumer in list(y.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is y:
                consumer.inputs[i] = x
    G.drop_node(node)
    return True


def _infer_shapes(graph: gs.Graph) -> int:
    """Run ONNX shape inference on an export of `graph`; copy dtypes/shapes back. Returns tensors updated."""
    inferred = G.shape_inference(graph)
    if inferred is None:
        return 0
    tensors = graph.tensors()
    count = 0
    for vi in inferred.graph.value_info:
        t = tensors.get(vi.name)
        tt = vi.type.tensor_type
        if not isinstance(t, gs.Variable) or not tt.elem_type:
            continue
        if t.dtype is None:
            t.dtype = _np_or_onnx(tt.elem_type)
        if t.shape is None and tt.HasField("shape"):
            t.shape = G.tensor_dims(tt)
        count += 1
    return count


def _np_or_onnx(elem_type: int):
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # noqa: BLE001
        return elem_type
