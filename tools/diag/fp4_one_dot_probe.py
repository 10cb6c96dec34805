"""Diagnostic (H200): NVFP4 / MXFP4 on the tensor cores with the INT4 one-dot design, next to the FP4 op, the
INT4 op and cuBLAS bf16 (CUDA-graph replay, rotating weights; every configuration checked against float64
first). Not part of the product.

Why: the FP4 tile kernel converts each decoded tile's layout through shared memory, as the INT4 tile kernel did
before `plugins/int4_gemm/one_dot.py` replaced it. On the H200 the FP4 op now runs 0.59-0.83x INT4's speed at
16-64 rows on the three wide layers (benchmarks/fp4_int4_gemm-tma128-s23.json), and its sm_90 loop is 6.53
instructions per weight against 3.44 for the INT4 one-dot kernel (`tools/diag/sass_count.py`, 16 x 64 tiles).

Layout (`to_planar`): the E2M1 codes in INT4's planar order [K/8, N] (`int4_gemm.format.to_engine` of the codes
as signed nibbles): in each 64 K, word c holds k = 16 j + 2 c + t in nibble j + 4 t, so nibbles j and j + 4 are
a (k, k + 1) pair, the register pair of the MMA's first operand. For bf16 the four bits of each code are then
moved within the word (`BF16_BITS`) so that pair 0 decodes with one AND, pairs 1 and 2 with a shift and an AND,
and pair 3 with three shifts and three LOP3: 11 operations per word against 15 for nibbles in place (which fp16
keeps). No placement puts all four pairs one shift away (checked exhaustively). A pair becomes the 16-bit float
pair `e2m1 * 2^-126` (bf16) or `e2m1 * 2^-14` (fp16), the zero-exponent codes as subnormals.

Scales (`_step_multipliers`), the second version (twenty-fourth session). A row's scales of one 128-K step are
one load in the rows' own layout: 8 bytes (NVFP4) or 4 (MXFP4) of the engine's [N, K/B], read as one int64 or
int32 per row. Each 16-K tile's pair multiplier is built in registers and multiplies the decoded pairs with one
HMUL2 per pair (inline PTX):
- NVFP4 bf16: `cvt.rn.f16x2.e4m3x2` (exact, subnormal scales included), the fp16 bits >> 3 as bf16 bits
  (s * 2^-112; an E4M3 value leaves the low 3 fp16 mantissa bits 0) + 229 to the exponent (one LEA.HI), then
  each half into both (PRMT): s * 2^117 = s * 2^(126 - 9). A zero scale gives 2^102, so `to_planar` zeroes
  the codes of zero-scale blocks (the same weights).
- NVFP4 fp16: the same cvt, times 2^7 (HMUL2): s * 2^7, exact for every E4M3 value.
- MXFP4: the E8M0 byte e as `(e + 110) << 7` (bf16, exact for e <= 144, scales up to 2^17) or `(e - 102) << 10`
  (fp16, 103 <= e <= 132), in both halves with one IMAD: the tile kernel's documented ranges.
The accumulator is multiplied by 2^X (`POST_SHIFT`: 9 / 7 NVFP4, 16 / 4 MXFP4, bf16 / fp16) and NVFP4's global
scale once.

Pointers are formed once and a step adds scalars, as in the INT4 one-dot kernel (the first version recomputed
64-bit word addresses every step: about 60 instructions). x's rows past M wrap (`triton_tiles.xt_columns`).

Words: [K/8, N] as INT4's, or (`rows`) [N, K/8], a row's 64 K in 32 contiguous bytes. The FP4 op could adopt
rows: its GEMV and dequantize kernels read the weight by rows.

sm_90 SASS of the main loop, compiled on the CPU (`sass_count.py fp4_one_dot_probe_16 ... [--block-n 128]`, bf16,
per weight; BENCHMARKS.md, twenty-fourth session). NVFP4, words in rows: 4.22 (16 x 64 tile), 3.55 (16 x 128) and
3.52 (64 x 128). MXFP4: 3.98 / 3.30 / 3.27. In INT4's layout: 5.19 / 3.91 / 3.99. The FP4 op's shipped tiles run
6.53 (16 rows) and 5.95 (64 rows); INT4's TMA tiles 2.95 and 3.47. The first version (seventeenth session, `git
show 558250b:tools/diag/fp4_one_dot_probe.py`) was 7.6-8.5 per weight and ran 0.93-1.11x the FP4 op on the H200
(benchmarks/fp4_one_dot_probe_s17.json). This one has not run on a GPU yet.

Checked on the CPU (`--cpu-check`): the kernel in fp16 through the interpreter against float64, NVFP4 (every E4M3
scale code but NaN, zero and subnormal ones included) and MXFP4, both word layouts, pointer and TMA loads (the
interpreter runs the plain-Triton stand-ins of the inline PTX, and it flushes bf16 subnormals, so bf16 cannot run
there); with torch bit operations, the bf16 bit placement and decoding against the E2M1 value of every code, and
the bf16 scale multipliers' integer formulas for every scale code. The PTX itself runs only on the GPU: the
float64 check before timing covers it.

    OUT=... python3 tools/diag/fp4_one_dot_probe.py [--shapes KxN ...] [--ms 16 64] [--only rows]
    TRITON_INTERPRET=1 python3 tools/diag/fp4_one_dot_probe.py --cpu-check
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/

from qcompile.plugins.int4_gemm.one_dot import _cat_k  # noqa: E402
from qcompile.plugins.triton_tiles import store_tile, xt_columns  # noqa: E402

STEP = 128  # K per step


@triton.jit
def _asm_nv_bf16(word):
    """4 bf16x2 multipliers, s_i * 2^117 in both halves, from the 4 E4M3 scale bytes of word: cvt e4m3x2 -> f16x2
    (exact), the fp16 bits >> 3 as bf16 bits (s * 2^-112; the low 3 mantissa bits of an E4M3 value are 0), plus
    229 << 7 (0x7280) to the exponent (X = 9), then each half into both halves (PRMT). A zero scale gives 2^102,
    not 0: zero-scale blocks need zero codes."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; .reg .b32 a, b;\n"
        "mov.b32 {l, h}, $4;\n"
        "cvt.rn.f16x2.e4m3x2 a, l;\n"
        "cvt.rn.f16x2.e4m3x2 b, h;\n"
        "shr.b32 a, a, 3;\n add.u32 a, a, 0x72807280;\n"
        "shr.b32 b, b, 3;\n add.u32 b, b, 0x72807280;\n"
        "prmt.b32 $0, a, 0, 0x1010;\n prmt.b32 $1, a, 0, 0x3232;\n"
        "prmt.b32 $2, b, 0, 0x1010;\n prmt.b32 $3, b, 0, 0x3232; }",
        "=r,=r,=r,=r,r", [word], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _asm_nv_fp16(word):
    """As `_asm_nv_bf16` for fp16 tiles: s_i * 2^7 in both halves (exact: normal fp16 for every E4M3 value)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; .reg .b32 a, b, c;\n"
        "mov.b32 {l, h}, $4;\n"
        "mov.b32 c, 0x58005800;\n"
        "cvt.rn.f16x2.e4m3x2 a, l;\n"
        "cvt.rn.f16x2.e4m3x2 b, h;\n"
        "mul.rn.f16x2 a, a, c;\n mul.rn.f16x2 b, b, c;\n"
        "prmt.b32 $0, a, 0, 0x1010;\n prmt.b32 $1, a, 0, 0x3232;\n"
        "prmt.b32 $2, b, 0, 0x1010;\n prmt.b32 $3, b, 0, 0x3232; }",
        "=r,=r,=r,=r,r", [word], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _mx_pair(word, i: tl.constexpr, FP16: tl.constexpr):
    """E8M0 byte i of word as a 16-bit float pair 2^(e - 127) * 2^(TINY - X) (bf16: X = 16, fp16: X = 4), by
    integer ops: (e + 110) << 7 (bf16) or (e - 102) << 10 (fp16) in both halves. bf16 exact for e <= 144; fp16
    for 103 <= e <= 132 (the tile kernel's documented ranges)."""
    b = (word >> (8 * i)) & 0xFF
    if FP16:
        return (b - 102) * 0x04000400  # (e - 102) << 10 in both halves
    return b * 0x00800080 + 0x37003700  # (110 << 7) * 0x10001


@triton.jit
def _step_multipliers(s_rows, step, MX: tl.constexpr, FP16: tl.constexpr, ASM: tl.constexpr):
    """The 8 pair multipliers (int32 [BLOCK_N] each, one per 16-K tile of the 128-K step) of each row: its step's
    scales are one load per row (s_rows: int64 (NVFP4: 8 bytes) or int32 (MXFP4: 4 bytes, each for two tiles)
    pointers of the rows' first step), in the rows' own layout."""
    w = tl.load(s_rows + step)
    if MX:
        m0 = _mx_pair(w, 0, FP16)
        m2 = _mx_pair(w, 1, FP16)
        m4 = _mx_pair(w, 2, FP16)
        m6 = _mx_pair(w, 3, FP16)
        m1, m3, m5, m7 = m0, m2, m4, m6
    else:
        lo = w.to(tl.int32)
        hi = (w >> 32).to(tl.int32)
        if ASM:
            if FP16:
                m0, m1, m2, m3 = _asm_nv_fp16(lo)
                m4, m5, m6, m7 = _asm_nv_fp16(hi)
            else:
                m0, m1, m2, m3 = _asm_nv_bf16(lo)
                m4, m5, m6, m7 = _asm_nv_bf16(hi)
        else:
            m0, m1, m2, m3 = _nv_pairs_emulated(lo, FP16)
            m4, m5, m6, m7 = _nv_pairs_emulated(hi, FP16)
    return m0, m1, m2, m3, m4, m5, m6, m7


@triton.jit
def _nv_pair_emulated(word, i: tl.constexpr, FP16: tl.constexpr):
    """Plain-Triton `_asm_nv_*` for one byte (the interpreter runs no PTX)."""
    s = ((word >> (8 * i)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if FP16:
        h = (s * 128.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        h = (s * 1.6615349947311448e35).to(tl.float32)  # 2^117
        h = h.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _nv_pairs_emulated(word, FP16: tl.constexpr):
    """`_nv_pair_emulated` of the word's four bytes."""
    return (_nv_pair_emulated(word, 0, FP16), _nv_pair_emulated(word, 1, FP16), _nv_pair_emulated(word, 2, FP16),
            _nv_pair_emulated(word, 3, FP16))


@triton.jit
def _mul2(p, m, FP16: tl.constexpr, ASM: tl.constexpr):
    """The 16-bit float pairs p * m (int32 registers; m one per row): one HMUL2, or emulated (interpreter)."""
    if ASM:
        if FP16:
            return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [p, m], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [p, m], dtype=tl.int32,
                                         is_pure=True, pack=1)
    dt: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    lo = (p.to(tl.int16).to(dt, bitcast=True).to(tl.float32)
          * m.to(tl.int16).to(dt, bitcast=True).to(tl.float32)).to(dt)
    hi = ((p >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)
          * (m >> 16).to(tl.int16).to(dt, bitcast=True).to(tl.float32)).to(dt)
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


SIGNS = tl.constexpr(-2147450880)  # 0x80008000 as an int32


@triton.jit
def _shift(w, by: tl.constexpr):
    """w << by, or w >> -by (the bits that matter are masked after it)."""
    if by >= 0:
        return w << by
    return w >> -by


@triton.jit
def _fp4_tile16(words, j: tl.constexpr, mult, BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, 16] E2M1 values of k = 16 j .. 16 j + 15 of a 64-K block (words [BLOCK_N, 8]) times the row's
    pair multiplier `mult` [BLOCK_N] (it carries the decoding's power of two): nibbles j and j + 4 placed as a
    16-bit float pair, one HMUL2 per pair."""
    if dt == tl.float16:  # nibbles in place: two shifts and two LOP3 per pair
        p = (_shift(words, 9 - 4 * j) & (0x00070007 << 9)) | (_shift(words, 12 - 4 * j) & SIGNS)
    elif j == 0:  # bf16: the bits placed by `to_planar` (BF16_BITS)
        p = words & -2118090304  # 0x81C081C0
    elif j == 1:
        p = (words << 3) & -2118090304
    elif j == 2:
        p = (words << 6) & -2118090304
    else:
        p = ((words >> 4) & 0x00C000C0) | ((words >> 5) & 0x01000100) | ((words << 1) & SIGNS)
    p = _mul2(p, mult[:, None], dt == tl.float16, ASM)
    lo = p.to(tl.int16).to(dt, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(dt, bitcast=True)
    return tl.join(lo, hi).reshape(BLOCK_N, 16)


@triton.jit
def _block64(w_src, kb, N, m0, m1, m2, m3, BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr,
             TMA: tl.constexpr, ROWS: tl.constexpr):
    """[BLOCK_N, 64] weights of the 64-K block kb, 16-K tile j times m_j. w_src: block 0's word pointers, or with
    TMA the words' descriptor: words [K / 8, N] in [8, BLOCK_N / 32, 32] boxes of a [K / 8, N / 32, 32] view (as
    the INT4 one-dot kernel), or with ROWS words [N, K / 8] (a row's 64 K are 32 contiguous bytes) in
    [BLOCK_N, 8] boxes."""
    if TMA:
        if ROWS:
            words = w_src.load([tl.program_id(0) * BLOCK_N, kb * 8])
        else:
            words = tl.trans(w_src.load([kb * 8, tl.program_id(0) * (BLOCK_N // 32), 0]).reshape(8, BLOCK_N))
    elif ROWS:
        words = tl.load(w_src + kb * 8, eviction_policy="evict_first")
    else:
        words = tl.load(w_src + (kb * 8).to(tl.int64) * N, eviction_policy="evict_first")
    return _cat_k(_cat_k(_fp4_tile16(words, 0, m0, BLOCK_N, dt, ASM), _fp4_tile16(words, 1, m1, BLOCK_N, dt, ASM),
                         BLOCK_N, 16),
                  _cat_k(_fp4_tile16(words, 2, m2, BLOCK_N, dt, ASM), _fp4_tile16(words, 3, m3, BLOCK_N, dt, ASM),
                         BLOCK_N, 16),
                  BLOCK_N, 32)


@triton.jit
def _step(x_src, w_src, s_rows, k0, N, acc, MX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          ASM: tl.constexpr, TMA: tl.constexpr, ROWS: tl.constexpr):
    """acc plus the step at k0: its two 64-K blocks' scaled weights [BLOCK_N, 64] joined into one dot with x^T
    [128, BLOCK_M] (pointers formed once, a step adds scalars), or with TMA one dot per block with x^T from its
    [BLOCK_M, 64] box (rows past M load as 0)."""
    if TMA:
        dt: tl.constexpr = x_src.dtype
    else:
        dt: tl.constexpr = x_src.dtype.element_ty
    m0, m1, m2, m3, m4, m5, m6, m7 = _step_multipliers(s_rows, k0 // 128, MX, dt == tl.float16, ASM)
    a = _block64(w_src, k0 // 64, N, m0, m1, m2, m3, BLOCK_N, dt, ASM, TMA, ROWS)
    if TMA:
        acc = tl.dot(a, tl.trans(x_src.load([tl.program_id(2) * BLOCK_M, k0])), acc)
    a1 = _block64(w_src, k0 // 64 + 1, N, m4, m5, m6, m7, BLOCK_N, dt, ASM, TMA, ROWS)
    if TMA:
        acc = tl.dot(a1, tl.trans(x_src.load([tl.program_id(2) * BLOCK_M, k0 + 64])), acc)
    else:
        acc = tl.dot(_cat_k(a, a1, BLOCK_N, 64), tl.load(x_src + k0), acc)
    return acc


@triton.jit
def _fp4_one_dot_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, k_per_split, post,
                        STEPS: tl.constexpr, MX: tl.constexpr, ATOMIC: tl.constexpr, ASM: tl.constexpr,
                        TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr = False):
    """y^T tile [BLOCK_N, BLOCK_M] (times `post`: 2^X, and NVFP4's global scale) over STEPS 128-K steps, the
    first peeled off the loop (one accumulator, wgmmas in flight across steps). Whole tiles only; x's rows past M
    wrap (`xt_columns`) or, with TMA (x_ptr, w_ptr: descriptors), load as 0."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = tl.program_id(1) * k_per_split
    if TMA:
        x_src = x_ptr
        w_src = w_ptr
    else:
        x_src = xt_columns(x_ptr, offs_m, M, stride_xm, 128)
        if ROWS:
            w_src = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 8) + tl.arange(0, 8)[None, :]
        else:
            w_src = w_ptr + tl.arange(0, 8)[None, :] * N + offs_n[:, None]
    s_type: tl.constexpr = tl.int32 if MX else tl.int64
    s_rows = s_ptr.to(tl.pointer_type(s_type)) + offs_n.to(tl.int64) * (K // 128)
    acc = _step(x_src, w_src, s_rows, k_lo, N, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), MX, BLOCK_M,
                BLOCK_N, ASM, TMA, ROWS)
    for step in range(1, STEPS):
        acc = _step(x_src, w_src, s_rows, k_lo + step * 128, N, acc, MX, BLOCK_M, BLOCK_N, ASM, TMA, ROWS)
    store_tile(y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], acc * post, (offs_m < M)[None, :], ATOMIC)


POST_SHIFT = {(False, torch.bfloat16): 9, (False, torch.float16): 7, (True, torch.bfloat16): 16,
              (True, torch.float16): 4}  # X: the tiles hold weight * 2^-X (`_step_multipliers`)


# bf16 words: where the bits (m, e0, e1, s) of the pair j's code sit in each 16-bit half (`_fp4_tile16` decodes j = 0
# with one AND, j = 1 and 2 with a shift and an AND, j = 3 with three shifts and three LOP3 (11 ops per word against
# 15 for nibbles in place: no placement puts all four pairs one shift away, checked exhaustively)
BF16_BITS = ((6, 7, 8, 15), (3, 4, 5, 12), (0, 1, 2, 9), (10, 11, 13, 14))


def to_planar(w_packed: torch.Tensor, w_scale: torch.Tensor, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 engine weight (uint8 [N, K/2] ONNX bytes, scales [N, K/B]) -> (words int32 [K/8, N], scale bits uint8
    [N, K/B], as stored). Words in INT4's planar order: nibbles j and j + 4 of word c of a 64-K block hold k = 16 j
    + 2 c and k + 1; for bf16 each code's bits are then moved to `BF16_BITS[j]` (+ 16 for the second code). NVFP4
    blocks whose scale is 0 get zero codes (the same weights: the kernel's multiplier for a zero scale is not 0)."""
    from qcompile.plugins.int4_gemm.format import to_engine
    codes = torch.stack([w_packed & 0xF, w_packed >> 4], dim=-1).reshape(w_packed.shape[0], -1)  # [N, K]
    bits = w_scale.view(torch.uint8).contiguous()
    if w_scale.dtype != torch.uint8:  # NVFP4
        block = codes.shape[1] // bits.shape[1]
        codes = torch.where(bits.repeat_interleave(block, dim=1) == 0, 0, codes)
    q = codes.to(torch.int16)
    q = torch.where(q >= 8, q - 16, q)  # the nibble as a signed int4 value: same bits
    words = to_engine(q.t().contiguous(), 64)
    if dtype == torch.bfloat16:
        w = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.zeros_like(w)
        for nib in range(8):  # nibble j + 4 t
            code = (w >> (4 * nib)) & 0xF
            for bit, pos in enumerate(BF16_BITS[nib % 4]):
                out |= ((code >> bit) & 1) << (pos + 16 * (nib // 4))
        words = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return words, bits


def launch(x, words, scale_bits, w_global: float, mx: bool, cfg: dict, num_sms: int = 132) -> torch.Tensor:
    """fp32 -> x.dtype `x @ dequant(W)^T` from the planar words (w_global: NVFP4's global scale, a float):
    [K/8, N], or [N, K/8] when cfg["rows"] (`to_planar(...)[0].t().contiguous()`); cfg["tma"]: x and the words
    through host TMA descriptors in boxes with rows of at most 128 bytes."""
    from probe_util import even_splits
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, k = x.shape
    rows = bool(cfg.get("rows"))
    n = words.shape[0] if rows else words.shape[1]
    tiles, splits, per_steps = even_splits(k, n, cfg, STEP, num_sms)
    y = (torch.zeros if splits > 1 else torch.empty)((m, n), device=x.device, dtype=torch.float32)
    post = 2.0 ** POST_SHIFT[mx, x.dtype] * (1.0 if mx else w_global)  # a host float (no .item() in a graph)
    tma = bool(cfg.get("tma"))
    x_src, w_src = x, words
    if tma:
        x_src = TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], 64])
        w_src = (TensorDescriptor.from_tensor(words, [cfg["BLOCK_N"], 8]) if rows else
                 TensorDescriptor.from_tensor(words.view(k // 8, n // 32, 32), [8, cfg["BLOCK_N"] // 32, 32]))
    _fp4_one_dot_kernel[(tiles, splits, triton.cdiv(m, cfg["BLOCK_M"]))](
        x_src, w_src, scale_bits, y, m, n, k, x.stride(0), per_steps * STEP, post, STEPS=per_steps,
        MX=mx, ATOMIC=splits > 1, ASM=x.is_cuda, TMA=tma, ROWS=rows, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.to(x.dtype)


def configs(m: int):
    """Words [N, K/8] (`rows`, the layout the FP4 op could adopt: its GEMV reads rows): the seventeenth session's
    pointer tiles and TMA tiles 128 wide (INT4's shipped width); words [K/8, N] as INT4's, a few tiles."""
    bm = 16 if m <= 16 else 64
    for bn, stages, waves in itertools.product((64, 128), (3, 4), (1, 2, 4, 8)):
        yield f"one_dot rows {bn}x{bm} s{stages} w{waves}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
                                                                num_stages=stages, waves=waves, rows=True)
    for waves in (2, 4, 8):
        yield f"one_dot rows tma 128x{bm} s3 w{waves}", dict(BLOCK_M=bm, BLOCK_N=128, num_warps=4, num_stages=3,
                                                            waves=waves, tma=True, rows=True)
    for bn, waves in itertools.product((64, 128), (2, 4)):
        yield f"one_dot kn {bn}x{bm} s3 w{waves}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=3,
                                                       waves=waves)
    yield f"one_dot kn tma 128x{bm} s3 w4", dict(BLOCK_M=bm, BLOCK_N=128, num_warps=4, num_stages=3, waves=4,
                                                 tma=True)


def cell(k: int, n: int, m: int, only: str = "", device: str = "cuda", dtype=torch.bfloat16, bench=None) -> dict:
    """One layer and M: cuBLAS, the INT4 and FP4 ops and every probe configuration whose name holds `only`, each
    checked against float64 first. `device`, `dtype`, `bench`: stand-ins for `--cpu-check` (CPU, fp16, one call)."""
    from bench_fp4_gemm import FP4, GROUP, make_fp4, make_int4
    from gpu_timing import bench as gpu_bench, rotating
    from qcompile.plugins.fp4_gemm.op import fp4_gemm
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm
    bench = bench or gpu_bench
    x = torch.randn(m, k, device=device, dtype=dtype)
    res = {}
    wb = rotating(lambda: torch.randn(n, k, device=device, dtype=dtype), n * k * 2)
    res["cublas bf16"] = bench(lambda: torch.nn.functional.linear(x, wb()), copies=4, rep=40)
    w4 = rotating(lambda: make_int4(k, n, device), k * n // 2)
    res["int4 op"] = bench(lambda: int4_groupwise_gemm(x, *w4(), None, None, GROUP), copies=4, rep=40)
    line = f"{k}x{n} M={m}: bf16 {res['cublas bf16']:.1f} | int4 op {res['int4 op']:.1f}"
    for fmt, block in FP4.items():
        mx = fmt == "mxfp4"
        sets = [make_fp4(fmt, k, n, device) for _ in range(max(2, min(8, (512 << 20) // (k * n // 2))))]
        res[f"{fmt} op"] = bench(lambda it=itertools.cycle(sets): fp4_gemm(x, *next(it), None, None, block),
                                 copies=4, rep=40)
        ref = x.double() @ dequantize_weight(*sets[0], block).double().t()
        planar = [to_planar(w, s, dtype) + (1.0 if g is None else float(g),) for w, s, g in sets]
        layouts = {False: planar, True: [(words.t().contiguous(), *rest) for words, *rest in planar]}
        timed = {}
        for name, cfg in configs(m):
            if only not in name:
                continue
            key = f"{fmt} {name}"
            weights = layouts[bool(cfg.get("rows"))]
            try:
                y = launch(x, *weights[0], mx, cfg)
                err = float((y.double() - ref).norm() / ref.norm())
                if err > 2e-2:
                    res[key] = f"wrong: rel err {err:.3g}"
                    continue
                res[key] = timed[key] = bench(lambda it=itertools.cycle(weights): launch(x, *next(it), mx, cfg),
                                              copies=4, rep=40)
            except Exception as e:  # noqa: BLE001  (a configuration Triton cannot build)
                res[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        line += f" | {fmt} op {res[f'{fmt} op']:.1f}"
        if timed:
            best = min(timed, key=timed.get)
            res[f"best {fmt}"] = best
            line += (f" probe {timed[best]:.1f} ({best[len(fmt) + 9:]}) {res[f'{fmt} op'] / timed[best]:.2f}x op "
                     f"{res['cublas bf16'] / timed[best]:.2f}x bf16")
        else:
            line += " probe: " + str(next((v for c, v in res.items() if c.startswith(fmt + " one")), "none"))
    print(line, flush=True)
    return res


def cpu_check() -> None:
    """The CPU checks (run with TRITON_INTERPRET=1): the kernel in fp16 through the interpreter against float64
    (NVFP4 with every E4M3 scale code but NaN, MXFP4; pointer and TMA loads, split K, rows past M); the bf16 bit
    placement and decoding of every code with torch bit operations (the interpreter flushes bf16 subnormals); and
    the timing code (`cell`) end to end in fp16, each timing one call: every configuration must pass its float64
    check."""
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight
    torch.manual_seed(0)
    k, n, m = 256, 64, 5
    for mx in (False, True):
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        if mx:
            s, g, block = torch.randint(110, 131, (n, k // 32), dtype=torch.uint8), None, 32
        else:
            s, g, block = torch.randint(0, 0x7F, (n, k // 16), dtype=torch.uint8).view(torch.float8_e4m3fn), \
                torch.tensor(3e-3), 16
        x = torch.randn(m, k, dtype=torch.float16)
        ref = x.double() @ dequantize_weight(w, s, g, block).double().t()
        words, bits = to_planar(w, s, torch.float16)
        for tma, rows in itertools.product((False, True), (False, True)):
            y = launch(x, words.t().contiguous() if rows else words, bits, 1.0 if g is None else float(g), mx,
                       dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, waves=2, tma=tma, rows=rows), num_sms=4)
            err = float((y.double() - ref).norm() / ref.norm())
            print(f"{'mxfp4' if mx else 'nvfp4'} fp16, words {'[N, K/8]' if rows else '[K/8, N]'}"
                  f"{', TMA' if tma else ''}: interpreter vs float64, rel err {err:.2e}")
            assert err < 1e-3
    words = to_planar(w, s, torch.bfloat16)[0].to(torch.int64) & 0xFFFFFFFF  # MXFP4: no codes zeroed
    mask, signs = 0x81C081C0, 0x80008000
    pairs = [words & mask, (words << 3) & mask, (words << 6) & mask,
             ((words >> 4) & 0x00C000C0) | ((words >> 5) & 0x01000100) | ((words << 1) & signs)]  # `_fp4_tile16`
    e2m1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
    codes = torch.stack([w & 0xF, w >> 4], dim=-1).reshape(n, k).long()
    bad = 0
    for j, p in enumerate(pairs):
        for t in range(2):
            got = ((p >> (16 * t)) & 0xFFFF).to(torch.int16).view(torch.bfloat16).double() * 2.0 ** 126  # [K/8, N]
            kk = (torch.arange(k // 8) // 8 * 64 + 16 * j + 2 * (torch.arange(k // 8) % 8) + t)  # word row -> k
            bad += int((got != e2m1[codes[:, kk].t()]).sum())
    h = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    f16 = h.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    bf = ((f16 >> 3) + 0x7280).to(torch.int16).view(torch.bfloat16).double()  # `_asm_nv_bf16`
    bad_scales = int(((bf != h.double() * 2.0 ** 117) & (h.double() != 0)).sum()) + int((f16 & 7).ne(0).sum())
    e = torch.arange(145)
    bad_scales += int(((e * 0x80 + 0x3700).to(torch.int16).view(torch.bfloat16).double()
                       != 2.0 ** (e.double() - 17)).sum())  # `_mx_pair`, bf16
    print(f"bf16 decoding: {bad} wrong of {2 * 4 * words.numel()}; bf16 scale multipliers: {bad_scales} wrong")
    assert bad == 0 and bad_scales == 0
    res = cell(256, 128, 16, device="cpu", dtype=torch.float16, bench=lambda fn, **_: (fn(), 1.0)[1])
    probes = {key: v for key, v in res.items() if " one_dot " in f" {key}"}
    failed = {key: v for key, v in probes.items() if isinstance(v, str)}
    print(f"the timing code on the CPU (fp16, each timing one call): {len(failed)} of {len(probes)} configurations "
          f"failed {failed}")
    assert not failed and len(probes) == 2 * len(list(configs(16)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x14336", "14336x4096", "8192x28672"])
    ap.add_argument("--ms", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--only", default="", help="time only the configurations whose name holds this (e.g. rows)")
    ap.add_argument("--cpu-check", action="store_true", help="the CPU checks instead (needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.cpu_check:
        return cpu_check()
    from gpu_timing import MODE
    from probe_util import run_grid
    MODE["graph"] = True
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    name = "fp4_one_dot_probe-m" + "-".join(map(str, args.ms)) + (f"-{args.only}" if args.only else "") + ".json"
    run_grid(functools.partial(cell, only=args.only), [tuple(map(int, s.split("x"))) for s in args.shapes], args.ms,
             name.replace(" ", "_"))  # one file per run: several runs can share a device call


if __name__ == "__main__":
    main()
