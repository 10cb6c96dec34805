"""QuantizeLinear / DequantizeLinear (opsets 10-23): int8/uint8/int4/uint4/fp8, per tensor, per axis, blocked.

ONNX semantics: `q = saturate(round_half_even(x / scale) + zero_point)` for integers,
`q = cast(clamp(x / scale, ±448))` for float8 e4m3fn (saturate=1); `x = (q - zero_point) * scale`.
Math runs in float32; dequantized values come out in the compute dtype (or the scale's dtype).
4-bit data is held unpacked, one value per int8/uint8 element.
"""
from __future__ import annotations

import onnx
import torch

from qcompile.lowering.ops.dtypes import FP8_MAX, onnx_to_torch_dtype
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor

INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15),
              "int16": (-32768, 32767), "uint16": (0, 65535)}


def _expand_scale(ctx, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-tensor / per-axis / blocked scale (or zero point) against `x`."""
    if scale.ndim == 0 or scale.numel() == 1 and scale.ndim <= 1:
        return scale.reshape(())
    axis = ctx.attr("axis", 1) % x.ndim
    block = ctx.attr("block_size", 0)
    if block:
        scale = torch.repeat_interleave(scale, block, dim=axis)
        return scale.narrow(axis, 0, x.shape[axis])
    shape = [1] * x.ndim
    shape[axis] = scale.numel()
    return scale.reshape(shape)


def _target(ctx, y_zero_point) -> tuple[str, torch.dtype]:
    """The quantized type: from the zero point's dtype, else `output_dtype`, else uint8."""
    types = ctx.extra.get("input_types", [])
    code = types[2] if len(types) > 2 else None
    if y_zero_point is not None:
        dtype = y_zero_point.dtype
    elif ctx.attr("output_dtype"):
        code = ctx.attr("output_dtype")
        dtype = onnx_to_torch_dtype(code)
    else:
        code, dtype = onnx.TensorProto.UINT8, torch.uint8
    name = {torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16"}.get(dtype, str(dtype))
    if code in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        name = "int4" if code == onnx.TensorProto.INT4 else "uint4"
    return name, dtype


@reg("QuantizeLinear", since=10)
def quantize_linear(ctx, x, y_scale, y_zero_point=None):
    x, scale = as_tensor(x), as_tensor(y_scale)
    name, dtype = _target(ctx, y_zero_point)
    y = x.float() / _expand_scale(ctx, scale.float(), x)
    if dtype in FP8_MAX:
        if ctx.attr("saturate", 1):
            y = torch.clamp(y, -FP8_MAX[dtype], FP8_MAX[dtype])
        return y.to(dtype)
    y = torch.round(y)
    if y_zero_point is not None:
        y = y + _expand_scale(ctx, as_tensor(y_zero_point).float(), x)
    lo, hi = INT_RANGES[name]
    return torch.clamp(y, lo, hi).to(dtype)


@reg("DequantizeLinear", since=10)
def dequantize_linear(ctx, x, x_scale, x_zero_point=None):
    x, scale = as_tensor(x), as_tensor(x_scale)
    y = x.float()
    if x_zero_point is not None and x.dtype not in FP8_MAX:
        y = y - _expand_scale(ctx, as_tensor(x_zero_point).float(), x)
    y = y * _expand_scale(ctx, scale.float(), x)
    out = onnx_to_torch_dtype(ctx.attr("output_dtype")) if ctx.attr("output_dtype") else scale.dtype
    return y.to(ctx.float_dtype(out))
