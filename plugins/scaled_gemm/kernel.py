"""Triton kernels of `qcompile::scaled_gemm` (CUDA only; import lazily: CPU machines have no triton).

Two small memory-bound kernels around cuBLAS(Lt)'s low-precision GEMMs:

- `quantize_kernel`: x (fp32/fp16/bf16) -> int8 (round half even, saturate) or fp8 e4m3fn (saturate ±448),
  dividing by the static per-tensor scale exactly as ONNX QuantizeLinear does; rows past M
  (padding for `torch._int_mm`, which needs M > 16) are written as zeros.
- `epilogue_kernel`: acc (int32 or fp32) [Mp, N] -> y[M, N] = acc * (x_scale * w_scale[n]) + bias[n],
  cast to the output dtype, in one pass.

Launch them through `launch_quantize` / `launch_epilogue`, which go through `torch.library.wrap_triton`
so that torch.export / AOTInductor see the kernels and compile them into the package.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

QUANT_BLOCK = 1024
EPI_BLOCK_M = 32
EPI_BLOCK_N = 128


@triton.jit
def quantize_kernel(x_ptr, scale_ptr, out_ptr, n_valid, n_total, IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n_valid, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr).to(tl.float32)
    y = tl.math.div_rn(x, s)  # IEEE division, as QuantizeLinear (x / scale)
    if IS_INT8:
        y = libdevice.rint(tl.minimum(tl.maximum(y, -128.0), 127.0))  # round half to even
    else:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=offs < n_total)


@triton.jit
def epilogue_kernel(
    acc_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, stride_am, stride_om,
    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    mask = (rm[:, None] < M) & mask_n[None, :]
    acc = tl.load(acc_ptr + rm[:, None] * stride_am + rn[None, :], mask=mask, other=0).to(tl.float32)
    xs = tl.load(x_scale_ptr).to(tl.float32)
    if PER_CHANNEL:
        ws = tl.load(w_scale_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        y = acc * (xs * ws)[None, :]
    else:
        y = acc * (xs * tl.load(w_scale_ptr).to(tl.float32))
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_quantize(x2d: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """Quantize contiguous `x2d` [M, K] into a new [rows, K] tensor (rows >= M; extra rows are zero)."""
    k = x2d.shape[1]
    out = torch.empty((rows, k), dtype=dtype, device=x2d.device)
    n_valid = x2d.shape[0] * k
    n_total = rows * k
    grid = (triton.cdiv(n_total, QUANT_BLOCK),)
    torch.library.wrap_triton(quantize_kernel)[grid](
        x2d, x_scale, out, n_valid, n_total, IS_INT8=dtype == torch.int8, BLOCK=QUANT_BLOCK
    )
    return out


def launch_epilogue(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    m: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`acc[:m] * (x_scale * w_scale) + bias` -> a new [m, N] tensor of `out_dtype` (one kernel)."""
    n = acc.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    grid = (triton.cdiv(m, EPI_BLOCK_M), triton.cdiv(n, EPI_BLOCK_N))
    torch.library.wrap_triton(epilogue_kernel)[grid](
        acc, x_scale, w_scale, bias if bias is not None else w_scale, out,
        m, n, acc.stride(0), out.stride(0),
        PER_CHANNEL=w_scale.numel() != 1,
        HAS_BIAS=bias is not None,
        BLOCK_M=EPI_BLOCK_M, BLOCK_N=EPI_BLOCK_N,
    )
    return out
