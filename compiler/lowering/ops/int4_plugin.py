"""`qcompile::Int4GroupwiseGemm` -> `torch.ops.qcompile.int4_groupwise_gemm`.

Inputs follow `qcompile.plugins.int4_gemm.onnx_schema` (x, w_q, w_scale, w_zero_point?, bias?); the ONNX
INT4/UINT4 weight (held by the lowering as int8/uint8 values [K, N]) and its zero points are converted to
the engine layout here (`format.onnx_to_engine`: int32 words [K/8, N], int8 zero points; UINT4 shifted
by -8). The conversion is plain torch ops on the initializer, so it is traced into exported programs.
A signed zero point that is an all-zero initializer is dropped (symmetric path).
"""
from __future__ import annotations

import torch
from onnx import TensorProto, numpy_helper

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.int4_gemm import onnx_schema
from qcompile.plugins.int4_gemm.format import onnx_to_engine


@reg(onnx_schema.OP_TYPE, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN)
def int4_groupwise_gemm(ctx, x, w_q, w_scale, w_zero_point=None, bias=None):
    import qcompile.plugins.int4_gemm.op  # noqa: F401  (registers torch.ops.qcompile.int4_groupwise_gemm)

    x, w_q, w_scale = as_tensor(x), as_tensor(w_q), as_tensor(w_scale)
    group = int(ctx.attr("block_size", 0) or 0)
    if w_q.dim() != 2:
        raise ctx.fail(f"w_q must be [K, N], got shape {tuple(w_q.shape)}")
    k, n = w_q.shape
    if group <= 0 or k % group or k % 8:
        raise ctx.fail(f"block_size {group} must be positive and divide K={k}, and K must be a multiple of 8")
    types = ctx.extra.get("input_types", [])
    w_type = types[1] if len(types) > 1 else None
    signed = w_type == TensorProto.INT4 if w_type else w_q.dtype == torch.int8
    if w_type not in (None, TensorProto.INT4, TensorProto.UINT4):
        raise ctx.fail(f"w_q must be INT4 or UINT4, got ONNX type {w_type}")
    zero = None if w_zero_point is None else as_tensor(w_zero_point)
    if zero is not None and signed and _is_zero_constant(ctx.extra.get("initializers", {}).get(3)):
        zero = None
    if zero is None and not signed:
        zero = torch.zeros(k // group, n, dtype=torch.uint8, device=w_q.device)
    w_packed, w_zero = onnx_to_engine(w_q, zero, signed)
    bias = None if bias is None else as_tensor(bias)
    return torch.ops.qcompile.int4_groupwise_gemm(x, w_packed, w_scale, w_zero, bias, group)


def _is_zero_constant(proto) -> bool:
    return proto is not None and not numpy_helper.to_array(proto).any()
