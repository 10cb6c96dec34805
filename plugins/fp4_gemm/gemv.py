"""The FP4 GEMV (M = 1, fp16/bf16 x) of `qcompile::fp4_gemm`, on packed fp16x2 (CUDA only).

Two launches per call:

1. `_x_pairs_kernel` prepares x once: per unit of 16 values, a power of two `up` that puts their largest |x| in
   [2**13, 2**14) (products then stay below 6 and fp16 sums of 8 below 48), and the eight fp16 pairs the
   decoded weights multiply, stored planar (`pairs[m, j, u]`), with `down[m, u] = 2**14 / up` (the decode's
   2**-14 included; divided by 2**16, the block-scale shift below).
2. `_fp4_gemv_kernel`: each program owns BLOCK_N weight rows over all of K and finishes them (global scale, bias
   and cast in the kernel: no split-K, no zero fill). It reads the engine layout `[N, K/2]` bytes as uint64
   units of 16 codes (K / 16 per row) and one block scale per unit (NVFP4: the unit is its block; MXFP4: two units
   share one).

- Decoding (`e2m1_dot16`): each uint32 half of a unit becomes four fp16 pairs (codes j, j + 4): the sign to bit
  15 and `e1 e0 m` to bits 9..11, which is the fp16 `e2m1 * 2**-14` exactly (code 1, 0.5, as a subnormal):
  two shifts, an AND and a LOP3 per pair. Eight HFMA2 against x's pairs, summed in fp16, then one conversion to
  fp32 per unit.
- Products and the sums of a unit round to fp16, so the GEMV serves 16-bit x only (fp32 x takes the tile kernel).
  With bf16 x and output the op is within 0.17% relative L2 of float64 on the H200 shapes, mostly the output's
  own rounding (benchmarks/fp4_gemv_units_probe.json).
- E8M0 scales are decoded times 2**16 (SCALE_SHIFT) so code 0 (2**-127) stays a normal fp32; `down` undoes it.

Why units and a separate x kernel (benchmarks/fp4_gemv_units_probe.json, BENCHMARKS.md fourteenth session): the
previous GEMV (commit 2f737b2) read uint32 words and built x's pairs and power of two per word column inside the
weight loop, shared by only the few weight rows each thread holds, and loaded and decoded a scale byte per word:
about 7 SASS instructions per weight. With the pairs read ready-made and one scale per 16 codes, 8192 x 28672 went
from 85.3 to 52.9 µs (NVFP4; the INT4 op: 49.3) and 4096 x 28672 from 39.0 to 28.4.

`e2m1_dot16_emulated` is the same arithmetic in plain Triton for the CPU interpreter, which cannot run PTX.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.fp4_gemm.kernel import _e2m1_bits32, _scale_multiplier
from qcompile.plugins.gemm_dispatch import cdiv, identity, optional_arg
from qcompile.plugins.int4_gemm.half2 import half_of, ptx_available, x_of_words, x_pair

# 4 rows x 256 units (1 KiB of each row per step) on 4 warps: the best of eight tiles or within 7% of it on the six
# decode shapes, both formats (benchmarks/fp4_gemv_units_probe.json)
GEMV = dict(BLOCK_N=4, BLOCK_U=256, num_warps=4)
X_PAIRS_BLOCK = 128  # units per program of `_x_pairs_kernel`
# SCALE_SHIFT = 16 (a literal in the kernels): block scales are decoded as scale * 2**16, so E8M0 code 0
# (2**-127) stays a normal fp32; `down` undoes it


@triton.jit
def _e2m1(words, j: tl.constexpr):
    """fp32 `e2m1 * 2**-14` of code j of each word: the tile kernels' decoding (`e2m1 * 2**-126`) times 2**112."""
    return _e2m1_bits32(words, j) * 5.192296858534828e33  # 2**112


@triton.jit
def _e2m1_dot8_emulated(words, p04, p15, p26, p37):
    """fp32 `sum_j e2m1_j * 2**-14 * x_j` over the 8 codes of uint32 words (fp32 products of the fp16 pairs)."""
    out = _e2m1(words, 0) * half_of(p04, False) + _e2m1(words, 4) * half_of(p04, True)
    out += _e2m1(words, 1) * half_of(p15, False) + _e2m1(words, 5) * half_of(p15, True)
    out += _e2m1(words, 2) * half_of(p26, False) + _e2m1(words, 6) * half_of(p26, True)
    out += _e2m1(words, 3) * half_of(p37, False) + _e2m1(words, 7) * half_of(p37, True)
    return out


@triton.jit
def e2m1_dot16(units, p0, p1, p2, p3, p4, p5, p6, p7):
    """fp32 `sum_j e2m1_j * 2**-14 * x_j` over the 16 codes of each uint64 unit (two words: low = codes 0-7, high
    = codes 8-15), inline PTX on fp16x2: the 8 products of a pair position summed in fp16 (at most 48 with x
    scaled into [2**13, 2**14)), one conversion to fp32 per unit. p0..p3: the low word's pairs (x_j, x_j+4),
    p4..p7 the high word's."""
    # a literal, not a global: AOTInductor copies the kernel's source into its generated code
    out = tl.inline_asm_elementwise(
        "{ .reg .b32 w0, w1, a, t, u, c0, m, acc; .reg .b16 lo, hi; .reg .f32 flo, fhi, s; "
        "mov.b64 {w0, w1}, $1; mov.b32 c0, 0x80008000; mov.b32 m, 0x0E000E00; "
        "shr.b32 t, w0, 3; and.b32 t, t, m; lop3.b32 a, w0, c0, t, 0xEA; mul.rn.f16x2 acc, a, $5; "
        "shl.b32 u, w0, 4; shl.b32 t, w0, 1; and.b32 t, t, m; lop3.b32 a, u, c0, t, 0xEA; fma.rn.f16x2 acc, a, $4, acc; "
        "shl.b32 u, w0, 8; shl.b32 t, w0, 5; and.b32 t, t, m; lop3.b32 a, u, c0, t, 0xEA; fma.rn.f16x2 acc, a, $3, acc; "
        "shl.b32 u, w0, 12; shl.b32 t, w0, 9; and.b32 t, t, m; lop3.b32 a, u, c0, t, 0xEA; fma.rn.f16x2 acc, a, $2, acc; "
        "shr.b32 t, w1, 3; and.b32 t, t, m; lop3.b32 a, w1, c0, t, 0xEA; fma.rn.f16x2 acc, a, $9, acc; "
        "shl.b32 u, w1, 4; shl.b32 t, w1, 1; and.b32 t, t, m; lop3.b32 a, u, c0, t, 0xEA; fma.rn.f16x2 acc, a, $8, acc; "
        "shl.b32 u, w1, 8; shl.b32 t, w1, 5; and.b32 t, t, m; lop3.b32 a, u, c0, t, 0xEA; fma.rn.f16x2 acc, a, $7, acc; "
        "shl.b32 u, w1, 12; shl.b32 t, w1, 9; and.b32 t, t, m; lop3.b32 a, u, c0, t, 0xEA; fma.rn.f16x2 acc, a, $6, acc; "
        "mov.b32 {lo, hi}, acc; cvt.f32.f16 flo, lo; cvt.f32.f16 fhi, hi; add.f32 s, flo, fhi; mov.b32 $0, s; }",
        "=r,l,r,r,r,r,r,r,r,r", [units, p0, p1, p2, p3, p4, p5, p6, p7], dtype=tl.int32, is_pure=True, pack=1)
    return out.to(tl.float32, bitcast=True)


@triton.jit
def e2m1_dot16_emulated(units, p0, p1, p2, p3, p4, p5, p6, p7):
    """`e2m1_dot16` in plain Triton (fp32 products), for the CPU interpreter."""
    low = (units & 0xFFFFFFFF).to(tl.uint32)
    high = (units >> 32).to(tl.uint32)
    return _e2m1_dot8_emulated(low, p0, p1, p2, p3) + _e2m1_dot8_emulated(high, p4, p5, p6, p7)


@triton.jit
def _x_pairs_kernel(x_ptr, pairs_ptr, down_ptr, KU, stride_xm, BLOCK: tl.constexpr):
    """Per unit u of 16 x values of row m (grid axis 1): pairs[m, j, u] (j = 0..7, planar) the fp16 pairs
    (x_16u+j, x_16u+j+4) (j < 4) and (x_16u+4+j, x_16u+8+j) (j >= 4), scaled by a power of two `up` that puts the
    unit's largest |x| in [2**13, 2**14); down[m, u] = 2**14 / up / 2**16 (SCALE_SHIFT)."""
    m = tl.program_id(1)
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = u < KU
    x_row = x_ptr + m * stride_xm
    a0, a1, a2, a3, a4, a5, a6, a7, big_a = x_of_words(x_row, 2 * u, ok)
    b0, b1, b2, b3, b4, b5, b6, b7, big_b = x_of_words(x_row, 2 * u + 1, ok)
    e = tl.maximum((tl.maximum(big_a, big_b).to(tl.int32, bitcast=True) >> 23) & 0xFF, 16)
    up = ((267 - e) << 23).to(tl.float32, bitcast=True)
    out = pairs_ptr + m * 8 * KU + u
    tl.store(out, x_pair(a0, a4, up), mask=ok)
    tl.store(out + KU, x_pair(a1, a5, up), mask=ok)
    tl.store(out + 2 * KU, x_pair(a2, a6, up), mask=ok)
    tl.store(out + 3 * KU, x_pair(a3, a7, up), mask=ok)
    tl.store(out + 4 * KU, x_pair(b0, b4, up), mask=ok)
    tl.store(out + 5 * KU, x_pair(b1, b5, up), mask=ok)
    tl.store(out + 6 * KU, x_pair(b2, b6, up), mask=ok)
    tl.store(out + 7 * KU, x_pair(b3, b7, up), mask=ok)
    tl.store(down_ptr + m * KU + u, ((e - 15) << 23).to(tl.float32, bitcast=True), mask=ok)


@triton.jit
def _pair_at(pairs_ptr, j: tl.constexpr, KU, u, ok, shape: tl.constexpr):
    """x's pairs j of units u (0 where not ok), broadcast over the weight rows."""
    return tl.broadcast_to(tl.load(pairs_ptr + j * KU + u, mask=ok, other=0)[None, :], shape)


@triton.jit
def _fp4_gemv_kernel(pairs_ptr, down_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, N, KU, U_STEPS: tl.constexpr,
                     MX: tl.constexpr, B: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr):
    """y[n] = (sum_k x[k] dequant(W)[n, k]) (* global) (+ bias) for BLOCK_N rows n, row m of x (grid axis 1), from
    x's pairs and powers of two (`_x_pairs_kernel`) and the weight read as uint64 units of 16 codes."""
    m = tl.program_id(1)
    pairs_ptr += m * 8 * KU
    down_ptr += m * KU
    y_ptr += m * N
    wp = w_ptr.to(tl.pointer_type(tl.uint64))
    sp = s_ptr.to(tl.pointer_type(tl.uint8))
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.float32)
    shape: tl.constexpr = (BLOCK_N, BLOCK_U)
    for step in range(0, U_STEPS):
        u = step * BLOCK_U + tl.arange(0, BLOCK_U)
        ok = u < KU
        m2 = mask_n[:, None] & ok[None, :]
        units = tl.load(wp + rows * KU + u[None, :], mask=m2, other=0, eviction_policy="evict_first")
        bits = tl.load(sp + rows * (KU * 16 // B) + (u * 16 // B)[None, :], mask=m2, other=0,
                       eviction_policy="evict_first")
        p0 = _pair_at(pairs_ptr, 0, KU, u, ok, shape)
        p1 = _pair_at(pairs_ptr, 1, KU, u, ok, shape)
        p2 = _pair_at(pairs_ptr, 2, KU, u, ok, shape)
        p3 = _pair_at(pairs_ptr, 3, KU, u, ok, shape)
        p4 = _pair_at(pairs_ptr, 4, KU, u, ok, shape)
        p5 = _pair_at(pairs_ptr, 5, KU, u, ok, shape)
        p6 = _pair_at(pairs_ptr, 6, KU, u, ok, shape)
        p7 = _pair_at(pairs_ptr, 7, KU, u, ok, shape)
        down = tl.load(down_ptr + u, mask=ok, other=0.0)
        if ASM:
            part = e2m1_dot16(units, p0, p1, p2, p3, p4, p5, p6, p7)
        else:
            part = e2m1_dot16_emulated(units, p0, p1, p2, p3, p4, p5, p6, p7)
        acc += part * (_scale_multiplier(bits, MX, 16, 65536.0) * down[None, :])  # 16: SCALE_SHIFT
    store_row(tl.sum(acc, axis=1), g_ptr, b_ptr, y_ptr, offs_n, mask_n, HAS_GLOBAL, HAS_BIAS)


@triton.jit
def store_row(out, g_ptr, b_ptr, y_ptr, offs_n, mask_n, HAS_GLOBAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The GEMVs' epilogue: y[offs_n] = out (fp32) times the NVFP4 global scale, plus the bias, in y's dtype."""
    if HAS_GLOBAL:
        out = out * tl.load(g_ptr)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def launch_gemv(x2d, w_packed, w_scale, w_global, bias, block_size: int, cfg: dict | None = None, *,
                wrap=identity) -> torch.Tensor:
    """`x2d @ dequant(W).T + bias` [M, N] in x2d.dtype (fp16/bf16; K a multiple of 16, as every FP4 block is):
    x's pairs, then the GEMV (meant for M = 1: each row of x re-reads the weight)."""
    cfg = cfg or GEMV
    m, k = x2d.shape
    n = w_packed.shape[0]
    ku = k // 16
    pairs = torch.empty((m, 8, ku), dtype=torch.int32, device=x2d.device)
    down = torch.empty((m, ku), dtype=torch.float32, device=x2d.device)
    wrap(_x_pairs_kernel)[(cdiv(ku, X_PAIRS_BLOCK), m)](x2d, pairs, down, ku, x2d.stride(0), BLOCK=X_PAIRS_BLOCK)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    wrap(_fp4_gemv_kernel)[(cdiv(n, cfg["BLOCK_N"]), m, 1)](
        pairs, down, w_packed, w_scale, optional_arg(w_global, w_packed), optional_arg(bias, x2d), y, n, ku,
        U_STEPS=cdiv(ku, cfg["BLOCK_U"]), MX=w_scale.dtype == torch.uint8, B=block_size,
        HAS_GLOBAL=w_global is not None, HAS_BIAS=bias is not None, ASM=ptx_available(),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_U=cfg["BLOCK_U"], num_warps=cfg["num_warps"],
    )
    return y
