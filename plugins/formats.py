"""Quantized number formats shared by passes and plugins: ranges, scales, numpy and torch quantizers.

Semantics follow ONNX QuantizeLinear (and TensorRT's IQuantizeLayer): symmetric,
`q = saturate(round_half_even(x / scale))` for integers, `q = cast_fp8(clamp(x / scale, ±448))`
for FP8 E4M3FN. Scales are float32 and strictly positive.

The torch quantizers (`quantize_activation`, `dynamic_row_scales`) are what the plugin ops run on their
activations: plain aten ops, so AOTInductor fuses them into the kernel that produces x (torch is
imported lazily: passes use only the numpy side).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx

# format name -> (largest magnitude, numpy dtype, ONNX TensorProto dtype)
FORMATS = {
    "int8": (127.0, np.dtype(np.int8), onnx.TensorProto.INT8),
    "fp8": (448.0, np.dtype(ml_dtypes.float8_e4m3fn), onnx.TensorProto.FLOAT8E4M3FN),
    "int4": (7.0, np.dtype(ml_dtypes.int4), onnx.TensorProto.INT4),
}
# The smallest scale we emit: keeps all-zero channels valid (TensorRT rejects scale <= 0).
MIN_SCALE = float(np.finfo(np.float32).tiny)


def qmax(fmt: str) -> float:
    """Largest representable magnitude of `fmt` (127 for int8, 448 for fp8, 7 for int4)."""
    return FORMATS[fmt][0]


def numpy_dtype(fmt: str) -> np.dtype:
    return FORMATS[fmt][1]


def onnx_dtype(fmt: str) -> int:
    return FORMATS[fmt][2]


def format_of_onnx_dtype(dtype: int) -> str | None:
    """The format name of an ONNX TensorProto dtype, or None if it is not a quantized format."""
    return next((name for name, (_, _, t) in FORMATS.items() if t == dtype), None)


def scale_from_amax(amax: np.ndarray | float, fmt: str) -> np.ndarray:
    """Symmetric scale `amax / qmax`, float32, floored at MIN_SCALE so it is always positive."""
    amax = np.asarray(amax, dtype=np.float64)
    if not np.all(np.isfinite(amax)):
        raise ValueError("amax must be finite")
    return np.maximum(np.abs(amax) / qmax(fmt), MIN_SCALE).astype(np.float32)


def weight_amax(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Per-tensor (axis None) or per-channel (max over every axis but `axis`) absolute max."""
    w = np.abs(weight.astype(np.float32))
    if axis is None:
        return np.asarray(w.max(), dtype=np.float32)
    axis = axis % weight.ndim
    return w.max(axis=tuple(a for a in range(weight.ndim) if a != axis))


def broadcast_scale(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a 1-D per-axis scale so it broadcasts against a tensor of rank `ndim`."""
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0 or axis is None:
        return scale
    shape = [1] * ndim
    shape[axis % ndim] = scale.size
    return scale.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, fmt: str, axis: int | None = None) -> np.ndarray:
    """Quantize `x` with a per-tensor or per-axis `scale`, exactly as ONNX QuantizeLinear does."""
    y = x.astype(np.float32) / broadcast_scale(scale, x.ndim, axis)
    limit = qmax(fmt)
    if fmt == "fp8":
        return np.clip(y, -limit, limit).astype(numpy_dtype(fmt))
    lo = -limit - 1  # two's complement: int8 [-128, 127], int4 [-8, 7]
    return np.clip(np.rint(y), lo, limit).astype(numpy_dtype(fmt))


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Dequantize to float32 (`q * scale`), the inverse of `quantize` up to rounding."""
    return q.astype(np.float32) * broadcast_scale(scale, q.ndim, axis)


# ------------------------------------------------------------------ torch: the plugins' activation quantizers

def quantize_activation(x, x_scale, dtype):
    """ONNX QuantizeLinear (zero point 0) of torch tensor `x` to torch.int8 or torch.float8_e4m3fn, in float32.

    `x_scale` broadcasts against x (a scalar: per tensor; [M, 1] for x [M, K]: per row).
    int8: round half to even, saturate to [-128, 127]. fp8: saturate to ±448, cast (round to nearest even).
    """
    import torch

    y = x.to(torch.float32) / x_scale.to(torch.float32)
    if dtype == torch.int8:
        # rint and an integer clamp commute, so clamping first is exact and keeps the cast in range.
        return torch.round(torch.clamp(y, -qmax("int8") - 1, qmax("int8"))).to(torch.int8)
    if dtype == torch.float8_e4m3fn:
        return torch.clamp(y, -qmax("fp8"), qmax("fp8")).to(torch.float8_e4m3fn)
    raise ValueError(f"quantize_activation: dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")


def dynamic_row_scales(x2d, fmt: str = "fp8"):
    """Per-row (per-token) dynamic scales of x [M, K]: `max(amax(|x[m, :]|) / qmax, MIN_SCALE)`, float32 [M].

    The floor keeps all-zero rows valid (they quantize to 0)."""
    import torch

    amax = x2d.abs().amax(dim=-1).to(torch.float32)
    return torch.clamp(amax / qmax(fmt), min=MIN_SCALE)
