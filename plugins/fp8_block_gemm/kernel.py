"""Triton kernel of `qcompile::fp8_block_gemm` for CUDA GPUs other than sm90 (imported lazily: CPU machines
have no Triton). On sm90 the op uses `torch.nn.functional.scaled_mm`'s block-wise scaling instead (`op.py`).

`_fp8_block_kernel`: one program per [BLOCK_M, 128] output tile (one weight-scale row block); for each
128-wide K block it computes the FP8 x FP8 dot into a fresh float32 partial sum and adds it to the float32
accumulator scaled by `x_scale[m, kb] * w_scale[n // 128, kb]` (DeepSeek's per-block promotion: the tensor
core's reduced-precision FP8 accumulation never spans more than 128 products). The result is float32 [M, N],
unbiased; the op casts and adds the bias. `FP32_DOT` upcasts the operands and uses an IEEE float32 dot
(the Triton CPU interpreter, which has no FP8 dot). The K-block count is a compile-time constant (K is a
weight dimension, static per layer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.fp8_block_gemm.format import BLOCK
from qcompile.plugins.gemm_dispatch import identity

BLOCK_M = 64


@triton.jit
def _fp8_block_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
    KB: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * K
    b_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BLOCK_K + offs_k
        a = tl.load(a_rows + k[None, :], mask=mask_m[:, None])
        b = tl.load(b_cols + k[:, None], mask=mask_n[None, :])
        if FP32_DOT:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, b)
        sa = tl.load(xs_ptr + offs_m.to(tl.int64) * KB + kb, mask=mask_m, other=0.0)
        sb = tl.load(ws_ptr + pid_n * KB + kb)
        acc += part * (sa[:, None] * sb)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def fp8_block_gemm_triton(xq, x_scale, w_q, w_scale, *, wrap=identity, fp32_dot: bool = False) -> torch.Tensor:
    """float32 [M, N] `sum_kb x_scale * w_scale * (xq . w_q)` of the contract (no bias), from quantized x."""
    m, k = xq.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=xq.device)
    grid = ((m + BLOCK_M - 1) // BLOCK_M, n // BLOCK, 1)
    wrap(_fp8_block_kernel)[grid](
        xq, x_scale, w_q, w_scale, y, m, n, k,
        KB=k // BLOCK, FP32_DOT=fp32_dot, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK, BLOCK_K=BLOCK, num_warps=4, num_stages=3,
    )
    return y
