"""Horizontal GEMM fusion for the engine: sibling GEMMs that read the same activation become one wider GEMM.

Does the following transformation (on the graph the engine is lowered from; the plugin graph that users see,
that reports list and that per-layer validation reads keeps one node per layer):
- MatMul(x, W_1 [K, N_1]), ..., MatMul(x, W_n [K, N_n])   (constant weights of one dtype)
  -> Split(MatMul(x, Concat(W_1, ..., W_n) [K, N_1 + ... + N_n]), [N_1, ..., N_n], axis=-1)
- the same for plugin nodes of one op type with equal attributes and the same optional inputs:
  Int4GroupwiseGemm without activation quantization, Int8WeightOnlyGemm, Fp4Gemm (when the per-tensor global
  scales are equal: always for MXFP4) and Fp4GemmW4A4 (equal weight and activation global scales: the
  activation's NVFP4 quantization is dynamic per row block, so one x gives the same codes for every sibling);
  each constant input is concatenated along its N axis (`N_AXES`).

Why: at decode (one row of x) each GEMM is a weight-streaming kernel whose launch, split-K zero fill and
tail cost several µs; attention's Q/K/V projections (and the MLP's gate/up) share their input, so one launch
streams all their weights. Every output column is computed as before (column blocks of one GEMM).
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.plugins.fp4_gemm import onnx_schema as fp4_schema
from qcompile.plugins.int4_gemm import onnx_schema as int4_schema
from qcompile.plugins.int8_wo_gemm import onnx_schema as int8_wo_schema

logger = logging.getLogger(__name__)

__all__ = ["FuseSiblingGemmsPass", "N_AXES", "SAME"]

# (domain, op type) -> {input index: the axis of that constant input that runs along N, or SAME: a constant
# every sibling must hold with equal values (it is not concatenated)}. Input 0 is the shared activation; an
# input not listed here must be absent (e.g. Int4GroupwiseGemm's FP8 x_scale).
SAME = "same"
N_AXES = {
    ("", "MatMul"): {1: 1},
    (int4_schema.DOMAIN, int4_schema.OP_TYPE): {1: 1, 2: 1, 3: 1, 4: 0},
    (int8_wo_schema.DOMAIN, int8_wo_schema.OP_TYPE): {1: 1, 2: 0, 3: 0},
    # weight-only FP4 ([N, K] weights): MXFP4's global scale is 1.0 everywhere; NVFP4 siblings fuse only when
    # their per-tensor global scales are equal, as QuantizeWeightsFp4Pass makes them (one scale per sibling group)
    (fp4_schema.DOMAIN, fp4_schema.OP_TYPE): {1: 0, 2: 0, 3: SAME, 4: 0},
    (fp4_schema.DOMAIN, fp4_schema.OP_TYPE_W4A4): {1: 0, 2: 0, 3: SAME, 4: SAME, 5: 0},
}


def _signature(node: gs.Node) -> tuple | None:
    """What siblings must share to fuse (op, attributes, each constant input's dtype and K extent), or None
    when the node cannot take part: an op not in `N_AXES`, a non-constant weight input, an unlisted input."""
    axes = N_AXES.get((node.domain or "", node.op))
    if axes is None or len(node.outputs) != 1 or len(node.inputs) < 2:
        return None
    if node.op == int4_schema.OP_TYPE and int4_schema.act_quant_of(node.attrs) != "none":
        return None
    parts = []
    for index, tensor in enumerate(node.inputs[1:], start=1):
        if tensor.is_empty():
            parts.append((index, None))
            continue
        axis = axes.get(index)
        if axis is None or not isinstance(tensor, gs.Constant):
            return None
        shape = tuple(tensor.shape)  # dtype and shape from the initializer, without decoding its values
        if axis == SAME:
            parts.append((index, str(tensor.dtype), shape, G.const_values(tensor).tobytes()))
        else:  # every extent but N's must agree
            parts.append((index, str(tensor.dtype), shape[:axis] + shape[axis + 1:], axis))
    return (node.domain or "", node.op, repr(sorted(node.attrs.items())), tuple(parts))


def sibling_groups(graph: gs.Graph) -> list[list[gs.Node]]:
    """Groups of >= 2 candidate nodes that read the same activation (input 0) with one signature."""
    groups = []
    for tensor in graph.tensors().values():
        by_signature = collections.defaultdict(list)
        for node in tensor.outputs:
            if node.inputs and node.inputs[0] is tensor:
                key = _signature(node)
                if key is not None:
                    by_signature[key].append(node)
        groups += [nodes for nodes in by_signature.values() if len(nodes) > 1]
    return groups


class FuseSiblingGemmsPass(InPlacePass):
    """Fuses sibling GEMMs (see the module docstring)."""

    def call(self, graph: gs.Graph) -> PassResult:
        result = PassResult(graph, False)
        groups = sibling_groups(graph)
        for group in groups:
            self._fuse(graph, group)
            result.stats["fused_nodes"] += len(group)
            result.stats["groups"] += 1
        if groups:
            result.modified = True
            graph.cleanup().toposort()
            result.notes.append(f"{result.stats['fused_nodes']} GEMMs sharing an input fused into "
                                f"{len(groups)} wider ones for the engine")
        return result

    @staticmethod
    def _fuse(graph: gs.Graph, group: list[gs.Node]) -> None:
        first = group[0]
        axes = N_AXES[(first.domain or "", first.op)]
        name = G.unique_name(graph, "+".join(n.name for n in group))
        inputs = [first.inputs[0]]
        for index in range(1, len(first.inputs)):
            if first.inputs[index].is_empty() or axes[index] == SAME:
                inputs.append(first.inputs[index])
                continue
            values = np.concatenate([G.const_values(n.inputs[index]) for n in group], axis=axes[index])
            inputs.append(G.make_constant(G.unique_name(graph, f"{name}/input{index}"), values))
        wide = gs.Variable(G.unique_name(graph, f"{name}/wide"), dtype=first.outputs[0].dtype)
        fused = gs.Node(first.op, name=name, attrs=dict(first.attrs), inputs=inputs, outputs=[wide],
                        domain=first.domain)
        widths = [int(n.inputs[1].shape[axes[1]]) for n in group]  # N of each sibling, from its weight
        sizes = G.make_constant(G.unique_name(graph, f"{name}/sizes"), np.array(widths, np.int64))
        outputs = [n.outputs[0] for n in group]
        for node in group:
            node.outputs.clear()
            node.inputs.clear()
        split = gs.Node("Split", name=G.unique_name(graph, f"{name}/split"), attrs={"axis": -1},
                        inputs=[wide, sizes], outputs=outputs)
        graph.nodes += [fused, split]
        logger.debug("fused %s", name)
