"""NVFP4 activation fake-quantization of W4A4 (`nvfp4`) engines on the GPU, as one Triton pass over x.

`x_hat = format.nvfp4_fake_quantize(x, x_global)` rounded to x's dtype, bit for bit: per 16 elements along K,
`s = fp32(e4m3(amax / 6 / g)) * g` and `x_hat = e2m1_round(x / s) * s` (0 where s is 0), with IEEE divisions.

Why a kernel: the op wrote this math in aten ops for Inductor to fuse into x's producer. Inductor splits it at the
block reduction and keeps four float32 copies of x in memory between its kernels (`tools/diag/engine_kernels.py
mlp-large --recipes nvfp4 --rows 4096 --code DIR`), and each layer of a sibling group quantizes the same x again:
on an H100 the nvfp4 engine of mlp-large ran at 0.53x the fp16 engine at 4096 rows where the weight-only
w4a16_nvfp4 one runs about even (benchmarks/engines-recipes-mlp-large-h100_s32.log). Here x is read once and
x_hat written once, in x's dtype.

The roundings are arithmetic so that the CPU interpreter (tests) runs what the GPU runs: E4M3 (3 mantissa bits,
normals from 2**-6, subnormal step 2**-9, at most 448) and E2M1 (steps 0.5 / 1 / 2 below 2 / 4 / 6) both scale the
value by a power of two to an integer grid, round half to even by adding and subtracting 2**23, and scale back:
each step is exact in float32. (The interpreter's float -> fp8 cast is not the GPU's.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.fp4_gemm.format import NVFP4_BLOCK
from qcompile.plugins.gemm_dispatch import cdiv, identity
from qcompile.plugins.triton_tiles import jit_any_m

TILE = dict(BLOCK_M=8, BLOCK_K=256, num_warps=4)  # rows x columns per program (not tuned)


@triton.jit
def _round_half_even(t):
    """t (float32, 0 <= t < 2**22) rounded to the nearest integer, ties to even."""
    return (t + 8388608.0) - 8388608.0


@triton.jit
def _e4m3_round(v):
    """v (float32, >= 0) rounded to E4M3FN: saturated at 448, nearest, ties to even."""
    v = tl.where(v > 448.0, 448.0, v)
    exponent = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals share 2**-6's step
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(v * inverse) * step


@triton.jit
def _e2m1_round(y):
    """y (float32) rounded to E2M1 (format.e2m1_round): NaN as 6, saturated at ±6, nearest, ties to even, y's sign
    kept (-0.0 for negatives that round to 0)."""
    magnitude = tl.minimum(tl.where(y != y, 6.0, tl.abs(y)), 6.0)
    small, mid = magnitude < 2.0, magnitude < 4.0
    step = tl.where(small, 0.5, tl.where(mid, 1.0, 2.0))
    r = _round_half_even(magnitude * tl.where(small, 2.0, tl.where(mid, 1.0, 0.5))) * step
    negative = (y < 0.0) | ((y == 0.0) & (y.to(tl.int32, bitcast=True) < 0))
    # the sign bit set by hand: Triton negates as 0 - r, which is +0.0 for r = 0
    return (r.to(tl.int32, bitcast=True) | tl.where(negative, -2147483648, 0)).to(tl.float32, bitcast=True)


@jit_any_m
def _nvfp4_fake_quantize_kernel(x_ptr, g_ptr, y_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr,
                                BLOCK_K: tl.constexpr, B: tl.constexpr):
    """x_hat [M, K] in y's dtype for a [BLOCK_M, BLOCK_K] tile of x (K a multiple of B, BLOCK_K of B)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    x = tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_K // B, B))
    amax = tl.max(tl.abs(x), axis=2)
    g = tl.zeros(amax.shape, tl.float32) + tl.load(g_ptr).to(tl.float32)
    s = (_e4m3_round(tl.math.div_rn(tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)), g)) * g)[:, :, None]
    y = tl.where(s > 0.0, tl.math.div_rn(x, tl.where(s > 0.0, s, 1.0) + tl.zeros(x.shape, tl.float32)), 0.0)
    x_hat = tl.reshape(_e2m1_round(y) * s, (BLOCK_M, BLOCK_K))
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], x_hat.to(y_ptr.dtype.element_ty), mask=mask)


def nvfp4_fake_quantize_rows(x2d: torch.Tensor, x_global: torch.Tensor, cfg: dict | None = None, *,
                             wrap=identity) -> torch.Tensor:
    """x_hat [M, K] (contiguous) in x2d's dtype for rows x2d [M, K] (last dim contiguous, K a multiple of 16) and
    the float32 scalar `x_global` (decode form)."""
    cfg = cfg or TILE
    m, k = x2d.shape
    out = torch.empty((m, k), dtype=x2d.dtype, device=x2d.device)
    wrap(_nvfp4_fake_quantize_kernel)[(cdiv(m, cfg["BLOCK_M"]), cdiv(k, cfg["BLOCK_K"]))](
        x2d, x_global, out, m, k, x2d.stride(0), BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], B=NVFP4_BLOCK,
        num_warps=cfg["num_warps"])
    return out
