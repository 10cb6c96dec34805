"""Packed-half2 dot products of INT4 words with 16-bit activations (Triton device functions, CUDA only).

`dot8(words, p04, p15, p26, p37)` is, per int32 word of 8 signed nibbles q_0..q_7 (nibble j = bits 4j..4j+3),
`sum_j q_j * x_j` in fp32, computed on the fp16x2 units: 16 instructions per 8 weights. With the loads, the x
pairs and the scales the GEMV's loop is 3.7 SASS instructions per weight, against 5.1 when every nibble is decoded
into an fp32 and multiplied there (`_int4_gemv_kernel`'s fp32 path; `tools/diag/sass_count.py`).

- Decoding: one LOP3 `(w & 0x000F000F) ^ 0x64086408` makes two fp16 `1024 + (q + 8)` at once (the nibble,
  its sign bit flipped, in the mantissa of 1024.0), for nibbles 0 and 4; `(w & 0x00F000F0) ^ 0x64806480`
  gives `1024 + 16 (q + 8)` for nibbles 1 and 5; `w >> 8` then does the same for 2, 6 and 3, 7. One HSUB2 each
  removes the 1032 (or 1152) exactly: fp16 pairs (q_j, q_j+4) or (16 q_j, 16 q_j+4).
- Multiplying: four HFMA2 against the activation pairs `p04 = (x_0, x_4)`, `p15 = (x_1 / 16, x_5 / 16)`,
  `p26`, `p37` (fp16 pairs held in int32, built by `x_pair`), then the two fp16 halves go to fp32 and add.
- Range: fp16 products and 4-term sums must stay finite, so the caller scales x by a power of two (`pow2_range`)
  that puts the largest |x| of the step in [256, 512): every partial sum stays below 2^14, and the exact
  `down` factor comes back in fp32. Each product is rounded to fp16 (relative error 2^-11, about 4e-4 on a
  4096-long dot measured on the H200: benchmarks/int4_stream_probe*.json), so this path is for 16-bit x.

`x_of_words` loads the 8 activations of each word (and their largest |x|) for the packed-half2 GEMVs: this one's
and the FP4 GEMV (`fp4_gemm/gemv.py`). Where x is fp16 and the words planar, the pairs are x's own adjacent fp16
values, scaled on the fp16x2 units (`scaled_pair`, or `scaled_word` on a pair loaded as one int32) by one power
of two per program: the INT4 GEMV's "x_pairs".

`dot8_emulated` is the same arithmetic in plain Triton fp32 ops, for the CPU interpreter (TRITON_INTERPRET=1),
which cannot run inline PTX: tests check the nibble order, the pairs and the scaling there; the GPU tests check
the PTX.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def ptx_available() -> bool:
    """False under Triton's CPU interpreter (TRITON_INTERPRET=1), which cannot run inline PTX."""
    return os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def dot8(words, p04, p15, p26, p37):
    """fp32 `sum_j q_j x_j` per int32 word (inline PTX on fp16x2; the p are `x_pair`s broadcast to words' shape)."""
    # a literal, not a global: AOTInductor copies the kernel's source into its generated code
    out = tl.inline_asm_elementwise(
        "{ "
        ".reg .b32 w2, a0, a1, a2, a3, c0, c1, t; "
        ".reg .b16 lo, hi; "
        ".reg .f32 flo, fhi, s; "
        "mov.b32 c0, 0x64086408; "
        "mov.b32 c1, 0x64806480; "
        "shr.u32 w2, $1, 8; "
        "lop3.b32 a0, $1, 0x000F000F, c0, 0x6a; "
        "lop3.b32 a1, $1, 0x00F000F0, c1, 0x6a; "
        "lop3.b32 a2, w2, 0x000F000F, c0, 0x6a; "
        "lop3.b32 a3, w2, 0x00F000F0, c1, 0x6a; "
        "sub.f16x2 a0, a0, c0; "
        "sub.f16x2 a1, a1, c1; "
        "sub.f16x2 a2, a2, c0; "
        "sub.f16x2 a3, a3, c1; "
        "mul.rn.f16x2 t, a0, $2; "
        "fma.rn.f16x2 t, a1, $3, t; "
        "fma.rn.f16x2 t, a2, $4, t; "
        "fma.rn.f16x2 t, a3, $5, t; "
        "mov.b32 {lo, hi}, t; "
        "cvt.f32.f16 flo, lo; "
        "cvt.f32.f16 fhi, hi; "
        "add.f32 s, flo, fhi; "
        "mov.b32 $0, s; "
        "} ",  # LOP3 0x6a: (a & b) ^ c
        "=r,r,r,r,r,r", [words, p04, p15, p26, p37], dtype=tl.int32, is_pure=True, pack=1)
    return out.to(tl.float32, bitcast=True)


@triton.jit
def _nibble(words, j: tl.constexpr):
    """Signed nibble j of each word as fp32."""
    return ((((words >> (4 * j)) & 0xF) ^ 8) - 8).to(tl.float32)


@triton.jit
def half_of(pair, high: tl.constexpr):
    """fp32 of the low (or high) fp16 of an int32 pair."""
    bits = (pair >> 16) if high else pair
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def dot8_emulated(words, p04, p15, p26, p37):
    """`dot8` in plain Triton (fp32 products of the same fp16 pairs), for the CPU interpreter."""
    out = _nibble(words, 0) * half_of(p04, False) + _nibble(words, 4) * half_of(p04, True)
    out += 16.0 * (_nibble(words, 1) * half_of(p15, False) + _nibble(words, 5) * half_of(p15, True))
    out += _nibble(words, 2) * half_of(p26, False) + _nibble(words, 6) * half_of(p26, True)
    out += 16.0 * (_nibble(words, 3) * half_of(p37, False) + _nibble(words, 7) * half_of(p37, True))
    return out


@triton.jit
def word_k(kw, j: tl.constexpr, PLANAR: tl.constexpr):
    """The K index of nibble j of word row kw: 8 kw + j, or in the planar order of `int4_gemm/format.py`
    (`planar_order`) 64 (kw // 8) + 16 (j % 4) + 2 (kw % 8) + j // 4."""
    if PLANAR:
        return (kw // 8) * 64 + 2 * (kw % 8) + (16 * (j % 4) + j // 4)
    return kw * 8 + j


@triton.jit
def x_at(x_ptr, kw, j: tl.constexpr, ok, PLANAR: tl.constexpr = False):
    """fp32 x at the K of nibble j of the word rows kw (`word_k`; 0 where not ok). The nibble's part of the K
    (`word_k(0, j)`, a constant) is added to the pointer last: the loads of a word's 8 nibbles then share one
    address (immediate offsets in SASS; the planar map otherwise cost 12% more instructions per GEMV step)."""
    return tl.load(x_ptr + word_k(kw, 0, PLANAR) + word_k(0, j, PLANAR), mask=ok, other=0.0).to(tl.float32)


@triton.jit
def x_of_words(x_ptr, kw, ok, PLANAR: tl.constexpr = False):
    """(x_0 .. x_7, their largest |x|): fp32 x at the K of each nibble of the word rows kw of a packed weight
    (`word_k`; 0 where not ok)."""
    x0, x1 = x_at(x_ptr, kw, 0, ok, PLANAR), x_at(x_ptr, kw, 1, ok, PLANAR)
    x2, x3 = x_at(x_ptr, kw, 2, ok, PLANAR), x_at(x_ptr, kw, 3, ok, PLANAR)
    x4, x5 = x_at(x_ptr, kw, 4, ok, PLANAR), x_at(x_ptr, kw, 5, ok, PLANAR)
    x6, x7 = x_at(x_ptr, kw, 6, ok, PLANAR), x_at(x_ptr, kw, 7, ok, PLANAR)
    big = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                     tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
    return x0, x1, x2, x3, x4, x5, x6, x7, big


@triton.jit
def pow2_range(amax):
    """(up, down) powers of two, down = 1 / up, with amax * up in [256, 512) (amax: fp32 scalar >= 0; tiny or
    zero amax is clamped so both stay normal fp32)."""
    e = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 9)
    up = ((262 - e) << 23).to(tl.float32, bitcast=True)
    down = ((e - 8) << 23).to(tl.float32, bitcast=True)
    return up, down


@triton.jit
def scaled_pair(a, b, scale):
    """int32 holding the fp16 pair (a * s, b * s) of fp16 a and b (low half a), `scale` an fp16x2 pair (s, s) of a
    power of two (`x_pair(up, up, f)`): one PRMT and one HMUL2, exact unless a product leaves fp16's range."""
    return tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, {$1, $2}; mul.rn.f16x2 $0, t, $3; }", "=r,h,h,r",
                                     [a, b, scale], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def scaled_word(pair, scale):
    """`scaled_pair` of a pair already held in an int32 (an fp16 pair loaded as one word): one HMUL2."""
    return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [pair, scale], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def x_pair(a, b, factor):
    """int32 holding the fp16 pair (a * factor, b * factor) (low half a); a, b fp32, factor a power of two."""
    lo = (a * factor).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = (b * factor).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)
