"""Import ONNX Runtime's 4-bit `com.microsoft::MatMulNBits` layers as INT4 GEMM plugin nodes.

Does the following transformation (weights read by `qcompile.algorithms.ort_nbits`):
- MatMulNBits(x, B, scales, zero_points?, , bias?; K, N, bits=4, block_size=g)
  ->  Int4GroupwiseGemm(x, W_q uint4 [K, N], scale [K/g, N], zero uint4 [K/g, N], bias; block_size=g)
Exact: ONNX Runtime's symmetric quantizer stores negative scales (a block's largest value gets code 0), which
become positive with the codes and zero point mirrored (q -> 15 - q, z -> 15 - z). TensorRT's INT4 Q/DQ form
(signed, zero point 0) cannot hold such blocks exactly, so the portable Q/DQ ONNX keeps the MatMulNBits node and
only the plugin graph (and the engine) carries the INT4 GEMM. Declined (kept, and run by the lowering as a
dequantized float MatMul): other bit widths, g_idx (act-order), weights that are not constants, float zero points
that are not integers in [0, 15].
"""
from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompile.algorithms import ort_nbits
from qcompile.passes import _graph as G
from qcompile.passes import _weight_gemm
from qcompile.passes.infra import PassBase, PassResult
from qcompile.plugins.int4_gemm import onnx_schema

UINT4_MAX = 15


def decline_reason(node: gs.Node) -> str | None:
    """Why a MatMulNBits node cannot become an INT4 GEMM plugin node (None: it can)."""
    if node.attrs.get("bits", 4) != 4:
        return f"bits={node.attrs.get('bits')}: only 4-bit weights map onto the INT4 plugin"
    if _input(node, 4) is not None:
        return "g_idx (act-order) reorders K; the INT4 plugin reads groups in order"
    if any(_input(node, i) is not None and G.const_values(_input(node, i)) is None for i in (1, 2, 3)):
        return "the weight, scales or zero points are not constants"
    return None


def positive_scales(weight: ort_nbits.NBitsWeight) -> ort_nbits.NBitsWeight:
    """The same weight with every scale positive: a negative-scale block's codes and zero point mirrored."""
    flip = weight.scale < 0
    rows = np.repeat(flip, weight.block_size, axis=0)[:weight.codes.shape[0]]
    return ort_nbits.NBitsWeight(np.where(rows, UINT4_MAX - weight.codes, weight.codes).astype(np.uint8),
                                 np.abs(weight.scale), np.where(flip, UINT4_MAX - weight.zero, weight.zero),
                                 weight.block_size)


class ImportMatMulNBitsPass(PassBase):
    """Rewrites 4-bit MatMulNBits nodes as INT4 GEMM plugin nodes (see the module docstring)."""

    def call(self, graph: gs.Graph) -> PassResult:
        stats, declined = collections.Counter(imported=0), []
        for node in [n for n in graph.nodes if n.op == ort_nbits.OP_TYPE and n.domain == ort_nbits.DOMAIN]:
            reason = decline_reason(node)
            weight = None if reason else _weight(node)
            if weight is not None and not np.array_equal(weight.zero, np.clip(np.round(weight.zero), 0, UINT4_MAX)):
                reason = "its float zero points are not integers in [0, 15] (a uint4 zero point cannot hold them)"
            if reason:
                declined.append((node.name, reason))
                continue
            _rewrite(graph, node, positive_scales(weight))
            stats["imported"] += 1
        if not stats["imported"]:
            return PassResult(graph, False, stats, declined)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        note = f"MatMulNBits: {stats['imported']} 4-bit layer(s) in ONNX Runtime's format run as INT4 GEMM plugins"
        return PassResult(graph, True, stats, declined, [note])


def _input(node: gs.Node, index: int):
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _weight(node: gs.Node) -> ort_nbits.NBitsWeight:
    values = [None if _input(node, i) is None else G.const_values(_input(node, i)) for i in (1, 2, 3)]
    return ort_nbits.read(*values, k=node.attrs["K"], n=node.attrs["N"], bits=4, block_size=node.attrs["block_size"])


def _rewrite(graph: gs.Graph, node: gs.Node, weight: ort_nbits.NBitsWeight) -> None:
    base = node.name or G.unique_name(graph, onnx_schema.OP_TYPE)
    constant = lambda key, array: G.make_constant(G.unique_name(graph, f"{base}/{key}"), array)  # noqa: E731
    inputs = [node.inputs[0], constant("w_q", weight.codes.astype(ml_dtypes.uint4)),
              constant("w_scale", weight.scale), constant("w_zero", weight.zero.astype(ml_dtypes.uint4))]
    bias = _input(node, 5)
    if bias is not None:
        inputs.append(bias)
    _weight_gemm.replace(graph, node, onnx_schema, inputs, node.outputs[0], onnx_schema.attributes(weight.block_size))
