"""Triton kernels of `qcompile::fp4_gemm` (CUDA only; imported lazily: CPU machines have no Triton).

They read the engine layout of `format.py` as it is (no conversion at lowering): `w_packed` uint8 [N, K/2]
is read as uint32 words [N, K/8] (nibble j of word w is k = 8w + j, little-endian), the block scales as their
bits (E4M3 or E8M0), the NVFP4 global scale from its float32 tensor.

Paths, chosen from M (the row count of x, dynamic) by `gemm_dispatch.run_by_buckets` (a Python branch for a
concrete M, a `torch.cond` chain for a symbolic one):

- M = 1, fp16/bf16 x: `gemv.launch_gemv` (below).
- M <= SMALL_M_MAX (16): `_fp4_gemm_kernel` split-K (BLOCK_M = 16): each program streams one K slice of
  BLOCK_N weight rows once (`evict_first`); partial sums are added with fp32 atomics (a plain store in
  x.dtype when there is one split).
- 16 < M <= MID_M_MAX (64): the same kernel as a tiled GEMM (BLOCK_M = 64, BLOCK_N = 128), K split until
  there are about two waves of programs (tools/tune_fp4_gemm.py, benchmarks/tune_fp4_gemm.json: 1.18-1.31x faster
  at M = 64 than one wave).
- MID_M_MAX < M < LARGE_M_MIN (65-128): 128-row tiles (`WIDE`), so one M tile reads the weight once where two
  64-row tiles read it twice: 15-23% faster than the 64-row tiles at M = 100 and 128 on the four Llama-sized
  layers, and the best tile of the sweep on each within 16% (benchmarks/tune_fp4_gemm_m100_128_s20.json).
- M >= LARGE_M_MIN: `_fp4_dequant_kernel` writes W [N, K] in x.dtype, then cuBLAS with the bias in its epilogue
  (`gemm_dispatch.linear_bias`). From 129 rows, as INT4: at M = 256 the best tile was 1.3-1.5x slower. With the
  opt-in `fp8_large_m` the same kernel writes W * (1 / S[n]) in FP8 instead (`fp8_weight`) for cuBLASLt's FP8 GEMM
  (`plugins/fp8_large_m.py`).

The GEMM kernel swaps operands: acc^T [BLOCK_N, BLOCK_M] = W_tile [BLOCK_N, BLOCK_K] @ x^T, so the weight
tile decoded in registers is the MMA's first operand and a small M is the MMA's narrow side. Decoding:

- E2M1 -> float by bit placement (`_e2m1_tile`): the sign to the float's sign bit and the 3 magnitude bits
  `e1 e0 m` to the lowest exponent bits and the top mantissa bit. The float is then `value * 2**-TINY`
  exactly, subnormal code 1 (0.5) included (TINY = 126 for bf16 and fp32, 14 for fp16). For 16-bit
  types two codes (nibbles j and j + 4) are placed with one mask per 32-bit word.
- The block scale and 2**TINY are folded into one multiplier per (row, block), `scale * 2**(TINY - X)`
  (`_scale_multiplier`, from the scale bits, in fp32, cast to the MMA type), so a weight costs one multiply.
  The remaining 2**X and the NVFP4 global scale multiply the fp32 accumulator once. X keeps the
  multiplier in range: the weight tile `e2m1 * scale * 2**-X` is then exact in the MMA type (`ACC_SHIFT`).
- The NVFP4 global scale is applied to the fp32 accumulator, so NVFP4 weight tiles are exact in bf16 and
  fp16 for every E4M3 scale; MXFP4 tiles are exact for block scales in [2**-117, 2**17] (bf16, fp32) and
  [2**-19, 2**5] (fp16; outside, the fp16 tile rounds, as ONNX's CastLike of the scale to fp16 would).

M = 1 with fp16/bf16 x runs `gemv.py` instead: a GEMV on packed fp16x2 without tensor cores (x's pairs
prepared by a small first kernel, the epilogue in the GEMV). Its first version was 1.3-1.6x faster than the split-K
tile kernel on the H200 decode shapes, and the current one is 1.0-1.6x faster than that (see its docstring).
An earlier GEMV in fp32 (one FMA per weight) was 20-30% slower than the tile kernel and was removed
(benchmarks/fp4_int4_gemm.json, fp4_gemv_m1.json).

Planar words (`format.to_planar_words`, int32 [N, K/8]; what CUDA engines store when K is a multiple of 128,
`lowering/ops/fp4_plugin.py`): 16-bit x takes `gemv_planar.py` at M = 1 and `one_dot.py` at 2-128 rows
(`ONE_DOT`), fp32 x the tile kernel with `PLANAR` (the words decoded into fp32 tiles by `planar.tile_fp32`), and
from LARGE_M_MIN rows the dequantize kernel with `PLANAR`, then cuBLAS. On the H200 the planar paths were faster
than the byte ones at every M from 1 to 128 on the kernel-target layers but one (4096 x 4096 at M = 1, 9.3 against
8.7 µs) and equal at 1024 rows (BENCHMARKS.md, twenty-sixth session); the byte paths stay for CPU engines, K not a
multiple of 128, and fp32 x. The one-dot buckets up to 64 rows set "finish" (`finished`): they write `y + bias` in
x.dtype from the kernel when K is split, instead of fp32 partial sums that a cast kernel converts afterwards
(`triton_tiles.finish_split_tile`). Row pairs (`format.to_row_pairs`, CUDA engines' layout "pairs") take the same paths,
each kernel told by its PAIRED flag where a row's words sit.

`launch_*` and `fp4_gemm_triton` take `wrap` (identity for raw Triton: tests run them under
TRITON_INTERPRET=1 on CPU tensors; `torch.library.wrap_triton` from the op, so AOTInductor compiles the
kernels into the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins import fp8_large_m as fp8_large_m_path
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.fp4_gemm import one_dot
from qcompile.plugins.fp4_gemm.planar import pair_row_offset, pair_word_offset, tile_fp32
from qcompile.plugins.fp4_gemm.reference import check_args, fp8_column_bound
from qcompile.plugins.gemm_dispatch import (DEFAULT_SMS, SMALL_M_MAX, cdiv, from_rows, identity, linear_bias,
                                             optional_arg, run_by_buckets, split_k_config, unpack_optional,
                                             whole_tiles)
from qcompile.plugins.int4_gemm.half2 import ptx_available
from qcompile.plugins.triton_tiles import jit_any_m, load_tile, load_xt_rows, store_tile, xt_columns

LARGE_M_MIN = 129  # rows from which the dequantize + cuBLAS path runs (as INT4's: 128 rows and fewer take the tiles)
BLOCK_K = 128
# launch configurations (tile sizes, warps, pipeline stages; the split-K target in SMs per N tile)
SMALL = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3, sms_per_tile=1)
MID = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, sms_per_tile=2)
MID_M_MAX = 64  # rows up to which MID runs; WIDE from there to LARGE_M_MIN - 1
WIDE = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, sms_per_tile=2)
# the one-dot tiles of planar words (16-bit x; `one_dot.py`), per M bucket. 17-64 and 65-128 rows: the best of 19 / 16
# tiles on the kernel-target layers with K = 4096 and on 3 of 4 at 128 rows (benchmarks/tune_fp4_planar_s26.json).
# At 17-64 rows on K >= 8192 the 128-wide TMA tile (`MID_TMA`) was 13-14% faster; an AOTInductor package with
# it matched float64 on the H200 (tools/diag/fp4_tma_aoti_check.py, twenty-seventh session). 16 rows: the probe's
# 128-wide tile (fewest instructions per weight; 1.11-1.57x the byte tile kernel on the H200). "finish"
# (`finished`) up to 64 rows, as INT4's: the llama3-8b-layers w4a16_nvfp4 engine ran 16 rows in 0.2861 / 0.2739
# against 0.2895 / 0.2751 ms with it, 64 rows in 0.3880 against 0.3883, 128 rows in 0.4427 against 0.4367 (H100,
# CUDA graph, BENCHMARKS.md thirty-seventh session). 16 rows copy each weight row's 64 bytes of a step at once
# ("row_words" 16, `one_dot.row_words_for`), not 32 per 64-K block: 14.7 -> 12.6 µs on 4096 x 4096 and 86.4 -> 81.8
# on 8192 x 28672 (H100, NVFP4, bf16; benchmarks/row_words_table-h100_s51.txt), 28.0 -> 26.0 on 4096 x 14336 and
# 26.9 -> 25.3 on 14336 x 4096, where 32 was slower at either width (row_words_table-h100_s52.txt). 64 rows through
# pointers keep 8: 16 was no faster, and 32 (256-K steps) took 1.07-1.72x as long as the shipped tile on both layers.
# 16 rows load through TMA ([128, 16]-word boxes, `SMALL_TMA`) on layers at least 16384 wide and 8192 deep: on
# 8192 x 28672 67.6 against 82.1 µs, the best of 42 tiles reading 16 words; on the other three layers the best TMA
# tile was 2-11% slower than the shipped pointer tile (H100, NVFP4, bf16; benchmarks/tune_fp4_words16-h100_s53.*).
# The 17-64-row TMA tile reads 16 words too: 32.7 against 34.6 µs at 64 rows on 14336 x 4096, 90.6 against 96.7 on
# 8192 x 28672 (H100; benchmarks/tune_fp4_words16-m64-m1-h100_s53.*; through pointers, on the K = 4096 layers, 16
# words were within 1.5% of 8 either way). On row pairs ("on_pairs": False) 16 rows stay on pointers: the same tile
# took 64.4 µs through pointers against 69.6 through [64, 1, 2, 16] boxes on 8192 x 28672, and was the best of 42
# pointer tiles on all four layers (H100, NVFP4, bf16; benchmarks/tune_fp4_pairs-h100_s54.*).
SMALL_TMA = dict(min_n=16384, min_k=8192, on_pairs=False)
MID_TMA = dict(min_n=0, min_k=8192, BLOCK_N=128, row_words=16)
ONE_DOT = [(16, dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, waves=4, finish=True, row_words=16,
                     tma=SMALL_TMA)),
           (MID_M_MAX, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, waves=2, tma=MID_TMA, finish=True)),
           (LARGE_M_MIN - 1, dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, waves=1, finish=False))]


def finished(configs: list = ONE_DOT, finish: bool = True) -> list:
    """The one-dot buckets `configs` writing y + bias in x's dtype from the kernel ("finish": split tiles counted,
    the last one writes; no cast kernel after them), or with finish=False not (fp32 partial sums, then a cast
    kernel; `tools/bench_engines.py` variant fp4-unfinished)."""
    return [(limit, dict(cfg, finish=finish)) for limit, cfg in configs]


# tile of `_fp4_dequant_kernel`: best of 6 (benchmarks/dequant.json)
DEQUANT = dict(BLOCK_N=16, BLOCK_K=512, num_warps=4)
TINY = {torch.float32: 126, torch.bfloat16: 126, torch.float16: 14}  # decoded bits = value * 2**-TINY
ACC_SHIFT = {(False, torch.float16): 9, (True, torch.float16): 4}  # X per (MXFP4?, dtype); else below
ACC_SHIFT_DEFAULT = {False: 9, True: 16}  # NVFP4: E4M3 <= 448 < 2**9; MXFP4: scales up to 2**17


def acc_shift(mx: bool, dtype) -> int:
    """X: the tile holds `weight * 2**-X`, the accumulator is multiplied by 2**X (see the module docstring)."""
    return ACC_SHIFT.get((mx, dtype), ACC_SHIFT_DEFAULT[mx])


@triton.jit
def _scale_multiplier(bits, MX: tl.constexpr, SHIFT: tl.constexpr, POW_SHIFT: tl.constexpr):
    """fp32 `scale * 2**SHIFT` from the scale bits (uint8): E8M0 `2**(b - 127)` (255 = NaN), or positive
    E4M3 (its bits placed as fp32 are `scale * 2**-120`). POW_SHIFT = 2.0 ** SHIFT."""
    b = bits.to(tl.int32)
    if MX:
        m = (tl.minimum(b + SHIFT, 255) << 23).to(tl.float32, bitcast=True)  # exponent field b + SHIFT
        m = tl.where(b == 255, float("nan"), m)
    else:
        m = (b << 20).to(tl.float32, bitcast=True) * 1.329227995784916e36 * POW_SHIFT  # 2**120
    return m


@triton.jit
def _pair16(words, j: tl.constexpr, EM_SHIFT: tl.constexpr, DT: tl.constexpr):
    """Nibbles j and j + 4 of uint32 words as 16-bit floats `e2m1 * 2**-TINY` (bf16: EM_SHIFT 6, fp16: 9)."""
    t = words >> (4 * j)
    p = ((t << 12) & 0x80008000) | ((t << EM_SHIFT) & (0x70007 << EM_SHIFT))
    return p.to(tl.uint16).to(DT, bitcast=True), (p >> 16).to(tl.uint16).to(DT, bitcast=True)


@triton.jit
def _e2m1_bits32(words, j: tl.constexpr):
    """Nibble j of uint32 words as fp32 `e2m1 * 2**-126`: its sign and its `e1 e0 m` bits each moved into
    place with one shift and one mask (the OR folds into the second mask: 4 integer ops per weight)."""
    if j < 6:
        mag = (words << (22 - 4 * j)) & 0x01C00000
    else:
        mag = (words >> (4 * j - 22)) & 0x01C00000
    if j < 7:
        sign = (words << (28 - 4 * j)) & 0x80000000
    else:
        sign = words & 0x80000000
    return (mag | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_tile(words, mult):
    """uint32 words [..., W] -> [..., 8W] in mult's dtype: element 8w + j = e2m1(nibble j) * 2**-TINY * mult
    (mult [..., 1])."""
    DT: tl.constexpr = mult.dtype
    if DT == tl.float32:
        n0, n1, n2, n3 = (_e2m1_bits32(words, 0), _e2m1_bits32(words, 1), _e2m1_bits32(words, 2),
                          _e2m1_bits32(words, 3))
        n4, n5, n6, n7 = (_e2m1_bits32(words, 4), _e2m1_bits32(words, 5), _e2m1_bits32(words, 6),
                          _e2m1_bits32(words, 7))
    else:
        EM_SHIFT: tl.constexpr = 6 if DT == tl.bfloat16 else 9
        n0, n4 = _pair16(words, 0, EM_SHIFT, DT)
        n1, n5 = _pair16(words, 1, EM_SHIFT, DT)
        n2, n6 = _pair16(words, 2, EM_SHIFT, DT)
        n3, n7 = _pair16(words, 3, EM_SHIFT, DT)
    tile = tl.interleave(tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6)),
                         tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7)))
    return tile * mult


@triton.jit
def _tile_pointers(w_ptr, s_ptr, offs_n, K, B: tl.constexpr, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr = False):
    """(word pointers [BLOCK_N, BLOCK_K / 8], scale-bit pointers [BLOCK_N, BLOCK_K / B]) of weight rows offs_n at
    K 0 .. BLOCK_K - 1: formed once, a tile at k0 adds k0 / 8 (PAIRED, row pairs: k0 / 128 * 32) and k0 / B
    (`_weight_tile`)."""
    rows = offs_n.to(tl.int64)[:, None]
    if PAIRED:
        w_rows = w_ptr.to(tl.pointer_type(tl.uint32)) + pair_row_offset(rows, K) + \
            pair_word_offset(tl.arange(0, BLOCK_K // 8))[None, :]
    else:
        w_rows = w_ptr.to(tl.pointer_type(tl.uint32)) + rows * (K // 8) + tl.arange(0, BLOCK_K // 8)[None, :]
    s_rows = s_ptr.to(tl.pointer_type(tl.uint8)) + rows * (K // B) + tl.arange(0, BLOCK_K // B)[None, :]
    return w_rows, s_rows


@triton.jit
def _weight_tile(w_rows, s_rows, offs_n, k0, N, K, DT: tl.constexpr, MX: tl.constexpr, B: tl.constexpr,
                 SHIFT: tl.constexpr, POW_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN: tl.constexpr = False, PLANAR: tl.constexpr = False, PAIRED: tl.constexpr = False):
    """Weight rows offs_n, columns k0 .. k0 + BLOCK_K as DT [BLOCK_N, BLOCK_K], times 2**-X (zeros past N, K;
    EVEN: the tile lies inside the weight, no masks). w_rows, s_rows: `_tile_pointers`. PLANAR: the words are
    planar (`format.to_planar_words`; fp32 tiles only, BLOCK_K a multiple of 64), decoded by `planar.tile_fp32`;
    PAIRED: planar words in row pairs (`format.to_row_pairs`; BLOCK_K a multiple of 128)."""
    KB: tl.constexpr = BLOCK_K // B  # scale blocks per tile row
    mask_n = (offs_n < N)[:, None]
    at = k0 // 128 * 32 if PAIRED else k0 // 8  # the tile's first word from the rows' first
    words = load_tile(w_rows + at, mask_n & (k0 // 8 + tl.arange(0, BLOCK_K // 8) < K // 8)[None, :], EVEN, True)
    bits = load_tile(s_rows + k0 // B, mask_n & (k0 // B + tl.arange(0, KB) < K // B)[None, :], EVEN, True)
    if PLANAR:
        tl.static_assert(DT == tl.float32, "planar FP4 words decode into fp32 tiles here")
        mult = _scale_multiplier(bits, MX, SHIFT, POW_SHIFT)
        if B == 32:  # one multiplier per 16-K block
            mult = tl.reshape(tl.join(mult, mult), (BLOCK_N, 2 * KB))
        return tile_fp32(words.to(tl.int32, bitcast=True), mult, BLOCK_N, BLOCK_K)
    mult = _scale_multiplier(bits, MX, SHIFT, POW_SHIFT).to(DT)
    tile = _e2m1_tile(tl.reshape(words, (BLOCK_N, KB, B // 8)), tl.reshape(mult, (BLOCK_N, KB, 1)))
    return tl.reshape(tile, (BLOCK_N, BLOCK_K))


@jit_any_m
def _fp4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm,
    K_STEPS: tl.constexpr, MX: tl.constexpr, B: tl.constexpr, SHIFT: tl.constexpr, POW_SHIFT: tl.constexpr,
    POW_ACC: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr = False,
    PLANAR: tl.constexpr = False, PAIRED: tl.constexpr = False,
):
    """y[M, N] (+)= x @ W.T over K slice program_id(1); swapped operands: acc is [BLOCK_N, BLOCK_M]. The
    pointers are formed once and a step adds scalars (recomputing them per step was about a quarter of the
    loop's SASS); EVEN (whole N tiles, every split inside K): the weight loads carry no masks."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    DT: tl.constexpr = x_ptr.dtype.element_ty
    x_cols = xt_columns(x_ptr, offs_m, M, stride_xm, BLOCK_K)
    w_rows, s_rows = _tile_pointers(w_ptr, s_ptr, offs_n, K, B, BLOCK_K, PAIRED)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K_STEPS):  # steps past K (last split) load nothing
        k0 = (pid_k * K_STEPS + step) * BLOCK_K
        w = _weight_tile(w_rows, s_rows, offs_n, k0, N, K, DT, MX, B, SHIFT, POW_SHIFT, BLOCK_N, BLOCK_K, EVEN, PLANAR,
                         PAIRED)
        xt = load_xt_rows(x_cols, k0, K, EVEN, BLOCK_K)
        if DT == tl.float32:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    acc = acc * POW_ACC
    if HAS_GLOBAL:
        acc = acc * tl.load(g_ptr)
    if HAS_BIAS:  # added once: by the first K split
        acc += tl.load(b_ptr + offs_n, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    ymask = mask_n[:, None] & mask_m[None, :]
    store_tile(y_ptrs, acc, ymask, ATOMIC)


@triton.jit
def _fp4_dequant_kernel(
    w_ptr, s_ptr, g_ptr, mul_ptr, out_ptr, N, K,
    MX: tl.constexpr, B: tl.constexpr, SHIFT: tl.constexpr, POW_SHIFT: tl.constexpr, POW_ACC: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PLANAR: tl.constexpr = False,
    HAS_MUL: tl.constexpr = False, PAIRED: tl.constexpr = False,
):
    """out [N, K] = W (decoded in fp32; HAS_MUL: times mul[n], the FP8 path's 1 / S[n]), cast to out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w_rows, s_rows = _tile_pointers(w_ptr, s_ptr, offs_n, K, B, BLOCK_K, PAIRED)
    w = _weight_tile(w_rows, s_rows, offs_n, k0, N, K, tl.float32, MX, B, SHIFT, POW_SHIFT, BLOCK_N, BLOCK_K,
                     PLANAR=PLANAR, PAIRED=PAIRED)
    w = w * POW_ACC
    if HAS_GLOBAL:
        w = w * tl.load(g_ptr)
    if HAS_MUL:
        w = w * tl.load(mul_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


def _format_args(w_scale, w_global, block_size: int, dtype) -> dict:
    """The constexprs of the format (NVFP4 / MXFP4) and the tile dtype."""
    mx = w_scale.dtype == torch.uint8
    x = acc_shift(mx, dtype)
    shift = TINY[dtype] - x
    return dict(MX=mx, B=block_size, SHIFT=shift, POW_SHIFT=2.0 ** shift, POW_ACC=2.0 ** x,
                HAS_GLOBAL=w_global is not None)


def gemm_config(k: int, n: int, cfg: dict, num_sms: int = DEFAULT_SMS) -> dict:
    """Static launch configuration (independent of M) of the GEMM kernel for a K x N weight."""
    return split_k_config(k, n, cfg.get("BLOCK_K", BLOCK_K), cfg["BLOCK_N"], max(1, num_sms // cfg["sms_per_tile"]))


def _check_pairs_tile(w_packed, block_k: int) -> None:
    """Row pairs (`format.to_row_pairs`) step 128 K per pair run: a tile kernel on them needs BLOCK_K a multiple."""
    if F.is_row_pairs(w_packed) and block_k % F.PLANAR_K_MULTIPLE:
        raise ValueError(f"fp4 tile kernels: row pairs need BLOCK_K a multiple of {F.PLANAR_K_MULTIPLE}, got {block_k}")


def launch_gemm(x2d, w_packed, w_scale, w_global, bias, block_size: int, cfg: dict = SMALL, *, wrap=identity,
                num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """`x2d @ W.T + bias` [M, N] with `_fp4_gemm_kernel` in configuration `cfg`: float32 when split-K
    (atomics into zeros), else x2d.dtype."""
    m, k = x2d.shape
    n = F.weight_nk(w_packed)[0]
    planar = F.is_planar(w_packed)
    if planar and x2d.dtype != torch.float32:
        raise ValueError("fp4 tile kernel: planar words take fp32 x here (16-bit x: `one_dot`)")
    split = gemm_config(k, n, cfg, num_sms)
    block_k = cfg.get("BLOCK_K", BLOCK_K)
    _check_pairs_tile(w_packed, block_k)
    atomic = split["split_k"] > 1
    y = torch.zeros((m, n), dtype=torch.float32, device=x2d.device) if atomic else \
        torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    grid = (split["n_tiles"], split["split_k"], cdiv(m, cfg["BLOCK_M"]))
    wrap(_fp4_gemm_kernel)[grid](
        x2d, w_packed, w_scale, optional_arg(w_global, w_packed), optional_arg(bias, x2d),
        y, m, n, k, x2d.stride(0),
        K_STEPS=split["k_per_split"] // block_k, HAS_BIAS=bias is not None, ATOMIC=atomic,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=split["BLOCK_N"], BLOCK_K=block_k,
        EVEN=whole_tiles(n, split["BLOCK_N"], split["split_k"], split["k_per_split"], k), PLANAR=planar,
        PAIRED=F.is_row_pairs(w_packed), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **_format_args(w_scale, w_global, block_size, x2d.dtype),
    )
    return y


def launch_dequant(w_packed, w_scale, w_global, block_size: int, dtype, *, wrap=identity,
                   cfg: dict | None = None, mul: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] as `dtype` (decoded in float32; times `mul[n]` when given), for the dequantize + cuBLAS path (the
    GEMM reads it transposed: writing [K, N] instead was no faster overall on the H200,
    benchmarks/fp4_dequant_layout.json) and the FP8 path (`fp8_weight`); `cfg` (default `DEQUANT`): the tile
    (BLOCK_K a multiple of 32; of 128 on row pairs)."""
    cfg = cfg or DEQUANT
    n, k = F.weight_nk(w_packed)
    _check_pairs_tile(w_packed, cfg["BLOCK_K"])
    out = torch.empty((n, k), dtype=dtype, device=w_packed.device)
    wrap(_fp4_dequant_kernel)[(cdiv(n, cfg["BLOCK_N"]), cdiv(k, cfg["BLOCK_K"]), 1)](
        w_packed, w_scale, optional_arg(w_global, w_packed), optional_arg(mul, w_scale), out, n, k,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], PLANAR=F.is_planar(w_packed),
        HAS_MUL=mul is not None, PAIRED=F.is_row_pairs(w_packed),
        **_format_args(w_scale, w_global, block_size, torch.float32),
    )
    return out


def fp8_weight(w_packed, w_scale, w_global, block_size: int, *, wrap=identity,
               dtype=fp8_large_m_path.FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [N, K] in `dtype` (FP8; float32 to test the values before rounding), S float32 [N]) for
    `plugins/fp8_large_m.py`; the CPU path's counterpart is `reference.fp8_weight_reference`."""
    s = fp8_large_m_path.column_scales(fp8_column_bound(w_scale, w_global))
    return launch_dequant(w_packed, w_scale, w_global, block_size, dtype, wrap=wrap,
                          mul=(1.0 / s).contiguous()), s


def fp4_gemm_triton(x, w_packed, w_scale, w_global, bias, block_size: int, *, wrap=identity,
                    num_sms: int = DEFAULT_SMS, fp8_large_m: bool = False) -> torch.Tensor:
    """The op's GPU path (weight-only: x is the already fake-quantized activation for W4A4): `x @ W.T + bias`
    in x.dtype, [..., N]; the path is chosen from M (see the module docstring). `fp8_large_m`: from
    `fp8_large_m.MIN_ROWS` rows the FP8 path (`plugins/fp8_large_m.py`) where it can run, instead of dequantize +
    cuBLAS."""
    check_args(x, w_packed, w_scale, w_global, None, bias, block_size)
    # K and N are weight dims, static in an engine; int() specializes them when a compiler made them symbolic
    k, n = int(x.shape[-1]), int(F.weight_nk(w_packed)[0])
    present = (w_global is not None, bias is not None)

    def tiled(cfg):
        def run(x2d, w_packed, w_scale, *rest):
            w_global, bias = unpack_optional(rest, *present)
            y = launch_gemm(x2d, w_packed, w_scale, w_global, bias, block_size, cfg, wrap=wrap, num_sms=num_sms)
            return y.to(x2d.dtype)
        return run

    def large(x2d, w_packed, w_scale, *rest):
        w_global, bias = unpack_optional(rest, *present)
        w = launch_dequant(w_packed, w_scale, w_global, block_size, x2d.dtype, wrap=wrap)
        return linear_bias(x2d, w.t(), bias, x2d.dtype)

    def large_fp8(x2d, w_packed, w_scale, *rest):
        w_global, bias = unpack_optional(rest, *present)
        w8, col_scale = fp8_weight(w_packed, w_scale, w_global, block_size, wrap=wrap)
        return fp8_large_m_path.linear(x2d, w8, col_scale, bias, x2d.dtype)

    def gemv(x2d, w_packed, w_scale, *rest):
        from qcompile.plugins.fp4_gemm import gemv as bytes_gemv, gemv_planar  # they import this module

        launch = gemv_planar.launch_gemv_planar if F.is_planar(w_packed) else bytes_gemv.launch_gemv
        w_global, bias = unpack_optional(rest, *present)
        return launch(x2d, w_packed, w_scale, w_global, bias, block_size, wrap=wrap)

    def one_dot_tile(cfg):
        def run(x2d, w_packed, w_scale, *rest):
            w_global, bias = unpack_optional(rest, *present)
            y = one_dot.launch(x2d, w_packed, w_scale, w_global, bias, cfg, asm=ptx_available(),
                               finish=cfg.get("finish", False), wrap=wrap, num_sms=num_sms)  # `finished`
            return y.to(x2d.dtype)
        return run

    weights = (w_packed, w_scale) + tuple(t for t in (w_global, bias) if t is not None)
    if F.is_planar(w_packed) and one_dot.supports(x.dtype, k):
        buckets = [(limit, one_dot_tile(cfg)) for limit, cfg in ONE_DOT] + [(None, large)]
    else:
        buckets = [(SMALL_M_MAX, tiled(SMALL)), (MID_M_MAX, tiled(MID)), (LARGE_M_MIN - 1, tiled(WIDE)),
                   (None, large)]
    if x.dtype in (torch.float16, torch.bfloat16):  # the GEMVs round products to fp16: 16-bit x only
        buckets.insert(0, (1, gemv))
    if fp8_large_m and fp8_large_m_path.usable(x.device, k, n):
        buckets = from_rows(buckets, fp8_large_m_path.MIN_ROWS, large_fp8)
    return run_by_buckets(x, k, n, buckets, weights)
