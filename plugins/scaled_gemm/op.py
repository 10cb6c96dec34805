"""`torch.ops.qcompile.scaled_gemm`: the W8A8 (int8 / fp8 e4m3fn) scaled GEMM as a `triton_op`.

The body branches on `x.device.type` (the verified pattern for AOTInductor packages; never use
`register_kernel` for the CPU path, AOTI would still decompose the body):

- CPU (and any non-CUDA device): the plain-torch reference (`reference.py`), lowered to aten.
- CUDA, int8: quantize x (rows padded to M > 16 for `_int_mm`), `torch._int_mm` (cuBLASLt int8,
  int32 accumulate), then `acc * (x_scale * w_scale[n]) + bias` cast to the output dtype.
- CUDA, fp8 (sm89+): quantize x, then `torch._scaled_mm` (cuBLASLt fp8):
  per-tensor weight scale -> tensorwise scales, bias fused in cuBLASLt (fp16/bf16 outputs);
  per-channel + bf16 output -> rowwise scales (`scale_a [M,1]`, `scale_b [1,N]`), bias fused;
  per-channel + fp16/fp32 output -> tensorwise fp32 GEMM + the scale epilogue.
- `x_scale is None` (weight-only, reserved): dequantize the weight, float GEMM.

`torch.ops.qcompile.scaled_gemm_dynamic(x, w_q, w_scale, bias)` (per-token dynamic activations) computes
the row scales `s [M, 1] = dynamic_row_scales(x)` inside the op and runs the same GEMMs with them: int8
`_int_mm` with `s * w_scale` in the epilogue; fp8 `_scaled_mm` rowwise (`scale_a = s [M, 1]`,
`scale_b = w_scale [1, N]`) for bf16 outputs, else the fp32 GEMM + epilogue.

The activation quantization and the scale epilogue are plain aten ops on purpose: AOTInductor inlines
the body of a `triton_op`, so it fuses the quantization into the kernel that produces x (RMSNorm,
SiLU*mul, ...) and the epilogue into the kernel that consumes y. x then crosses memory once, in
8 bits; a standalone quantize kernel would read and write it once more (measured in BENCHMARKS.md).

The body is traceable with fake tensors: it branches only on device, dtypes and static shapes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.formats import dynamic_row_scales, quantize_activation
from qcompile.plugins.fp8_large_m import rowwise_scaled_mm
from qcompile.plugins.gemm_dispatch import add_bias, scalar_buffer
from qcompile.plugins.scaled_gemm.reference import (FORMAT_OF, check_args, scaled_gemm_dynamic_reference,
                                                    scaled_gemm_reference)

INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs M > 16


@torch.library.triton_op("qcompile::scaled_gemm", mutates_args={})
def scaled_gemm(
    x: Tensor,
    w_q: Tensor,
    w_scale: Tensor,
    x_scale: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    """`y[..., N] = (Q(x) @ w_q.T) * (x_scale * w_scale) + bias`, in x.dtype (see the plugin contract)."""
    if x.device.type != "cuda":
        return scaled_gemm_reference(x, w_q, w_scale, x_scale, bias)
    return _scaled_gemm_cuda(x, w_q, w_scale, x_scale, bias)


@torch.library.triton_op("qcompile::scaled_gemm_dynamic", mutates_args={})
def scaled_gemm_dynamic(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`y[..., N] = (Q(x, s) @ w_q.T) * (s * w_scale) + bias` with per-row dynamic scales s (see the module)."""
    if x.device.type != "cuda":
        return scaled_gemm_dynamic_reference(x, w_q, w_scale, bias)
    check_args(x, w_q, w_scale, None, bias)
    n, k = w_q.shape
    w_q = w_q if w_q.stride(1) == 1 else w_q.contiguous()
    x2d = x.reshape(-1, k)
    x_scale = dynamic_row_scales(x2d, FORMAT_OF[w_q.dtype]).reshape(-1, 1)
    gemm = _int8_gemm if w_q.dtype == torch.int8 else _fp8_gemm
    return gemm(x2d, w_q, w_scale.to(torch.float32), x_scale, bias, x.dtype).reshape(*x.shape[:-1], n)


def _scaled_gemm_cuda(x, w_q, w_scale, x_scale, bias) -> Tensor:
    check_args(x, w_q, w_scale, x_scale, bias)
    n, k = w_q.shape
    if w_q.stride(1) != 1:
        w_q = w_q.contiguous()
    if x_scale is None:
        return _weight_only(x, w_q, w_scale, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    x_scale = x_scale.to(torch.float32).reshape(())
    w_scale = w_scale.to(torch.float32)
    if w_q.dtype == torch.int8:
        y = _int8_gemm(x2d, w_q, w_scale, x_scale, bias, x.dtype)
    else:
        y = _fp8_gemm(x2d, w_q, w_scale, x_scale, bias, x.dtype)
    return y.reshape(*lead, n)


def _int8_gemm(x2d, w_q, w_scale, x_scale, bias, out_dtype) -> Tensor:
    n, k = w_q.shape
    if k % 8 or n % 8:
        raise ValueError(f"scaled_gemm int8 on CUDA needs K and N multiples of 8 (torch._int_mm), got K={k}, N={n}")
    m = x2d.shape[0]
    # zero rows quantize to 0; padding by max(17 - M, 0) (not to max(M, 17) rows) lets export prove acc[:M] in range
    pad = (0, 0, 0, torch.sym_max(INT_MM_MIN_ROWS - m, 0))
    padded = torch.nn.functional.pad(x2d, pad)
    pad_scale = torch.nn.functional.pad(x_scale, pad, value=1.0) if x_scale.dim() else x_scale  # per-row scales
    acc = torch._int_mm(quantize_activation(padded, pad_scale, torch.int8), w_q.t())  # [max(M,17), N] int32
    return _apply_scales(acc[:m], x_scale, w_scale, bias, out_dtype)


def _fp8_gemm(x2d, w_q, w_scale, x_scale, bias, out_dtype) -> Tensor:
    n, k = w_q.shape
    if torch.cuda.get_device_capability(x2d.device) < (8, 9):
        raise ValueError("scaled_gemm fp8 needs a GPU with compute capability >= 8.9 (torch._scaled_mm)")
    if k % 16 or n % 16:
        raise ValueError(f"scaled_gemm fp8 on CUDA needs K and N multiples of 16 (torch._scaled_mm), got K={k}, N={n}")
    xq = quantize_activation(x2d, x_scale, torch.float8_e4m3fn)
    wt = w_q.t()  # [K, N] column-major, as cuBLASLt wants
    if w_scale.numel() == 1 and x_scale.dim() == 0:  # tensorwise
        fuse_bias = bias is not None and out_dtype != torch.float32  # cuBLASLt: no bias with fp32 out
        y = torch._scaled_mm(
            xq, wt, scalar_buffer(x_scale), scalar_buffer(w_scale),
            bias=bias.to(out_dtype) if fuse_bias else None, out_dtype=out_dtype,
        )
        return y + bias.to(out_dtype) if bias is not None and not fuse_bias else y
    if out_dtype == torch.bfloat16:  # rowwise scaling; x_scale: a static scalar or per-row dynamic [M, 1]
        return rowwise_scaled_mm(xq, x_scale, w_q, w_scale, bias)
    one = torch.ones(1, dtype=torch.float32, device=x2d.device)
    acc = torch._scaled_mm(xq, wt, one, one, out_dtype=torch.float32)
    return _apply_scales(acc, x_scale, w_scale, bias, out_dtype)


def _apply_scales(acc, x_scale, w_scale, bias, out_dtype) -> Tensor:
    """`acc * (x_scale * w_scale) + bias` in float32, cast to `out_dtype` (pointwise: fuses with the consumer)."""
    return add_bias(acc.to(torch.float32) * (x_scale * w_scale), bias, out_dtype)


def _weight_only(x, w_q, w_scale, bias) -> Tensor:
    w = w_q.to(x.dtype) * w_scale.to(x.dtype).reshape(-1, 1)
    y = x @ w.t()
    return y + bias.to(x.dtype) if bias is not None else y
