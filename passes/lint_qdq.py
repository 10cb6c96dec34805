"""Check Q/DQ nodes against ONNX and TensorRT rules (an `ensures`-style checker; changes nothing).

Does the following transformation:
- a valid graph -> the same graph (stats: nodes checked)
- an invalid Q/DQ node -> LintError naming the node, what is wrong and what to do

Rules: scales strictly positive and finite; the quantized type exists at the model's opset
(float8 >= 19, int4/uint4 >= 21, float4e2m1 >= 23) and is one TensorRT accepts (no UINT8, UINT4,
E5M2 or FNUZ types); per-channel scales have dim[axis] elements and only on constants (weights);
blocked scales match block_size along one of the last two axes; zero points are all zero.
"""
from __future__ import annotations

import collections
import logging
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.errors import LintError
from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.plugins.scaled_gemm import onnx_schema

logger = logging.getLogger(__name__)

__all__ = ["LintQDQPass"]

T = onnx.TensorProto
# quantized type -> the opset that introduced it in QuantizeLinear/DequantizeLinear
MIN_OPSET = {T.INT8: 10, T.UINT8: 10, T.INT32: 10, T.FLOAT8E4M3FN: 19, T.FLOAT8E4M3FNUZ: 19, T.FLOAT8E5M2: 19,
             T.FLOAT8E5M2FNUZ: 19, T.INT16: 21, T.UINT16: 21, T.INT4: 21, T.UINT4: 21, T.FLOAT4E2M1: 23}
# types ONNX allows but TensorRT rejects -> what to do instead
REJECTED = {
    T.UINT8: "TensorRT is symmetric INT8 only; give the Q/DQ an INT8 zero point (0)",
    T.UINT4: "TensorRT has no UINT4; quantize to signed INT4 with a zero point of 0",
    T.FLOAT8E5M2: "TensorRT's FP8 is E4M3; use FLOAT8E4M3FN (fp8 recipes do)",
    T.FLOAT8E4M3FNUZ: "TensorRT's FP8 is E4M3FN; use FLOAT8E4M3FN",
    T.FLOAT8E5M2FNUZ: "TensorRT's FP8 is E4M3FN; use FLOAT8E4M3FN",
    T.INT16: "TensorRT has no INT16 Q/DQ; use INT8",
    T.UINT16: "TensorRT has no UINT16 Q/DQ; use INT8",
    T.INT32: "TensorRT dequantizes INT8/FP8/INT4/FP4 only; use INT8",
}


class LintQDQPass(InPlacePass):
    """Raises `LintError` on the first invalid Q/DQ node (or ScaledGemm scale); never modifies the graph."""

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        opset = graph.opset
        for node in graph.nodes:
            if node.op in G.QDQ_OPS and node.domain in ("", "ai.onnx", None):
                _lint_qdq(node, opset)
                stats["checked"] += 1
            elif node.op == onnx_schema.OP_TYPE and node.domain == onnx_schema.DOMAIN:
                for i in (1, 4):
                    _lint_scale(node, node.inputs[i])
                stats["checked"] += 1
        return PassResult(graph, False, stats)

    def ensures(self, graph: gs.Graph) -> None:  # the pass *is* the check
        return None


def _fail(node: gs.Node, msg: str) -> None:
    raise LintError(f"{node.op} node '{node.name}': {msg}")


def _lint_scale(node: gs.Node, scale) -> None:
    s = G.const_values(scale)
    if s is None:
        return
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        _fail(node, f"scale '{scale.name}' has non-finite values; recompute it from a finite amax")
    if np.any(s <= 0):
        _fail(node, f"scale '{scale.name}' has zero or negative values (min {s.min():g}); TensorRT needs "
                    "strictly positive scales (qcompile.plugins.formats.scale_from_amax floors them)")


def _lint_qdq(node: gs.Node, opset: int) -> None:
    data, scale = node.inputs[0], node.inputs[1]
    _lint_scale(node, scale)
    dtype, _ = G.quantized_format(node)
    if dtype is None:
        return
    name = onnx.helper.tensor_dtype_to_string(dtype)
    if node.op == "QuantizeLinear" and (len(node.inputs) < 3 or node.inputs[2].is_empty()) \
            and "output_dtype" not in node.attrs:
        _fail(node, "no zero point and no output_dtype: ONNX quantizes to UINT8, which TensorRT rejects; "
                    "add an INT8 (or FLOAT8E4M3FN) zero point of 0")
    if dtype in REJECTED:
        _fail(node, f"quantized type {name} is not accepted by TensorRT: {REJECTED[dtype]}")
    need = MIN_OPSET.get(dtype)
    if need is None:
        _fail(node, f"quantized type {name} is not a Q/DQ type")
    if opset < need:
        _fail(node, f"quantized type {name} needs opset >= {need}, the model has {opset}; "
                    f"raise the recipe's opset")
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        zp = G.const_values(node.inputs[2])
        if zp is None:
            _fail(node, "zero point is not a constant (TensorRT accepts constant zero points only)")
        if np.any(zp.astype(np.float32) != 0):
            _fail(node, f"zero point '{node.inputs[2].name}' is non-zero; TensorRT is symmetric only "
                        "(fold the offset into a bias, or use symmetric quantization)")
        if tuple(zp.shape) != tuple(scale.shape or ()):
            _fail(node, f"zero point shape {list(zp.shape)} differs from scale shape {list(scale.shape)}")
    s_shape = tuple(scale.shape) if scale.shape is not None else None
    d_shape = tuple(data.shape) if data.shape is not None else None
    if s_shape is None or d_shape is None or not s_shape or s_shape == (1,) and not node.attrs.get("block_size"):
        return
    rank = len(d_shape)
    axis = int(node.attrs.get("axis", 1))
    if not -rank <= axis < rank:
        _fail(node, f"axis {axis} is out of range for data of rank {rank}")
    axis %= rank
    block = int(node.attrs.get("block_size", 0))
    if block:
        _lint_blocked(node, d_shape, s_shape, axis, block)
        return
    if len(s_shape) != 1:
        _fail(node, f"scale shape {list(s_shape)} is neither a scalar, 1-D per-channel, nor blocked "
                    "(set block_size for blocked scales)")
    if isinstance(d_shape[axis], int) and s_shape[0] != d_shape[axis]:
        _fail(node, f"per-channel scale has {s_shape[0]} elements but dim[axis={axis}] of '{data.name}' "
                    f"{list(d_shape)} is {d_shape[axis]}; use the output-channel axis")
    if not _rooted_at_constant(data):
        _fail(node, f"per-channel scale on activation '{data.name}'; TensorRT quantizes activations per tensor "
                    "only (per-channel is for constant weights)")


def _lint_blocked(node, d_shape, s_shape, axis, block) -> None:
    rank = len(d_shape)
    if len(s_shape) != rank:
        _fail(node, f"blocked scale rank {len(s_shape)} != data rank {rank}")
    for i, (d, s) in enumerate(zip(d_shape, s_shape)):
        if not isinstance(d, int):
            continue
        want = math.ceil(d / block) if i == axis else d
        if s != want:
            _fail(node, f"blocked scale shape {list(s_shape)} does not match data {list(d_shape)} with "
                        f"block_size={block} on axis {axis} (dim {i}: expected {want}, got {s})")
    if axis not in (rank - 1, rank - 2):
        _fail(node, f"block axis {axis} is not one of the last two axes (TensorRT blocks only those)")


def _rooted_at_constant(tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    prod = G.producer(tensor)
    return prod is not None and prod.op in ("QuantizeLinear", *G.COPY_OPS) and _rooted_at_constant(prod.inputs[0])
