"""The FP4 GEMV (M = 1, fp16/bf16 x) on packed fp16x2 for weights in planar words (CUDA only).

The same contract and arithmetic as `gemv.py`, for the second engine layout (`format.to_planar_words`): `words`
int32 [N, K/8], K a multiple of 64; in each 64 K of a row (a chunk: 8 words, 32 bytes), word c holds the codes of
k = 16 j + 2 c (low half) and k + 1 (high half) for j = 0..3, a code's bits (m, e0, e1, s) at `PLANAR_BITS[j]`.
Pair j of the 8 words of a chunk is then one 16-K block (one NVFP4 block; MXFP4's blocks are j in {0, 1} and
{2, 3}), and the x that pair (j, c) multiplies is the consecutive pair (x[16 j + 2 c], x[16 j + 2 c + 1]).

Two launches per call:

1. `_x_scaled_kernel`: per 16-block of x, the power of two `up` that puts its largest |x| in [2**13, 2**14), the
   block times `up` in fp16, and `down = 2**14 / up / 2**16` (the decode's 2**-14 and gemv.py's SCALE_SHIFT of the
   block scales included). Both go to planes over the chunks: xs [M, 16, K/64, 4] holds x[64 c + 16 J + 4 h + r]
   at [m, 4 J + h, c, r] (plane 4 J + h: the two x pairs of words c' = 2 h, 2 h + 1 of block J, for every chunk c),
   and down [M, 4, K/64] the block's down at [m, J, c]; a warp's threads (consecutive chunks) then read
   consecutive 8 bytes.
2. `_fp4_gemv_planar_kernel`: each program owns BLOCK_N weight rows over all of K (no split-K; global scale, bias
   and cast in the kernel). A step reads BLOCK_C chunks of each row, a thread a chunk's 32 bytes as two 16-byte
   loads (inline PTX), and a scale byte per block; per chunk, four fp16x2 chains (one per block j) of 8 HFMA2 over
   c, each to fp32 (its two halves added) times the block's scale times down. Tiles are [BLOCK_C, BLOCK_N], chunks
   first: Triton then lays a thread over the BLOCK_N rows of one chunk, so x's 32 pairs are loaded once for 4 rows
   (as [BLOCK_N, BLOCK_C] a thread held one row: 4.5 SASS instructions per weight). Masks only when N or the
   chunks do not fill the grid (EVEN), and then x's loads are clamped into K, not masked (their weights are 0).

Decoding (`planar.pair_bits`): pair j of a word to the fp16x2 `e2m1 * 2**-14` (sign to bit 15, `e1 e0 m` to bits
11..9 of each half; code 1, 0.5, is an fp16 subnormal); pairs 0-2 take a shift and two masks, sharing shifts (the
sign of pair 1 is pair 0's magnitude shift, and so on), pair 3 three shifts: 15 integer ops per word of 8 codes, as
the nibble layout's `e2m1_dot16`. Numerics are gemv.py's: products and the sums of a block in fp16 (at most 48),
so the GEMV serves 16-bit x only.

Why a GEMV of its own: a planar weight (meant for the tensor-core kernels' 2-6-op bf16/fp16 decode) keeps the
fast M = 1 path without a second copy in the byte layout. The first version (x in [M, K] order, four 8-byte weight
loads per chunk; 3.67 sm_90 instructions per weight) took 1.1-1.6x the byte GEMV's time on the H200
(benchmarks/fp4_int4_gemm_planar_s26.json): each of its 16 x loads per chunk touched a different 128-byte line per
thread. Now 3.39 instructions per weight with 4 rows a program (NVFP4, bf16; 3.44 MXFP4; tools/diag/sass_count.py
--block-n 4) and 3.69 with the shipped 2 rows (3.58 MXFP4), which ran faster; 0.94-1.14x the byte GEMV's speed,
1.08-1.53x INT4's GEMV's (benchmarks/tune_fp4_planar_s26.json).

`_block_dot_emulated` is the chain in plain Triton (fp32 products of the same decoded pairs) for the CPU
interpreter, which cannot run PTX.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.fp4_gemm.gemv import store_row
from qcompile.plugins.fp4_gemm.kernel import _scale_multiplier
from qcompile.plugins.fp4_gemm.format import is_row_pairs, weight_nk
from qcompile.plugins.fp4_gemm.planar import pair_bits, pair_row_offset, pair_word_offset
from qcompile.plugins.gemm_dispatch import cdiv, identity, optional_arg
from qcompile.plugins.int4_gemm.half2 import half_of, ptx_available

# 2 rows x 64 chunks (4 KiB of each row per step) on 2 warps, a thread holding one chunk of both rows: within 5% of
# the best of 11 tiles on the four kernel-target layers (benchmarks/tune_fp4_planar_s26.json)
GEMV_PLANAR = dict(BLOCK_N=2, BLOCK_C=64, num_warps=2)
# Row pairs up to N = 16383 (`GEMV_PAIRS_MAX_N`): 2 rows x 32 chunks on 1 warp. On row pairs, µs with this tile
# against the planar one, NVFP4 then MXFP4: 9.7 / 10.3 and 9.6 / 10.1 on 4096 x 4096, 18.7 / 20.2 and 18.1 / 20.1 on
# 4096 x 14336, 20.5 / 22.5 and 22.6 / 22.7 on 14336 x 4096; 57.6 / 55.8 and 59.2 / 56.1 on 8192 x 28672, where wider
# layers keep the planar tile (H100, bf16; benchmarks/tune_fp4_pairs-h100_s54.*, tune_gemv-mxfp4-pairs-h100_s54c.*)
GEMV_PAIRS = dict(BLOCK_N=2, BLOCK_C=32, num_warps=1)
GEMV_PAIRS_MAX_N = 16383
# MXFP4 on row pairs deeper than GEMV_MX_DEEP_K (and up to GEMV_PAIRS_MAX_N rows): 4 rows x 32 chunks on 1 warp. µs
# against `GEMV_PAIRS` on 14336 x 4096: 20.4 / 22.6 (session 54), 20.4 / 22.7 (session 56); on 4096 x 4096 and
# 4096 x 14336 it lost (10.6 / 9.5, 21.2 / 18.1), and NVFP4 on 14336 x 4096 keeps GEMV_PAIRS (21.5 / 20.5). K = 8192
# is not measured, so the bound sits there (H100, bf16; benchmarks/tune_gemv-mxfp4-pairs-h100_s54c.*, _s56.*)
GEMV_PAIRS_MX_DEEP = dict(BLOCK_N=4, BLOCK_C=32, num_warps=1)
GEMV_MX_DEEP_K = 8192
X_SCALED_BLOCK = 64  # 16-blocks of x per program of `_x_scaled_kernel`


@triton.jit
def _halves(v):
    """(low, high) int32 words of uint64 v."""
    return (v & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True), (v >> 32).to(tl.uint32).to(tl.int32, bitcast=True)


@triton.jit
def _block_dot(a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7):
    """fp32 `sum_c a_c . p_c` of decoded weight pairs a_c and x pairs p_c (fp16x2 in 32 bits), inline PTX: 8 HFMA2
    (sums in fp16), then the two halves to fp32 and added."""
    # a literal, not a global: AOTInductor copies the kernel's source into its generated code
    out = tl.inline_asm_elementwise(
        "{ .reg .b32 acc; .reg .b16 lo, hi; .reg .f32 flo, fhi, s; "
        "mul.rn.f16x2 acc, $1, $9; fma.rn.f16x2 acc, $2, $10, acc; fma.rn.f16x2 acc, $3, $11, acc; "
        "fma.rn.f16x2 acc, $4, $12, acc; fma.rn.f16x2 acc, $5, $13, acc; fma.rn.f16x2 acc, $6, $14, acc; "
        "fma.rn.f16x2 acc, $7, $15, acc; fma.rn.f16x2 acc, $8, $16, acc; "
        "mov.b32 {lo, hi}, acc; cvt.f32.f16 flo, lo; cvt.f32.f16 fhi, hi; add.f32 s, flo, fhi; mov.b32 $0, s; }",
        "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r", [a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7],
        dtype=tl.int32, is_pure=True, pack=1)
    return out.to(tl.float32, bitcast=True)


@triton.jit
def _pair_dot_emulated(a, p):
    """fp32 `a . p` of two fp16x2 pairs (fp32 products)."""
    return half_of(a, False) * half_of(p, False) + half_of(a, True) * half_of(p, True)


@triton.jit
def _block_dot_emulated(a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7):
    """`_block_dot` in plain Triton (fp32 products and sums), for the CPU interpreter."""
    out = _pair_dot_emulated(a0, p0) + _pair_dot_emulated(a1, p1) + _pair_dot_emulated(a2, p2)
    out += _pair_dot_emulated(a3, p3) + _pair_dot_emulated(a4, p4) + _pair_dot_emulated(a5, p5)
    return out + _pair_dot_emulated(a6, p6) + _pair_dot_emulated(a7, p7)


@triton.jit
def _x_at(xq, KC, J: tl.constexpr, h: tl.constexpr, shape: tl.constexpr):
    """x pairs (c = 2h, 2h + 1) of block J of the chunks at xq (plane 4 J + h of `_x_scaled_kernel`'s xs), broadcast
    over the weight rows."""
    lo, hi = _halves(tl.load(xq + (4 * J + h) * KC))
    return tl.broadcast_to(lo[:, None], shape), tl.broadcast_to(hi[:, None], shape)


@triton.jit
def _block(w0, w1, w2, w3, w4, w5, w6, w7, xq, KC, J: tl.constexpr, shape: tl.constexpr, ASM: tl.constexpr):
    """fp32 `sum_k e2m1 * 2**-14 * x * up` over block J (16 K) of each chunk: its 8 pairs decoded, dotted with x's."""
    p0, p1 = _x_at(xq, KC, J, 0, shape)
    p2, p3 = _x_at(xq, KC, J, 1, shape)
    p4, p5 = _x_at(xq, KC, J, 2, shape)
    p6, p7 = _x_at(xq, KC, J, 3, shape)
    a0, a1, a2, a3 = pair_bits(w0, J, True), pair_bits(w1, J, True), pair_bits(w2, J, True), pair_bits(w3, J, True)
    a4, a5, a6, a7 = pair_bits(w4, J, True), pair_bits(w5, J, True), pair_bits(w6, J, True), pair_bits(w7, J, True)
    if ASM:
        return _block_dot(a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7)
    return _block_dot_emulated(a0, a1, a2, a3, a4, a5, a6, a7, p0, p1, p2, p3, p4, p5, p6, p7)


@triton.jit
def _ld_16_bytes(addr):
    """4 int32 at byte address addr (int64, 16-byte aligned): one 16-byte load, evict-first."""
    return tl.inline_asm_elementwise("ld.global.L1::evict_first.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
                                     [addr], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _chunk_words(wrow, m2, ASM: tl.constexpr, EVEN: tl.constexpr):
    """The 8 words (int32 [BLOCK_C, BLOCK_N] each) of the chunks at wrow (uint64 pointers, all in bounds); 0 where m2
    is False (EVEN: m2 is all True). With PTX each thread reads its 32 bytes as two 16-byte loads (Triton's own
    [.., 4] load spreads a chunk over two threads and regroups it through shared memory); without (the
    interpreter), four uint64 loads."""
    if ASM:
        addr = wrow.to(tl.int64, bitcast=True)
        w0, w1, w2, w3 = _ld_16_bytes(addr)
        w4, w5, w6, w7 = _ld_16_bytes(addr + 16)
    else:
        w0, w1 = _halves(tl.load(wrow))
        w2, w3 = _halves(tl.load(wrow + 1))
        w4, w5 = _halves(tl.load(wrow + 2))
        w6, w7 = _halves(tl.load(wrow + 3))
    if EVEN:
        return w0, w1, w2, w3, w4, w5, w6, w7
    return (tl.where(m2, w0, 0), tl.where(m2, w1, 0), tl.where(m2, w2, 0), tl.where(m2, w3, 0),
            tl.where(m2, w4, 0), tl.where(m2, w5, 0), tl.where(m2, w6, 0), tl.where(m2, w7, 0))


@triton.jit
def _block_multiplier(srow, m2, down_ptr, KC, J: tl.constexpr, MX: tl.constexpr, EVEN: tl.constexpr):
    """fp32 `scale * 2**16 * down` of block J of each chunk (srow, down_ptr: the chunks' first scale byte and their
    down in plane 0; m2 unused when EVEN). A byte load per block (not one word per chunk): a contiguous load would
    get a layout of its own, converted through shared memory."""
    if EVEN:
        bits = tl.load(srow + (J // 2 if MX else J))
    else:
        bits = tl.load(srow + (J // 2 if MX else J), mask=m2, other=0)
    down = tl.load(down_ptr + J * KC)
    return _scale_multiplier(bits, MX, 16, 65536.0) * down[:, None]  # 16: SCALE_SHIFT


@triton.jit
def _x_scaled_kernel(x_ptr, xs_ptr, down_ptr, KB, stride_xm, BLOCK: tl.constexpr):
    """Per 16-block u = 4 c + J (chunk c, block J) of row m of x (grid axis 1): x * up in fp16, up the power of two
    putting the block's largest |x| in [2**13, 2**14), and down = 2**14 / up / 2**16 (SCALE_SHIFT). Both are stored
    in planes over the chunks (module docstring): x[64 c + 16 J + 4 h + r] at xs[m, 4 J + h, c, r] and down at
    down[m, J, c]."""
    m = tl.program_id(1)
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (u < KB)[:, None]
    i = tl.arange(0, 16)[None, :]
    x = tl.load(x_ptr + m * stride_xm + u[:, None] * 16 + i, mask=ok, other=0.0).to(tl.float32)
    e = tl.maximum((tl.max(tl.abs(x), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF, 16)
    up = ((267 - e) << 23).to(tl.float32, bitcast=True)
    KC = KB // 4
    c, J = u // 4, u % 4
    plane = (4 * J[:, None] + i // 4) * KC + c[:, None]
    tl.store(xs_ptr + m * KB * 16 + plane * 4 + i % 4, (x * up[:, None]).to(tl.float16), mask=ok)
    tl.store(down_ptr + m * KB + J * KC + c, ((e - 15) << 23).to(tl.float32, bitcast=True), mask=u < KB)


@triton.jit
def _fp4_gemv_planar_kernel(xs_ptr, down_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, N, KC, C_STEPS: tl.constexpr,
                            MX: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                            EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                            PAIRED: tl.constexpr = False):
    """y[n] = (sum_k x[k] dequant(W)[n, k]) (* global) (+ bias) for BLOCK_N rows n, row m of x (grid axis 1), from
    x scaled per 16-block (`_x_scaled_kernel`) and the planar words (PAIRED: in row pairs, `format.to_row_pairs`),
    KC = K / 64 chunks per row."""
    m = tl.program_id(1)
    xq_row = xs_ptr.to(tl.pointer_type(tl.uint64)) + m * 16 * KC  # 16 planes of KC uint64 (4 per block j)
    down_row = down_ptr + m * 4 * KC
    y_ptr += m * N
    wq = w_ptr.to(tl.pointer_type(tl.uint64))  # 4 uint64 per chunk
    sp = s_ptr.to(tl.pointer_type(tl.uint8))
    NB: tl.constexpr = 2 if MX else 4  # scale blocks per chunk
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[None, :]
    rows_in = rows if EVEN else tl.minimum(rows, N - 1)  # rows past N read row N - 1 (their words are zeroed)
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    shape: tl.constexpr = (BLOCK_C, BLOCK_N)
    for step in range(0, C_STEPS):
        c = step * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = c < KC
        m2 = ok[:, None] & mask_n[None, :]
        c_in = c if EVEN else tl.minimum(c, KC - 1)  # chunks past K read chunk KC - 1: x finite, words zeroed
        if PAIRED:  # uint64 units: half the word offset
            chunk_at = (pair_row_offset(rows_in, 64 * KC) + pair_word_offset(8 * c_in[:, None])) // 2
        else:
            chunk_at = rows_in * (4 * KC) + 4 * c_in[:, None]
        w0, w1, w2, w3, w4, w5, w6, w7 = _chunk_words(wq + chunk_at, m2, ASM, EVEN)
        srow = sp + rows * (NB * KC) + NB * c[:, None]
        xq = xq_row + c_in
        down_c = down_row + c_in
        for j in tl.static_range(4):
            acc += _block(w0, w1, w2, w3, w4, w5, w6, w7, xq, KC, j, shape, ASM) * \
                _block_multiplier(srow, m2, down_c, KC, j, MX, EVEN)
    store_row(tl.sum(acc, axis=0), g_ptr, b_ptr, y_ptr, offs_n, mask_n, HAS_GLOBAL, HAS_BIAS)


def gemv_tile(n: int, k: int, pairs: bool, mx: bool) -> dict:
    """The GEMV's tile for N weight rows K deep: on row pairs up to GEMV_PAIRS_MAX_N rows `GEMV_PAIRS`, or for MXFP4
    deeper than GEMV_MX_DEEP_K `GEMV_PAIRS_MX_DEEP`; else `GEMV_PLANAR`."""
    if not pairs or n > GEMV_PAIRS_MAX_N:
        return GEMV_PLANAR
    return GEMV_PAIRS_MX_DEEP if mx and k > GEMV_MX_DEEP_K else GEMV_PAIRS


def launch_gemv_planar(x2d, words, w_scale, w_global, bias, block_size: int, cfg: dict | None = None, *,
                       wrap=identity) -> torch.Tensor:
    """`x2d @ dequant(W).T + bias` [M, N] in x2d.dtype (fp16/bf16) for planar words [N, K/8] (K a multiple of 64) or
    row pairs [N/2, K/128, 2, 16] (default tile `gemv_tile`'s):
    x scaled per 16-block, then the GEMV (meant for M = 1: each row of x re-reads the weight). `block_size` is
    implied by w_scale's dtype (taken for `gemv.launch_gemv`'s signature)."""
    m, k = x2d.shape
    n = weight_nk(words)[0]
    cfg = cfg or gemv_tile(n, k, is_row_pairs(words), mx=w_scale.dtype == torch.uint8)
    kb, kc = k // 16, k // 64
    xs = torch.empty((m, k), dtype=torch.float16, device=x2d.device)
    down = torch.empty((m, kb), dtype=torch.float32, device=x2d.device)
    wrap(_x_scaled_kernel)[(cdiv(kb, X_SCALED_BLOCK), m)](x2d, xs, down, kb, x2d.stride(0), BLOCK=X_SCALED_BLOCK)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    wrap(_fp4_gemv_planar_kernel)[(cdiv(n, cfg["BLOCK_N"]), m, 1)](
        xs, down, words, w_scale, optional_arg(w_global, words), optional_arg(bias, x2d), y, n, kc,
        C_STEPS=cdiv(kc, cfg["BLOCK_C"]), MX=w_scale.dtype == torch.uint8, HAS_GLOBAL=w_global is not None,
        HAS_BIAS=bias is not None, ASM=ptx_available(), EVEN=n % cfg["BLOCK_N"] == 0 and kc % cfg["BLOCK_C"] == 0,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"], PAIRED=is_row_pairs(words),
        num_warps=cfg["num_warps"],
    )
    return y
