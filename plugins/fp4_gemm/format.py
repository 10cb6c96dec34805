"""FP4 number formats of the FP4 GEMM plugin: E2M1 values, E4M3 / E8M0 block scales, packing, layouts.

E2M1 (ONNX FLOAT4E2M1, OCP MX FP4): 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes
{0, 0.5, 1, 1.5, 2, 3, 4, 6}; no Inf/NaN. A code is 4 bits `s e1 e0 m`. Encoding rounds to nearest, ties to
the even code (mantissa bit 0), and saturates at ±6 (a cast, as ONNX and TensorRT define it).

Scales:
- NVFP4: one E4M3 (FLOAT8E4M3FN, positive) scale per 16 consecutive elements along K and one FP32 global
  scale per tensor in decode form (`amax / (6 * 448)`): `x = e2m1 * fp32(scale_e4m3) * global`.
- MXFP4: one E8M0 scale (an unsigned biased exponent: `2 ** (bits - 127)`, bits 255 = NaN) per 32 elements
  along K, no global scale. The shared exponent follows the OCP MX spec (v1.0, §6.3):
  `floor(log2(amax)) - emax_elem` with emax_elem = 2 for E2M1; elements are then cast (saturating) to E2M1.

Packing (ONNX, TensorRT): two codes per byte, the first (even flat index) in the low nibble.

Engine layout (what `qcompile::fp4_gemm` takes; torch's FP4 dtype cannot be an AOTInductor constant):
  `w_packed` uint8 [N, K/2] (the weight [N, K] = [out, in], K-major, packed along K exactly as ONNX packs
  a row-major [N, K] FLOAT4E2M1 tensor: the engine bytes are the ONNX raw bytes), `w_scale` [N, K/B]:
  torch.float8_e4m3fn (NVFP4, B = 16) or uint8 E8M0 bits (MXFP4, B = 32), `w_global` float32 scalar
  (NVFP4) or None (MXFP4). K must be a multiple of B.
  The Triton kernel (`kernel.py`) reads this layout as it is, with no conversion at lowering: `w_packed` as
  uint32 words [N, K/8] (little-endian: nibble j of word w is k = 8w + j), the scales as their uint8 bits.

Planar words (the second engine layout, `to_planar_words`; the op takes them for K a multiple of 128): `w_packed`
int32 [N, K/8], the scales as above. In each 64 K of a row (8 words), word c holds the codes of k = 16 j + 2 c (low
half) and k + 1 (high half) for j = 0..3, a code's bits (m, e0, e1, s) at `PLANAR_BITS[j]` of its half. Pair j is
then one 16-K tile's (k, k + 1) register pair of a tensor-core MMA's first operand, decoded in 1-6 integer ops into
a bf16 or fp16 pair (`planar.py`); the 64 K of a row are 32 contiguous bytes. NVFP4 blocks whose scale is 0 hold
zero codes (the same weights: the planar kernels' bf16 multiplier of a zero scale is not 0).

Row pairs (`to_row_pairs`; what CUDA engines store, `LoweringOptions.fp4_layout = "pairs"`): the same planar
words with rows 2p and 2p + 1 interleaved by 128-K step, int32 [N/2, K/128, 2, 16] (N even): [p, s, r] holds row
2p + r's 16 words of step s. A tile reading both rows of a pair per step then reads 128 contiguous bytes, not two
runs of 64 (the op 3-8% faster at 16 rows on an H100; BENCHMARKS.md, fifty-fourth session). Word w of row n is
word `(n // 2) * (K / 4) + (n % 2) * 16 + (w // 16) * 32 + w % 16` of the tensor (`planar.pair_row_offset` +
`planar.pair_word_offset` in the kernels). The 4-D shape tells the layout apart (`is_row_pairs`); `weight_nk` gives
any engine weight's N and K. (4-D, so a kernel's TMA descriptor takes the tensor as it is: a view made inside the
op's M buckets would reach AOTInductor's wrapper as C++, as `int4_gemm.one_dot.tma_words` explains.)

Everything here is plain torch (traceable; float32 math) except the numpy packing helpers.
"""
from __future__ import annotations

import numpy as np
import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_EMAX = 2  # exponent of E2M1's largest normal (6 = 1.5 * 2**2)
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 255
# magnitudes of codes 0..7
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between neighbouring magnitudes; at a tie the even code wins: `>` below an even code, `>=` below an odd one
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# ------------------------------------------------------------------ E2M1 codes (torch)

def _negative(a: torch.Tensor) -> torch.Tensor:
    """Whether each float of `a` has its sign bit set (-0.0 included, NaN not), in comparisons only: the C++ that
    Inductor generates for `torch.signbit` makes GCC 12 crash (an internal compiler error in its vectorizer) on
    AVX-512 machines, and W4A4 engines compile this into their activation quantization."""
    return (a < 0) | ((a == 0) & (torch.reciprocal(a) < 0))


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of `x`: round to nearest even, saturate at ±6 (NaN encodes as +6)."""
    a = x.to(torch.float32)
    mag = a.abs()
    mag = torch.where(torch.isnan(mag), torch.full_like(mag, E2M1_MAX), mag)
    code = torch.zeros(a.shape, dtype=torch.int32, device=a.device)
    for i, mid in enumerate(_MIDPOINTS):
        code = code + ((mag >= mid) if i % 2 else (mag > mid)).to(torch.int32)
    return (code + _negative(a).to(torch.int32) * 8).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 codes (any integer dtype, 0..15): one lookup in the 16 values (codes 8..15 are
    codes 0..7 negated, -0.0 included); an engine then holds one gather per weight instead of a dozen ops."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.to(torch.int64)]


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """`x` cast to E2M1 and back (float32), equal to `e2m1_decode(e2m1_encode(x))` in arithmetic: the magnitude
    (NaN as 6, saturated at 6) divided by the grid's step there (0.5 below 2, 1 below 4, else 2), rounded half to
    even, times the step (exact: the steps are powers of two; an even multiple of the step is the even code),
    then x's sign (-0.0 for negatives that round to 0). About a third of the ops of the comparison chain, which
    matters where Inductor generates the activation quantization of every W4A4 layer."""
    a = x.to(torch.float32)
    mag = torch.clamp(torch.where(torch.isnan(a), E2M1_MAX, a.abs()), max=E2M1_MAX)
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    r = torch.round(mag / step) * step
    return torch.where(_negative(a), -r, r)


# ------------------------------------------------------------------ E4M3 and E8M0 scales (torch)

def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """`x` as torch.float8_e4m3fn: saturate at ±448, round to nearest even."""
    return torch.clamp(x.to(torch.float32), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e8m0_decode(bits: torch.Tensor) -> torch.Tensor:
    """Float32 `2 ** (bits - 127)` of E8M0 bits (uint8); 255 is NaN."""
    b = bits.to(torch.int32)
    v = torch.exp2((b - E8M0_BIAS).to(torch.float32))
    return torch.where(b == E8M0_NAN, torch.full_like(v, float("nan")), v)


def e8m0_from_amax(amax: torch.Tensor, emax_elem: int = E2M1_EMAX) -> torch.Tensor:
    """OCP MX shared scale bits (uint8) for blocks of absolute max `amax`: `floor(log2(amax)) - emax_elem`,
    biased by 127 and clamped to [0, 254]; an all-zero block gets the smallest scale (bits 0)."""
    a = amax.to(torch.float32)
    exp = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))) - emax_elem
    exp = torch.where(a > 0, exp, torch.full_like(exp, -E8M0_BIAS))
    return torch.clamp(exp + E8M0_BIAS, 0, 254).to(torch.uint8)


def decode_scales(w_scale: torch.Tensor) -> torch.Tensor:
    """Float32 block scales of an engine `w_scale` (float8_e4m3fn: NVFP4, uint8: MXFP4 E8M0)."""
    if w_scale.dtype == torch.uint8:
        return e8m0_decode(w_scale)
    return w_scale.to(torch.float32)


# ------------------------------------------------------------------ block quantization (torch)

def blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """`x [..., K]` viewed as `[..., K/block, block]` (K a multiple of block)."""
    if x.shape[-1] % block:
        raise ValueError(f"the last dim ({x.shape[-1]}) must be a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _divided_by_scale(xb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`xb [..., nb, B] / s [..., nb, 1]` in float32; 0 where the scale is 0."""
    return torch.where(s > 0, xb / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xb))


def quantize_blocks(x: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """E2M1 codes of `x [..., K] / scale [..., K/block]` (float32 division; a zero scale gives code 0)."""
    y = _divided_by_scale(blocks(x.to(torch.float32), block), scale.to(torch.float32).unsqueeze(-1))
    return e2m1_encode(y).reshape(x.shape)


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Float32 `e2m1(codes) [..., K] * scale [..., K/block]` (broadcast along each block)."""
    v = blocks(e2m1_decode(codes), block)
    return (v * scale.to(torch.float32).unsqueeze(-1)).reshape(codes.shape)


def _nvfp4_block_scales(xb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """E4M3 scales `e4m3(amax(block) / 6 / g)` of the blocks `xb [..., nb, B]`."""
    return e4m3_encode(xb.abs().amax(dim=-1) / E2M1_MAX / g)


def nvfp4_dynamic_quantize(x: torch.Tensor, global_scale: torch.Tensor, block: int = NVFP4_BLOCK):
    """NVFP4 dynamic quantization of activations (TensorRT's TRT_FP4DynamicQuantize, Blackwell's recipe).

    Per block of `block` elements along the last axis: `sx = e4m3(amax(block) / 6 / global)`,
    `codes = e2m1(x / (fp32(sx) * global))`. `global_scale` is the decode-form FP32 scalar (`amax / (6*448)`).
    Returns (codes uint8 [..., K], sx float8_e4m3fn [..., K/block])."""
    g = global_scale.to(torch.float32)
    sx = _nvfp4_block_scales(blocks(x.to(torch.float32), block), g)
    return quantize_blocks(x, sx.to(torch.float32) * g, block), sx


def nvfp4_fake_quantize(x: torch.Tensor, global_scale: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """`x` through NVFP4 dynamic quantization and back (float32): what a Blackwell FP4 GEMM multiplies. The same
    values as `dequantize_blocks` of `nvfp4_dynamic_quantize`'s codes (scales times the global), by `e2m1_round`
    without the codes."""
    g = global_scale.to(torch.float32)
    xb = blocks(x.to(torch.float32), block)
    s = (_nvfp4_block_scales(xb, g).to(torch.float32) * g).unsqueeze(-1)
    return (e2m1_round(_divided_by_scale(xb, s)) * s).reshape(x.shape)


# ------------------------------------------------------------------ packing

def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] (K even) -> uint8 [..., K/2], element 2j in the low nibble of byte j."""
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        raise ValueError(f"fp4 packing needs an even last dim, got {tuple(c.shape)}")
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., K/2] -> codes uint8 [..., K]."""
    p = packed.to(torch.uint8)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ------------------------------------------------------------------ planar words

# where the bits (m, e0, e1, s) of pair j's code sit in each 16-bit half of a planar word: pair 0 is a bf16
# `e2m1 * 2**-126` after one AND, pairs 1 and 2 after a shift and an AND, pair 3 after three shifts and three LOP3
# (11 ops per word against 15 for nibbles in place; no placement puts all four pairs one shift away, checked
# exhaustively), and fp16 `e2m1 * 2**-14` pairs take 17 (16 in place)
PLANAR_BITS = ((6, 7, 8, 15), (3, 4, 5, 12), (0, 1, 2, 9), (10, 11, 13, 14))
PLANAR_K = 64  # K per 8 planar words of a row
PLANAR_K_MULTIPLE = 128  # K of weights the op takes as planar words (a row's scales of 128 K are one load)


def is_planar(w_packed: torch.Tensor) -> bool:
    """Whether an engine weight holds planar words (int32 [N, K/8]) rather than the ONNX bytes (uint8 [N, K/2])."""
    return w_packed.dtype == torch.int32


def _planar_view(n: int, k: int) -> tuple[int, ...]:
    """[N, K] codes as [N, K/64, j = 4, c = 8, t = 2] (k = 64 b + 16 j + 2 c + t)."""
    if k % PLANAR_K:
        raise ValueError(f"planar FP4 words need K a multiple of {PLANAR_K}, got K={k}")
    return n, k // PLANAR_K, 4, 8, 2


def to_planar_words(w_packed: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Engine bytes (uint8 [N, K/2]) -> planar words (int32 [N, K/8], see the module docstring); codes of NVFP4
    blocks whose scale is 0 become 0."""
    codes = unpack_codes(w_packed).to(torch.int64)
    n, k = codes.shape
    if w_scale.dtype == torch.float8_e4m3fn:
        zero = w_scale.view(torch.uint8) == 0
        codes = torch.where(zero.repeat_interleave(k // w_scale.shape[1], dim=1), 0, codes)
    c = codes.reshape(_planar_view(n, k))
    words = torch.zeros((n, k // PLANAR_K, 8), dtype=torch.int64, device=codes.device)
    for j, positions in enumerate(PLANAR_BITS):
        for t in range(2):
            for bit, pos in enumerate(positions):
                words |= ((c[:, :, j, :, t] >> bit) & 1) << (pos + 16 * t)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).reshape(n, k // 8)


def from_planar_words(words: torch.Tensor) -> torch.Tensor:
    """Planar words (int32 [N, K/8]) -> engine bytes (uint8 [N, K/2]): the inverse of `to_planar_words`."""
    n, k = words.shape[0], words.shape[1] * 8
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(_planar_view(n, k)[:2] + (8,))

    def code(j: int, t: int) -> torch.Tensor:  # [N, K/64, 8]: the codes of k = 16 j + 2 c + t
        return sum(((w >> (pos + 16 * t)) & 1) << bit for bit, pos in enumerate(PLANAR_BITS[j]))

    codes = torch.stack([torch.stack([code(j, 0), code(j, 1)], dim=-1) for j in range(4)], dim=2)  # [N, K/64, 4, 8, 2]
    return pack_codes(codes.reshape(n, k).to(torch.uint8))


def is_row_pairs(w_packed: torch.Tensor) -> bool:
    """Whether an engine weight holds planar words in row pairs (int32 [N/2, K/128, 2, 16], `to_row_pairs`)."""
    return w_packed.dtype == torch.int32 and w_packed.dim() == 4


def weight_nk(w_packed: torch.Tensor) -> tuple[int, int]:
    """(N, K) of an engine weight: bytes [N, K/2], planar words [N, K/8] or row pairs [N/2, K/128, 2, 16]."""
    if is_row_pairs(w_packed):
        return 2 * w_packed.shape[0], PLANAR_K_MULTIPLE * w_packed.shape[1]
    return w_packed.shape[0], w_packed.shape[1] * (8 if is_planar(w_packed) else 2)


def to_row_pairs(words: torch.Tensor) -> torch.Tensor:
    """Planar words (int32 [N, K/8], N even, K a multiple of 128) -> row pairs (int32 [N/2, K/128, 2, 16])."""
    n, kw = words.shape
    if n % 2 or kw % 16:
        raise ValueError(f"FP4 row pairs need an even N and K a multiple of {PLANAR_K_MULTIPLE}, got N={n}, K={kw * 8}")
    return words.reshape(n // 2, 2, kw // 16, 16).transpose(1, 2).contiguous()


def from_row_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """Row pairs (int32 [N/2, K/128, 2, 16]) -> planar words (int32 [N, K/8]): the inverse of `to_row_pairs`."""
    half, steps = pairs.shape[0], pairs.shape[1]
    return pairs.transpose(1, 2).reshape(2 * half, steps * 16).contiguous()


def engine_bytes(w_packed: torch.Tensor) -> torch.Tensor:
    """The ONNX bytes (uint8 [N, K/2]) of an engine weight in any layout."""
    if is_row_pairs(w_packed):
        w_packed = from_row_pairs(w_packed)
    return from_planar_words(w_packed) if is_planar(w_packed) else w_packed


def codes_to_float4(codes: np.ndarray) -> np.ndarray:
    """Codes (uint8 numpy) -> an `ml_dtypes.float4_e2m1fn` array of the same shape (for ONNX initializers)."""
    import ml_dtypes

    return np.asarray(codes, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn)


def float4_to_codes(values: np.ndarray) -> np.ndarray:
    """An `ml_dtypes.float4_e2m1fn` (or float values on the E2M1 grid) array -> codes uint8."""
    import ml_dtypes

    arr = np.asarray(values)
    if arr.dtype != ml_dtypes.float4_e2m1fn:
        arr = arr.astype(np.float32).astype(ml_dtypes.float4_e2m1fn)
    return arr.view(np.uint8) & 0xF
