"""Decoding the FP4 planar words (`format.to_planar_words`) in Triton: E2M1 pairs and block-scale multipliers as
16-bit float pairs for the one-dot kernel (`one_dot.py`; the pairs also for `gemv_planar.py`), and fp32 tiles for
the tile and dequantize kernels (CUDA only; imported lazily: CPU machines have no Triton).

Pair j of a planar word holds the codes of k = 16 j + 2 c and k + 1 (its two halves), bits placed by
`format.PLANAR_BITS` so that the pair becomes a bf16 pair `e2m1 * 2**-126` (sign to bit 15, `e1 e0 m` to the
lowest exponent bits and the top mantissa bit: code 1, 0.5, as a subnormal) in 1-6 integer ops, or an fp16 pair
`e2m1 * 2**-14` (`e1 e0 m` to bits 11..9) in 3-5 (`pair_bits`).

A row's block scales of one 128-K step are one load in the rows' own layout (8 bytes for NVFP4's eight 16-K
blocks, read as int64; 4 for MXFP4's four 32-K blocks, as int32), and each 16-K tile gets a pair multiplier
(`step_multipliers`) that one HMUL2 applies to each decoded pair (`mul2`):
- NVFP4 bf16: `cvt.rn.f16x2.e4m3x2` (exact, subnormal scales included), the fp16 bits >> 3 as bf16 bits
  (s * 2**-112: an E4M3 value leaves the low 3 fp16 mantissa bits 0) plus 229 to the exponent (s * 2**117 =
  s * 2**(126 - 9)), then each half into both halves (PRMT). A zero scale gives 2**102, not 0, so
  `to_planar_words` zeroes the codes of zero-scale blocks.
- NVFP4 fp16: the same cvt, times 2**7 (s * 2**(14 - 7)), exact for every E4M3 value.
- MXFP4: the E8M0 byte e as `(e + 110) << 7` (bf16: 2**(e - 127) * 2**(126 - 16), exact for e <= 144, +Inf
  above, as the tile kernel's multiplier overflows) or `(e - 102) << 10` (fp16: * 2**(14 - 4), exact for
  103 <= e <= 132; 0 below, +Inf above), in both halves with one IMAD.
The tile thus holds `weight * 2**-X` (`PAIR_ACC_SHIFT`) and the accumulator is multiplied by 2**X (and NVFP4's global
scale) once.

The PTX (cvt, HMUL2) has plain-Triton stand-ins for the CPU interpreter (`ASM` False), which runs no PTX.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.triton_tiles import load_tile

PAIR_ACC_SHIFT = {(False, torch.bfloat16): 9, (False, torch.float16): 7, (True, torch.bfloat16): 16,
             (True, torch.float16): 4}  # X per (MXFP4?, x dtype): the one-dot tiles hold weight * 2**-X
SIGNS = tl.constexpr(-2147450880)  # 0x80008000 as an int32
BF16_MAG = tl.constexpr(-2118090304)  # 0x81C081C0: sign, e1, e0, m of both bf16 halves


@triton.jit
def pair_row_offset(rows, K):
    """Offset (words) of row `rows`' first word in row pairs (`format.to_row_pairs`) of a weight K deep: `K // 128 *
    32` words per pair (written so, it is provably a multiple of 32 words: 16-byte copies)."""
    return (rows // 2) * (K // 128 * 32) + (rows % 2) * 16


@triton.jit
def pair_word_offset(words):
    """Offset (words) of a row's word `words` from its first word in row pairs: 32 words per 128-K step."""
    return (words // 16) * 32 + words % 16


@triton.jit
def _shift(w, by: tl.constexpr):
    """w << by, or w >> -by (the bits that matter are masked after it)."""
    if by >= 0:
        return w << by
    return w >> -by


@triton.jit
def pair_bits(words, j: tl.constexpr, FP16: tl.constexpr):
    """int32 holding pair j of planar words as two 16-bit floats: bf16 `e2m1 * 2**-126` or (FP16) fp16
    `e2m1 * 2**-14`, low half k = 16 j + 2 c, high half k + 1."""
    if FP16:  # m, e0, e1 -> bits 9, 10, 11; s -> 15
        if j == 3:
            return ((words >> 1) & 0x06000600) | ((words >> 2) & 0x08000800) | ((words << 1) & SIGNS)
        return (_shift(words, 3 + 3 * j) & 0x0E000E00) | (_shift(words, 3 * j) & SIGNS)
    if j == 0:  # bf16: m, e0, e1 -> bits 6, 7, 8; s -> 15
        return words & BF16_MAG
    if j == 3:
        return ((words >> 4) & 0x00C000C0) | ((words >> 5) & 0x01000100) | ((words << 1) & SIGNS)
    return (words << (3 * j)) & BF16_MAG


@triton.jit
def _asm_nv_bf16(word):
    """4 bf16x2 multipliers s_i * 2**117 (both halves) from the 4 E4M3 scale bytes of an int32 (module docstring)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; .reg .b32 a, b; "
        "mov.b32 {l, h}, $4; "
        "cvt.rn.f16x2.e4m3x2 a, l; "
        "cvt.rn.f16x2.e4m3x2 b, h; "
        "shr.b32 a, a, 3; add.u32 a, a, 0x72807280; "
        "shr.b32 b, b, 3; add.u32 b, b, 0x72807280; "
        "prmt.b32 $0, a, 0, 0x1010; prmt.b32 $1, a, 0, 0x3232; "
        "prmt.b32 $2, b, 0, 0x1010; prmt.b32 $3, b, 0, 0x3232; }",
        "=r,=r,=r,=r,r", [word], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _asm_nv_fp16(word):
    """As `_asm_nv_bf16` for fp16 tiles: s_i * 2**7 in both halves."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 l, h; .reg .b32 a, b, c; "
        "mov.b32 {l, h}, $4; "
        "mov.b32 c, 0x58005800; "
        "cvt.rn.f16x2.e4m3x2 a, l; "
        "cvt.rn.f16x2.e4m3x2 b, h; "
        "mul.rn.f16x2 a, a, c; mul.rn.f16x2 b, b, c; "
        "prmt.b32 $0, a, 0, 0x1010; prmt.b32 $1, a, 0, 0x3232; "
        "prmt.b32 $2, b, 0, 0x1010; prmt.b32 $3, b, 0, 0x3232; }",
        "=r,=r,=r,=r,r", [word], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _nv_pair_emulated(word, i: tl.constexpr, FP16: tl.constexpr):
    """Plain-Triton `_asm_nv_*` for byte i of word (the interpreter runs no PTX)."""
    s = ((word >> (8 * i)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if FP16:
        h = (s * 128.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        h = (s * 1.6615349947311448e35).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF  # 2**117
    return h | (h << 16)


@triton.jit
def _nv_pairs(word, FP16: tl.constexpr, ASM: tl.constexpr):
    """The 4 pair multipliers of the 4 E4M3 bytes of an int32."""
    if ASM:
        if FP16:
            return _asm_nv_fp16(word)
        return _asm_nv_bf16(word)
    return (_nv_pair_emulated(word, 0, FP16), _nv_pair_emulated(word, 1, FP16), _nv_pair_emulated(word, 2, FP16),
            _nv_pair_emulated(word, 3, FP16))


@triton.jit
def _mx_pair(word, i: tl.constexpr, FP16: tl.constexpr):
    """E8M0 byte i of word as a 16-bit float pair 2**(e - 127) * 2**(TINY - X), by integer ops (module docstring)."""
    b = (word >> (8 * i)) & 0xFF
    if FP16:
        return (tl.minimum(tl.maximum(b, 102), 133) - 102) * 0x04000400  # (e - 102) << 10 in both halves
    return tl.minimum(b, 145) * 0x00800080 + 0x37003700  # (e + 110) << 7 in both halves


@triton.jit
def step_multipliers(s_rows, step, ok, MASKED: tl.constexpr, MX: tl.constexpr, FP16: tl.constexpr,
                     ASM: tl.constexpr):
    """The 8 pair multipliers (int32 [BLOCK_N] each, one per 16-K tile of the 128-K step) of each row: its step's
    scales are one load per row (s_rows: int64 (NVFP4) or int32 (MXFP4) pointers of the rows' first step); MASKED:
    rows not ok load 0, a multiplier of zero codes."""
    w = load_tile(s_rows + step, ok, not MASKED)
    if MX:
        m0 = _mx_pair(w, 0, FP16)
        m2 = _mx_pair(w, 1, FP16)
        m4 = _mx_pair(w, 2, FP16)
        m6 = _mx_pair(w, 3, FP16)
        m1, m3, m5, m7 = m0, m2, m4, m6
    else:
        m0, m1, m2, m3 = _nv_pairs(w.to(tl.int32), FP16, ASM)
        m4, m5, m6, m7 = _nv_pairs((w >> 32).to(tl.int32), FP16, ASM)
    return m0, m1, m2, m3, m4, m5, m6, m7


@triton.jit
def mul2(p, m, FP16: tl.constexpr, ASM: tl.constexpr):
    """The 16-bit float pairs p * m (int32 registers): one HMUL2, or emulated (interpreter)."""
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


@triton.jit
def tile16(words, j: tl.constexpr, mult, BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, 16] weights (times 2**-X) of k = 16 j .. 16 j + 15 of a 64-K block (words [BLOCK_N, 8]): pair j
    times the row's pair multiplier `mult` [BLOCK_N], in the MMA operand's register order."""
    p = mul2(pair_bits(words, j, dt == tl.float16), mult[:, None], dt == tl.float16, ASM)
    lo = p.to(tl.int16).to(dt, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(dt, bitcast=True)
    return tl.join(lo, hi).reshape(BLOCK_N, 16)


@triton.jit
def tile_fp32(words, mult, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K] `e2m1 * 2**-126 * mult` from planar words [BLOCK_N, BLOCK_K / 8] (BLOCK_K a multiple
    of 64) and fp32 multipliers [BLOCK_N, BLOCK_K / 16], one per 16-K block: each pair decoded as bf16 and widened
    exactly by a shift."""
    CH: tl.constexpr = BLOCK_K // 64
    w = tl.reshape(words, (BLOCK_N, CH, 8))
    even, odd = tl.split(tl.reshape(mult, (BLOCK_N, CH, 2, 2)))  # j = 2 a + b: b = 0, 1
    m0, m2 = tl.split(even)
    m1, m3 = tl.split(odd)
    v0 = _widen(pair_bits(w, 0, False), m0)
    v1 = _widen(pair_bits(w, 1, False), m1)
    v2 = _widen(pair_bits(w, 2, False), m2)
    v3 = _widen(pair_bits(w, 3, False), m3)
    v = tl.join(tl.join(v0, v1), tl.join(v2, v3))  # [BLOCK_N, CH, c, t, b, a]
    return tl.reshape(tl.permute(v, (0, 1, 5, 4, 2, 3)), (BLOCK_N, BLOCK_K))  # k = 64 ch + 16 (2 a + b) + 2 c + t


@triton.jit
def _widen(p, m):
    """[..., 8, 2] fp32 (low half, high half) of the bf16 pairs p [..., 8] times m [...]."""
    lo = (p << 16).to(tl.float32, bitcast=True)
    hi = (p & -65536).to(tl.float32, bitcast=True)  # 0xFFFF0000
    return tl.join(lo, hi) * m[:, :, None, None]
