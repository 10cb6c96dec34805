"""The INT4 weight in FP8 for `plugins/fp8_large_m.py` (CUDA only; imported lazily: CPU machines have no Triton).

cuBLASLt's FP8 GEMM reads both operands K-major, while the engine words are [K/8, N], N contiguous. So
`_int4_dequant_t_kernel` writes the transposed dequantized weight, [N, K] with K contiguous, its column's `mul`
(1 / S[n]) folded into the group scale (one multiplier per column and group), rounded to the output dtype (FP8;
float32 in the interpreter tests, whose FP8 conversion does not round to nearest even). A program loads
[BLOCK_N, 8] words per 64 K (coalesced along N), unpacks their nibbles in registers (`_nibbles`) and stores
[BLOCK_N, 64] values, K contiguous.

K comes out in the words' own order: for planar words (`format.planar_order`) the caller gathers x's columns into
that order (`format.columns_in_words_order`, fused by Inductor into the kernel that quantizes x) instead of the kernel
permuting every weight. A sum over K does not care, a 64-K block stays in its group, and the kernel costs 8.5 sm_90
instructions per weight instead of 11.1 with the permutation (`tools/diag/sass_count.py int4_dequant_t_fp8`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins import fp8_large_m
from qcompile.plugins.gemm_dispatch import cdiv, identity, optional_arg
from qcompile.plugins.int4_gemm.format import PACK
from qcompile.plugins.int4_gemm.reference import fp8_column_bound

FP32_MAGIC_BITS = tl.constexpr(0x4B000008)  # nibble XOR this: the fp32 2^23 + q + 8 (q the signed nibble)
FP32_MAGIC = tl.constexpr(8388616.0)  # 2^23 + 8
DEQUANT_T = dict(BLOCK_N=64, BLOCKS=2, num_warps=4)  # 64-K blocks per program; not tuned on the GPU yet


@triton.jit
def _nibbles(words, BLOCK_N: tl.constexpr):
    """Words [BLOCK_N, 8] (8 word rows = 64 K) -> their nibbles [BLOCK_N, 64], nibble j of word row r in column
    8 r + j (the words' K order)."""
    n0, n1, n2, n3 = words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF
    n4, n5, n6, n7 = (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF
    # [BLOCK_N, r, c, b, a] holds nibble j = 4 c + 2 b + a of word row r
    t = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(t, (BLOCK_N, 64))


@triton.jit
def _int4_dequant_t_kernel(
    w_ptr, s_ptr, z_ptr, mul_ptr, out_ptr, N, K, group_size,
    HAS_ZERO: tl.constexpr, GROUP_ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
):
    """out [N, K] = ((q - zp) * (scale * mul[n])) in out's dtype, K in the words' order, q - zp exact through the
    fp32 magic number (one FADD and one FMUL per weight). GROUP_ALIGNED: each 64 K lie in one group (one scale row
    per block)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mul = tl.load(mul_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    for b in tl.static_range(BLOCKS):
        k0 = (tl.program_id(1) * BLOCKS + b) * 64
        kw = k0 // 8 + tl.arange(0, 8)
        words = tl.load(w_ptr + kw.to(tl.int64)[None, :] * N + offs_n[:, None],
                        mask=mask_n[:, None] & (kw < K // 8)[None, :], other=0, eviction_policy="evict_first")
        offs_k = k0 + tl.arange(0, 64)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        if GROUP_ALIGNED:
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n & (k0 < K), other=0.0).to(tl.float32)[:, None] * mul
            c = tl.full((BLOCK_N, 1), FP32_MAGIC, tl.float32)
            if HAS_ZERO:
                c += tl.load(z_ptr + g * N + offs_n, mask=mask_n & (k0 < K), other=0).to(tl.float32)[:, None]
        else:
            gp = (offs_k // group_size).to(tl.int64)[None, :] * N + offs_n[:, None]
            s = tl.load(s_ptr + gp, mask=mask, other=0.0).to(tl.float32) * mul
            c = tl.full((BLOCK_N, 64), FP32_MAGIC, tl.float32)
            if HAS_ZERO:
                c += tl.load(z_ptr + gp, mask=mask, other=0).to(tl.float32)
        q = (_nibbles(words, BLOCK_N) ^ FP32_MAGIC_BITS).to(tl.float32, bitcast=True) - c
        w = q * s
        tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mask)


def launch_dequant_t(w_packed, w_scale, w_zero, group_size: int, mul: torch.Tensor, dtype, *, wrap=identity,
                     cfg: dict | None = None) -> torch.Tensor:
    """[N, K] `(q - zp).T * (scale * mul[:, None]).T` as `dtype`, K in the words' order (see the module docstring);
    `cfg` default `DEQUANT_T`."""
    cfg = cfg or DEQUANT_T
    kw, n = w_packed.shape
    k = kw * PACK
    out = torch.empty((n, k), dtype=dtype, device=w_packed.device)
    span = 64 * cfg["BLOCKS"]
    wrap(_int4_dequant_t_kernel)[(cdiv(n, cfg["BLOCK_N"]), cdiv(k, span), 1)](
        w_packed, w_scale, optional_arg(w_zero, w_scale), mul.to(torch.float32).contiguous(), out, n, k, group_size,
        HAS_ZERO=w_zero is not None, GROUP_ALIGNED=group_size % 64 == 0, BLOCK_N=cfg["BLOCK_N"],
        BLOCKS=cfg["BLOCKS"], num_warps=cfg["num_warps"],
    )
    return out


def fp8_weight(w_packed, w_scale, w_zero, group_size: int, *, wrap=identity,
               dtype=fp8_large_m.FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [N, K] in `dtype` (FP8; float32 to test the values before rounding), K in the words' order, S float32
    [N]); the CPU path's counterpart is `reference.fp8_weight_reference`."""
    s = fp8_large_m.column_scales(fp8_column_bound(w_scale, w_zero))
    return launch_dequant_t(w_packed, w_scale, w_zero, group_size, 1.0 / s, dtype, wrap=wrap), s
