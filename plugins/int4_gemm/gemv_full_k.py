"""The full-K INT4 GEMV (M = 1, fp16/bf16 x) of `qcompile::int4_groupwise_gemm`, on packed fp16x2 (CUDA only).

Two launches per call, as the FP4 GEMV (`fp4_gemm/gemv.py`):

1. `_x_pairs_kernel` prepares x once: per word row of the engine layout (sequential or planar K order), the
   four fp16 pairs `half2.dot8` multiplies, (x_0, x_4), (x_1, x_5) / 16, (x_2, x_6), (x_3, x_7) / 16, times a
   power of two `up` that puts the word row's largest |x| in [256, 512) (`half2.pow2_range`); `down = 1 / up`;
   and, for zero points, the plain sum of the 8 x.
2. `_int4_gemv_full_k_kernel`: each program owns BLOCK_N weight columns over all of K and finishes them (zero
   points, group scales, bias and the cast in the kernel): no split K, so no zero fill, no fp32 atomics and no
   separate epilogue launch. The engine layout is [K/8, N] with N contiguous, so a program reads
   [BLOCK_KW word rows, BLOCK_N] tiles (64 bytes of each word row at BLOCK_N = 16) down the whole of K; the
   group scale of each word row is loaded per (word row, column) (duplicate addresses within a group, served
   by L1).

Why (benchmarks/int4_gemv_full_k_probe_s20.json, BENCHMARKS.md twentieth session): the split GEMV of
`kernel.py` pays three launches per call. With x's pairs ready-made, one program per 16 columns was 1.1-1.5x faster
than the op on the Llama-3-8B decode layers (4096 x 4096: 14.3 -> 9.2 µs), but 4% slower on 8192 x 28672,
whose 235 M weights the split GEMV streams better. So it runs for layers of up to `max_weights` weights
(`kernel.CONFIGS`); larger layers, fp32 x and groups that are not whole word rows keep the split GEMV.

Products round to fp16 exactly as in the split GEMV (`half2.py`), with the power of two chosen per word row
instead of per step, so the 16-bit x path is at least as accurate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import cdiv, identity, optional_arg
from qcompile.plugins.int4_gemm.format import is_planar
from qcompile.plugins.int4_gemm.half2 import dot8, dot8_emulated, pow2_range, ptx_available, x_of_words, x_pair

X_PAIRS_BLOCK = 128  # word rows per program of `_x_pairs_kernel`


def supports(x_dtype: torch.dtype, k: int, n: int, group_size: int, cfg: dict) -> bool:
    """Whether the full-K GEMV serves this call: 16-bit x (products round to fp16), groups of whole word rows,
    and at most cfg["max_weights"] weights (cfg None: the bucket has no full-K GEMV)."""
    return cfg is not None and x_dtype in (torch.float16, torch.bfloat16) and group_size % 8 == 0 and k * n <= cfg["max_weights"]


@triton.jit
def _x_pairs_kernel(x_ptr, pairs_ptr, down_ptr, xsum_ptr, KW, stride_xm, HAS_ZERO: tl.constexpr,
                    PLANAR: tl.constexpr, BLOCK: tl.constexpr):
    """Per word row kw of row m of x (grid axis 1): pairs[m, kw, 0..3] the fp16 pairs of `dot8` times `up`,
    down[m, kw] = 1 / up, and (HAS_ZERO) xsum[m, kw] the sum of the word row's 8 x."""
    m = tl.program_id(1)
    kw = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = kw < KW
    x0, x1, x2, x3, x4, x5, x6, x7, big = x_of_words(x_ptr + m * stride_xm, kw, ok, PLANAR)
    up, down = pow2_range(big)
    out = pairs_ptr + (m * KW + kw) * 4
    tl.store(out, x_pair(x0, x4, up), mask=ok)
    tl.store(out + 1, x_pair(x1, x5, up * 0.0625), mask=ok)
    tl.store(out + 2, x_pair(x2, x6, up), mask=ok)
    tl.store(out + 3, x_pair(x3, x7, up * 0.0625), mask=ok)
    tl.store(down_ptr + m * KW + kw, down, mask=ok)
    if HAS_ZERO:
        tl.store(xsum_ptr + m * KW + kw, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), mask=ok)


@triton.jit
def _int4_gemv_full_k_kernel(p_ptr, d_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, KW, group_size,
                             K_STEPS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                             ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """y[m, n] = sum_k x[m, k] (q[k, n] - zp) s (+ bias[n]) in y's dtype, for BLOCK_N columns n over all KW word
    rows, row m of x (grid axis 1), from x's pairs (`_x_pairs_kernel`)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pairs = p_ptr + m * KW * 4
    offs_w = tl.arange(0, BLOCK_KW)
    shape: tl.constexpr = (BLOCK_KW, BLOCK_N)
    acc = tl.zeros(shape, dtype=tl.float32)
    for step in range(0, K_STEPS):
        kw = step * BLOCK_KW + offs_w
        ok = kw < KW
        m2 = ok[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + kw.to(tl.int64)[:, None] * N + offs_n[None, :], mask=m2, other=0,
                        eviction_policy="evict_first")
        g = (kw * 8 // group_size)[:, None] * N + offs_n[None, :]  # the word row's group (planar: within 64 K)
        s = tl.load(s_ptr + g, mask=m2, other=0.0).to(tl.float32)
        p04 = tl.broadcast_to(tl.load(pairs + kw * 4, mask=ok, other=0)[:, None], shape)
        p15 = tl.broadcast_to(tl.load(pairs + kw * 4 + 1, mask=ok, other=0)[:, None], shape)
        p26 = tl.broadcast_to(tl.load(pairs + kw * 4 + 2, mask=ok, other=0)[:, None], shape)
        p37 = tl.broadcast_to(tl.load(pairs + kw * 4 + 3, mask=ok, other=0)[:, None], shape)
        down = tl.load(d_ptr + m * KW + kw, mask=ok, other=0.0)[:, None]
        if ASM:
            part = dot8(words, p04, p15, p26, p37) * down
        else:
            part = dot8_emulated(words, p04, p15, p26, p37) * down
        if HAS_ZERO:
            xsum = tl.load(xs_ptr + m * KW + kw, mask=ok, other=0.0)[:, None]
            part -= xsum * tl.load(z_ptr + g, mask=m2, other=0).to(tl.float32)
        acc += part * s
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def launch(x2d, w_packed, w_scale, w_zero, bias, group_size: int, cfg: dict, out_dtype, *,
           wrap=identity) -> torch.Tensor:
    """`x2d @ dequant(W) + bias` [M, N] in out_dtype (x2d fp16/bf16 [M, K]; meant for M = 1: each row of x
    re-reads the weight): x's pairs, then the GEMV."""
    m, k = x2d.shape
    kw, n = w_packed.shape
    has_zero = w_zero is not None
    pairs = torch.empty((m, kw, 4), dtype=torch.int32, device=x2d.device)
    down = torch.empty((m, kw), dtype=torch.float32, device=x2d.device)
    xsum = torch.empty((m, kw), dtype=torch.float32, device=x2d.device) if has_zero else down
    wrap(_x_pairs_kernel)[(cdiv(kw, X_PAIRS_BLOCK), m)](
        x2d, pairs, down, xsum, kw, x2d.stride(0), HAS_ZERO=has_zero, PLANAR=is_planar(k, group_size),
        BLOCK=X_PAIRS_BLOCK)
    y = torch.empty((m, n), dtype=out_dtype, device=x2d.device)
    wrap(_int4_gemv_full_k_kernel)[(cdiv(n, cfg["BLOCK_N"]), m)](
        pairs, down, xsum, w_packed, w_scale, optional_arg(w_zero, w_scale), optional_arg(bias, w_scale), y, n,
        kw, group_size, K_STEPS=cdiv(kw, cfg["BLOCK_KW"]), HAS_ZERO=has_zero, HAS_BIAS=bias is not None,
        ASM=ptx_available(), BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=cfg["BLOCK_KW"], num_warps=cfg["num_warps"],
        num_stages=1)
    return y
