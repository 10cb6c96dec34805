"""Shared by the weight-DQ GEMM fusions (`fuse_int8_wo_gemm`, `fuse_fp8_block_gemm`, `fuse_int4_gemm`):
binding a MatMul fed by a weight DequantizeLinear, absorbing its bias Add, and putting a plugin node in its
place."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G


def bind(graph: gs.Graph, node: gs.Node, weight_dq) -> dict | None:
    """{node, w_dq, bias_add} when MatMul `node`'s weight is produced by a DQ that `weight_dq(dq)` accepts."""
    if len(node.inputs) < 2:
        return None
    w_dq = G.producer(node.inputs[1])
    if w_dq is None or w_dq.op != "DequantizeLinear" or not weight_dq(w_dq):
        return None
    y = node.outputs[0]
    bias_add = None
    if len(y.outputs) == 1 and y.outputs[0].op == "Add" and not G.is_graph_output(graph, y):
        bias_add = y.outputs[0]
    return {"node": node, "w_dq": w_dq, "bias_add": bias_add}


def absorb_bias(node: gs.Node, bias_add: gs.Node | None, n: int) -> tuple[np.ndarray | None, object]:
    """(bias float32 [N] or None, the tensor the plugin node produces): a constant [N] bias Add after `node`
    is dropped and absorbed; otherwise None and the MatMul's own output."""
    y = node.outputs[0]
    if bias_add is not None and sum(x is y for x in bias_add.inputs) == 1:
        other = next(x for x in bias_add.inputs if x is not y)
        b = G.bias_vector(other, n, strict=True)
        if b is not None:
            out = bias_add.outputs[0]
            G.drop_node(bias_add)
            return b.astype(np.float32), out
    return None, y


def take_bias(node: gs.Node, bias_add: gs.Node | None, n: int) -> tuple[np.ndarray, object]:
    """`absorb_bias`, with zeros [N] when there is no bias to absorb."""
    b, y = absorb_bias(node, bias_add, n)
    return (np.zeros(n, np.float32) if b is None else b), y


def replace(graph: gs.Graph, node: gs.Node, schema, inputs: list, y, attrs: dict) -> gs.Node:
    """The plugin node `schema.OP_TYPE` in place of `node` (keeping its name and metadata); `node` is dropped."""
    fused = gs.Node(schema.OP_TYPE, name=node.name or G.unique_name(graph, schema.OP_TYPE), domain=schema.DOMAIN,
                    attrs=attrs, inputs=inputs, outputs=[y])
    meta = G.node_metadata(graph)
    if node.name in meta:
        meta[fused.name] = dict(meta[node.name])
    G.drop_node(node)
    graph.nodes.append(fused)
    return fused
