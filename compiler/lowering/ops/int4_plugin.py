"""`qcompile::Int4GroupwiseGemm` -> `torch.ops.qcompile.int4_groupwise_gemm`.

Inputs follow `qcompile.plugins.int4_gemm.onnx_schema` (x, w_q, w_scale, w_zero_point?, bias?, x_scale?);
the node's `act_quant` maps to the op's W4A8 arguments: "fp8_static" -> `x_scale` (float32 scalar),
"fp8_dynamic" -> `x_dynamic=True`, "none" (or absent) -> W4A16. The ONNX
INT4/UINT4 weight (held by the lowering as int8/uint8 values [K, N]) and its zero points are converted to
the engine layout by `format.onnx_to_engine` (int32 words [K/8, N], int8 zero points; UINT4 shifted by -8).
For initializer weights (the normal case) the `prepare` hook does that once, when the graph is lowered:
the program then holds only the engine words as a buffer, and exported programs / engines contain no
repacking. A weight computed in the graph is converted in the traced forward instead.
A signed zero point that is an all-zero initializer is dropped (symmetric path).
"""
from __future__ import annotations

import torch
from onnx import TensorProto, numpy_helper

from qcompile.lowering.registry import Prepared
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.int4_gemm import onnx_schema
from qcompile.plugins.int4_gemm.format import onnx_to_engine

W_Q, W_ZERO = 1, 3  # input indices of the weight and its zero point


def _engine_weight(ctx, w_q: torch.Tensor, zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(engine words int32 [K/8, N], engine zero points int8 [K/g, N] or None) of the node's ONNX weight."""
    group = int(ctx.attr("block_size", 0) or 0)
    if w_q.dim() != 2:
        raise ctx.fail(f"w_q must be [K, N], got shape {tuple(w_q.shape)}")
    k, n = w_q.shape
    if group <= 0 or k % group or k % 8:
        raise ctx.fail(f"block_size {group} must be positive and divide K={k}, and K must be a multiple of 8")
    types = ctx.extra.get("input_types", [])
    w_type = types[W_Q] if len(types) > W_Q else None
    if w_type not in (None, TensorProto.INT4, TensorProto.UINT4):
        raise ctx.fail(f"w_q must be INT4 or UINT4, got ONNX type {w_type}")
    signed = w_type == TensorProto.INT4 if w_type else w_q.dtype == torch.int8
    if zero is not None and signed and _is_zero_constant(ctx.extra.get("initializers", {}).get(W_ZERO)):
        zero = None
    if zero is None and not signed:
        zero = torch.zeros(k // group, n, dtype=torch.uint8, device=w_q.device)
    return onnx_to_engine(w_q, zero, signed, group)


def _prepare(ctx, constants: dict[int, torch.Tensor]) -> Prepared | None:
    """The engine weight, once, from constant w_q (and zero point); None when either is computed in the graph."""
    names = ctx.extra.get("input_names", [])
    has_zero = len(names) > W_ZERO and bool(names[W_ZERO])
    if W_Q not in constants or (has_zero and W_ZERO not in constants):
        return None
    w_packed, w_zero = _engine_weight(ctx, constants[W_Q], constants.get(W_ZERO))
    return Prepared({"w_packed": w_packed, "w_zero": w_zero}, replaces=(W_Q, W_ZERO))


@reg(onnx_schema.OP_TYPE, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN, prepare=_prepare)
def int4_groupwise_gemm(ctx, x, w_q, w_scale, w_zero_point=None, bias=None, x_scale=None, *, prepared=None):
    import qcompile.plugins.int4_gemm.op  # noqa: F401  (registers torch.ops.qcompile.int4_groupwise_gemm)

    act_quant = onnx_schema.act_quant_of(ctx.attrs)
    if act_quant not in onnx_schema.ACT_QUANT:
        raise ctx.fail(f"act_quant {act_quant!r} is not one of {', '.join(onnx_schema.ACT_QUANT)}")
    if (x_scale is not None) != (act_quant == "fp8_static"):
        raise ctx.fail(f"act_quant {act_quant!r} " + ("needs the x_scale input (5)" if x_scale is None
                                                      else "takes no x_scale input (5)"))

    if prepared is not None:
        w_packed, w_zero = prepared["w_packed"], prepared.get("w_zero")
    else:
        zero = None if w_zero_point is None else as_tensor(w_zero_point)
        w_packed, w_zero = _engine_weight(ctx, as_tensor(w_q), zero)
    bias = None if bias is None else as_tensor(bias)
    group = int(ctx.attr("block_size"))
    x_scale = None if x_scale is None else as_tensor(x_scale).to(torch.float32).reshape(())
    return torch.ops.qcompile.int4_groupwise_gemm(as_tensor(x), w_packed, as_tensor(w_scale), w_zero, bias, group,
                                                  x_scale, act_quant == "fp8_dynamic",
                                                  ctx.options.fp8_large_m)


def _is_zero_constant(proto) -> bool:
    return proto is not None and not numpy_helper.to_array(proto).any()
