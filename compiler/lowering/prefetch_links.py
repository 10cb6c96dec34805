"""Weight prefetch links between GEMM plugin nodes (`LoweringOptions.prefetch_weights`).

A decode step on a GPU alternates weight-streaming GEMMs with small kernels (norms, rotary embedding, attention at one
token) during which HBM sits idle. With this link each INT4 GEMM plugin node also receives the engine weight of the
next one in node order (the prepared key `PREFETCH`); its one-row CUDA GEMV asks L2 for those bytes when it is done
(`plugins/triton_tiles.prefetch_l2_share`), so the next GEMM finds part or all of its weight there. The link is a
second reference to the same buffer: nothing is copied and results do not change.
"""
from __future__ import annotations

from qcompile.plugins.int4_gemm import onnx_schema

WEIGHT = "w_packed"  # the prepared key of an INT4 GEMM plugin's engine weight (`ops/int4_plugin.py`)
PREFETCH = "prefetch"  # the prepared key a linked node gets: the next node's weight buffer


def link_next_weights(nodes: list) -> int:
    """Give each INT4 GEMM plugin node with a prepared `WEIGHT` the buffer name of the next such node's, under
    `PREFETCH` (the interpreter's node tuples: (ctx, converter, inputs, outputs, prepared {key: buffer name}));
    the last one gets none. Returns the number of links."""
    weighted = [prepared for ctx, *_, prepared in nodes
                if (ctx.domain, ctx.op_type) == (onnx_schema.DOMAIN, onnx_schema.OP_TYPE) and prepared
                and WEIGHT in prepared]
    for prepared, following in zip(weighted, weighted[1:]):
        prepared[PREFETCH] = following[WEIGHT]
    return max(len(weighted) - 1, 0)
