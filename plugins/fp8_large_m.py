"""The FP8 path of the 4-bit weight GEMMs above 128 rows (opt-in: the ops' `fp8_large_m`, `qcompile build
--fp8-large-m`): the weight dequantized to FP8 E4M3 [N, K] with one float32 scale per output column, x quantized
to FP8 per row (or already FP8: W4A8), then cuBLASLt's rowwise-scaled FP8 GEMM (`torch._scaled_mm`) with the
bias in its epilogue.

Why: the exact path above 128 rows dequantizes W to 16 bits and runs cuBLAS bf16. That costs a bf16 GEMM plus a
pass writing 16-bit weights, about 0.8x of cuBLAS bf16 at M = 1024 on the H200 (BENCHMARKS.md). FP8 tensor cores run
the GEMM about 1.8x faster than bf16 (reference/kernel-targets.md), and the FP8 weight is half the bytes to write.
The price is FP8 numerics at those row counts: each weight rounded once to E4M3 (3 mantissa bits) after its
group / block scale, and x rounded per row to E4M3 as the fp8_rowwise recipe does. Up to 128 rows (decode) the
ops stay exact.

    S[n]     = max(bound[n] / 448, float32 tiny)     bound: the largest |W[:, n]| the format's scales allow
    W8[n, k] = e4m3(W[k, n] * (1 / S[n]))             (in fp32, then round to nearest even; INT4 folds 1 / S[n]
                                                        into each group scale: (q - zp) * (scale * (1 / S[n])),
                                                        and keeps K in its words' order, x's columns gathered
                                                        to match: `int4_gemm.format.columns_in_words_order`)
    y        = (xq * x_row_scale) @ (W8 * S).T + bias  (cuBLASLt: fp32 accumulate, bf16 out, cast to x's dtype)

Off CUDA (CPU engines built with the flag, for a preview of its accuracy) the same numerics are emulated: the
weight's FP8 values come from the plugins' plain-torch references (`int4_gemm.reference`, `fp4_gemm.reference`) and
the GEMM is a float32 matmul of the FP8 values times their scales (`emulated_scaled_mm`). Plain torch, no Triton.
"""
from __future__ import annotations

import torch

from qcompile.plugins.formats import MIN_SCALE, dynamic_row_scales, qmax, quantize_activation

FP8 = torch.float8_e4m3fn
MIN_ROWS = 129  # the ops take this path from here (below, the exact small-M kernels run)


def usable(device: torch.device, k: int, n: int) -> bool:
    """Whether the FP8 GEMM can run: a CUDA GPU of compute capability >= 8.9 and K, N multiples of 16 (cuBLASLt)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
            and k % 16 == 0 and n % 16 == 0)


def column_scales(bound: torch.Tensor) -> torch.Tensor:
    """float32 [N] S = bound / 448, floored at float32 tiny (an all-zero column stays finite). Computed as bound times
    float32(1 / 448): CUDA divides a tensor by a scalar that way, CPUs divide, and the two differ in the last bit
    of some scales (seen on an H100: the CPU path's FP8 weights then were not the GPU's bit for bit)."""
    return torch.clamp(bound.to(torch.float32) * (1.0 / qmax("fp8")), min=MIN_SCALE)


def quantize_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (xq float8_e4m3fn [M, K], float32 [M] per-row scales), as the fp8_rowwise recipe."""
    row_scale = dynamic_row_scales(x2d)
    return quantize_activation(x2d, row_scale[:, None], FP8), row_scale


def rowwise_scaled_mm(xq, x_row_scale, w_nk, w_col_scale, bias) -> torch.Tensor:
    """bf16 [M, N] `(xq * x_row_scale[:, None]) @ (w_nk * w_col_scale[:, None]).T + bias` on cuBLASLt's FP8 GEMM
    (rowwise scales; bf16 output, the form every torch version takes). x_row_scale: [M] or [M, 1]; w_nk: FP8
    [N, K], K contiguous (the GEMM reads it transposed, column-major, as cuBLASLt wants)."""
    m, n = xq.shape[0], w_nk.shape[0]
    return torch._scaled_mm(
        xq, w_nk.t(), x_row_scale.to(torch.float32).reshape(-1, 1).expand(m, 1).contiguous(),
        w_col_scale.to(torch.float32).reshape(1, -1).expand(1, n).contiguous(),
        bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)


def emulated_scaled_mm(xq, x_row_scale, w_nk, w_col_scale, bias) -> torch.Tensor:
    """`rowwise_scaled_mm`'s result off CUDA: float32 `(xq * x_row_scale) @ (w_nk * w_col_scale).T + bias`, rounded
    to bf16 as cuBLASLt's output is (its sums in another order: float32 rounding apart)."""
    a = xq.to(torch.float32) * x_row_scale.to(torch.float32).reshape(-1, 1)
    y = a @ (w_nk.to(torch.float32) * w_col_scale.to(torch.float32).reshape(-1, 1)).t()
    if bias is not None:
        y = y + bias.to(torch.bfloat16).to(torch.float32)
    return y.to(torch.bfloat16)


def linear(x2d, w8_nk, w_col_scale, bias, out_dtype, x_row_scale=None) -> torch.Tensor:
    """`x2d @ W.T + bias` [M, N] in out_dtype with W = w8_nk * w_col_scale[:, None]: x2d FP8 with its
    `x_row_scale` (W4A8), or a float x quantized here per row. cuBLASLt on CUDA, emulated elsewhere."""
    if x_row_scale is None:
        x2d, x_row_scale = quantize_rows(x2d)
    gemm = rowwise_scaled_mm if x2d.device.type == "cuda" else emulated_scaled_mm
    return gemm(x2d, x_row_scale, w8_nk, w_col_scale, bias).to(out_dtype)
