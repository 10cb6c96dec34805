"""ONNX Runtime's "QOperator" integer ops: DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinearMatMul and
QLinearConv, as in models already quantized by `onnxruntime.quantization` (QOperator format or `quantize_dynamic`).

Integer products are accumulated exactly (zero points subtracted, then float64 math, exact for any realistic
size) and requantized as ONNX says: `saturate(round_half_even(acc * a_scale * b_scale / y_scale) + y_zero_point)`.
These run as plain torch ops, exact but not fast: quantizing the float model with a qcompile recipe is what gives
the quantized GEMM plugins.
"""
from __future__ import annotations

import torch

from qcompile.lowering.ops.nn import conv
from qcompile.lowering.ops.dtypes import FP8_MAX
from qcompile.lowering.ops.quant import INT_RANGES
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor

_RANGE = {torch.int8: INT_RANGES["int8"], torch.uint8: INT_RANGES["uint8"]}
OP_TYPES = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")


@reg("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx, x):
    """uint8 with the scale and zero point that map [min(x, 0), max(x, 0)] onto [0, 255]."""
    x = as_tensor(x).float()
    low, high = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    scale = (high - low) / 255
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    y = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return y.to(torch.uint8), scale, zero_point.to(torch.uint8)


@reg("MatMulInteger", since=10)
def matmul_integer(ctx, a, b, a_zero_point=None, b_zero_point=None):
    """int32 `(A - a_zero_point) @ (B - b_zero_point)`; A's zero point per row or tensor, B's per column or tensor."""
    a, b = as_tensor(a), as_tensor(b)
    return torch.matmul(_shifted(a, a_zero_point, -2), _shifted(b, b_zero_point, -1)).to(torch.int32)


@reg("ConvInteger", since=10)
def conv_integer(ctx, x, w, x_zero_point=None, w_zero_point=None):
    """int32 convolution of `x - x_zero_point` and `w - w_zero_point` (w's zero point per output channel or tensor)."""
    x, w = as_tensor(x), as_tensor(w)
    return conv(ctx, _shifted(x, x_zero_point, 1), _shifted(w, w_zero_point, 0)).round().to(torch.int32)


@reg("QLinearMatMul", since=10)
def qlinear_matmul(ctx, a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    a, b = as_tensor(a), as_tensor(b)
    acc = torch.matmul(_shifted(a, a_zero_point, -2), _shifted(b, b_zero_point, -1))
    scale = _per(a_scale, a.ndim, -2) * _per(b_scale, b.ndim, -1)
    return _requantize(acc, scale, y_scale, y_zero_point, -1)


@reg("QLinearConv", since=10)
def qlinear_conv(ctx, x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, bias=None):
    """The int32 bias is in units of x_scale * w_scale, added to the accumulator before requantizing."""
    x, w = as_tensor(x), as_tensor(w)
    acc = conv(ctx, _shifted(x, x_zero_point, 1), _shifted(w, w_zero_point, 0))
    channels = [1, -1] + [1] * (acc.ndim - 2)
    if bias is not None:
        acc = acc + as_tensor(bias).double().reshape(channels)
    scale = as_tensor(x_scale).double().reshape(()) * as_tensor(w_scale).double().reshape(channels)
    return _requantize(acc, scale, y_scale, y_zero_point, 1)


def _shifted(q: torch.Tensor, zero_point, axis: int) -> torch.Tensor:
    """`q - zero_point` in float64; a zero point of several values lies along `axis`."""
    values = q.double()
    return values if zero_point is None else values - _per(zero_point, q.ndim, axis)


def _per(value, ndim: int, axis: int) -> torch.Tensor:
    """A scalar or 1-D scale / zero point in float64, shaped to broadcast along `axis` of an `ndim`-D tensor."""
    value = as_tensor(value).double()
    if value.numel() == 1:
        return value.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return value.reshape(shape)


def _requantize(acc: torch.Tensor, scale: torch.Tensor, y_scale, y_zero_point, axis: int) -> torch.Tensor:
    """saturate(round_half_even(acc * scale / y_scale) + y_zero_point) in the zero point's type (float8 types:
    saturated, then rounded by the cast)."""
    zero_point = as_tensor(y_zero_point)
    y = acc * scale / _per(y_scale, acc.ndim, axis)
    if zero_point.dtype in FP8_MAX:
        return torch.clamp(y, -FP8_MAX[zero_point.dtype], FP8_MAX[zero_point.dtype]).to(zero_point.dtype)
    low, high = _RANGE[zero_point.dtype]
    return torch.clamp(torch.round(y) + _per(zero_point, acc.ndim, axis), low, high).to(zero_point.dtype)
