"""Plain-torch reference of `qcompile::scaled_gemm`: the CPU path of the op and the test oracle.

Exactly the ONNX function body of `ScaledGemm` (see `onnx_schema`): the activation is quantized with
ONNX QuantizeLinear rules, the low-precision GEMM accumulates exactly (float64 holds every int8/fp8
product sum of realistic K exactly), and the scales and bias are applied once at the end.
"""
from __future__ import annotations

import torch

from qcompile.plugins.formats import dynamic_row_scales, quantize_activation

LOW_PRECISION_DTYPES = (torch.int8, torch.float8_e4m3fn)
FORMAT_OF = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}  # weight dtype -> format name (qcompile.plugins.formats)


def check_args(x, w_q, w_scale, x_scale, bias) -> None:
    """Shape/dtype checks shared by every path (static properties only: safe under tracing)."""
    if w_q.dtype not in LOW_PRECISION_DTYPES:
        raise ValueError(f"scaled_gemm: w_q must be int8 or float8_e4m3fn, got {w_q.dtype}")
    if w_q.dim() != 2:
        raise ValueError(f"scaled_gemm: w_q must be [N, K], got shape {tuple(w_q.shape)}")
    if not x.dtype.is_floating_point or x.dtype in LOW_PRECISION_DTYPES:
        raise ValueError(f"scaled_gemm: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"scaled_gemm: x has K={x.shape[-1]} but w_q is {tuple(w_q.shape)} ([N, K])")
    n = w_q.shape[0]
    if w_scale.dim() > 1 or (w_scale.dim() == 1 and w_scale.shape[0] != n):
        raise ValueError(f"scaled_gemm: w_scale must be [] or [{n}], got {tuple(w_scale.shape)}")
    if x_scale is not None and x_scale.numel() != 1:
        raise ValueError(f"scaled_gemm: x_scale must be a scalar, got shape {tuple(x_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"scaled_gemm: bias must be [{n}], got {tuple(bias.shape)}")


def scaled_gemm_reference(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`y = (Q(x) @ w_q.T) * (x_scale * w_scale) + bias` in x.dtype; weight-only when x_scale is None."""
    check_args(x, w_q, w_scale, x_scale, bias)
    w_scale64 = w_scale.to(torch.float64).reshape(-1)  # [1] or [N]: broadcasts over the last dim
    w64 = w_q.to(torch.float64)  # exact for int8 and fp8
    if x_scale is None:  # weight-only: dequantize the weight, float GEMM
        acc = x.to(torch.float64) @ w64.t()
        y = acc * w_scale64
    else:
        xq = quantize_activation(x, x_scale, w_q.dtype)
        acc = xq.to(torch.float64) @ w64.t()  # exact accumulation
        y = acc * (x_scale.to(torch.float64).reshape(()) * w_scale64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def scaled_gemm_dynamic_reference(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Per-token dynamic activations: `s = dynamic_row_scales(x)`, `y = (Q(x, s) @ w_q.T) * (s * w_scale) + bias`."""
    check_args(x, w_q, w_scale, None, bias)
    n, k = w_q.shape
    x2d = x.reshape(-1, k)
    s = dynamic_row_scales(x2d, FORMAT_OF[w_q.dtype]).reshape(-1, 1)  # float32 [M, 1]
    acc = quantize_activation(x2d, s, w_q.dtype).to(torch.float64) @ w_q.to(torch.float64).t()  # exact
    y = acc * (s.to(torch.float64) * w_scale.to(torch.float64).reshape(-1))
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
