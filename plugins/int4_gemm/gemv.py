"""The INT4 GEMV of `qcompile::int4_groupwise_gemm` (CUDA only; imported lazily: CPU machines have no Triton).

`_int4_gemv_kernel` (one row of x per program; M = 1): streams [BLOCK_K/8 word rows, BLOCK_N] weight tiles
and multiplies without tensor cores (at M = 1 the job is moving weight bytes). With fp16/bf16 x the 8
products of each int32 word run on packed fp16x2 (`half2.py`: one LOP3 decodes two nibbles into fp16;
3.7 instructions per weight against 5.1 in fp32; x scaled per step by a power of two to stay in fp16's
range). fp16 x on planar words without zero points ("x_pairs", what CUDA engines run) takes x's own fp16
values as the pairs (loaded as int32 words where x's row is 4-byte aligned), scaled once per program on the
fp16x2 units: 3.05 instructions per weight. fp32 x keeps the exact fp32 path (each nibble OR-ed into 128.0's
mantissa: 136 + q). At one row on the H100 the GEMV runs about as fast from L2 as from HBM, and kernels with
fewer instructions (the int32 x words, `mma_gemv`) gain little or nothing from HBM: there its limit is how it
streams the weight (`tools/diag/gemv_l2_probe.py`). K is split until about `waves` waves of programs stream the
weight; partial sums meet in fp32 atomics. The fp16x2 path took 8192 x 28672 from 57.6 to 39.0 µs
(benchmarks/int4_stream_probe*.json).

A GEMV bucket's "mma" (a dict) runs the tensor-core GEMV (`mma_gemv.py`) instead where it applies; "x_pairs" and
"finish" are described with the buckets (`kernel.CONFIGS`). `launch_gemv` takes `wrap` like the other launches
(`kernel.py`'s docstring).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import DEFAULT_SMS, cdiv, identity, optional_arg, split_for_waves, split_k_outputs
from qcompile.plugins.int4_gemm import mma_gemv
from qcompile.plugins.int4_gemm.format import is_planar
from qcompile.plugins.int4_gemm.half2 import (dot8, dot8_emulated, half_of, pow2_range, ptx_available, scaled_pair,
                                              scaled_word, word_k, x_at, x_of_words, x_pair)
from qcompile.plugins.triton_tiles import finish_split_tile, store_tile


@triton.jit
def nibble_plus_136(words, j: tl.constexpr):
    """fp32 `136 + q` of nibble j of int32 words: the nibble moved to bits 16..19 and OR-ed into the bits of 128.0
    with its sign bit flipped (one shift and one AND/XOR: q + 8 in the mantissa, exact)."""
    if j < 4:
        t = words << (16 - 4 * j)
    elif j == 4:
        t = words
    else:
        t = words >> (4 * j - 16)
    return ((t & 0x000F0000) ^ 0x43080000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_step_fp32(words, x_row, kw, ok, PLANAR: tl.constexpr):
    """(sum_j x_j q_j per word, sum_j x_j per word row, 1.0): each nibble as the fp32 136 + q, x * (136 + q)
    exact in fp32, the 136 taken off once per word row."""
    part = tl.zeros(words.shape, dtype=tl.float32)
    xsum = tl.zeros(kw.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        xj = x_at(x_row, kw, j, ok, PLANAR)
        part += xj[:, None] * nibble_plus_136(words, j)
        xsum += xj
    return part - 136.0 * xsum[:, None], xsum, 1.0


@triton.jit
def _gemv_step_half2(words, x_row, kw, ok, ASM: tl.constexpr, PLANAR: tl.constexpr):
    """(sum_j x_j q_j per word times `up`, sum_j x_j per word row, down = 1 / up): the products on fp16x2
    (`half2.dot8`), x scaled by the power of two `up` that puts the step's largest |x| in [256, 512)."""
    x0, x1, x2, x3, x4, x5, x6, x7, big = x_of_words(x_row, kw, ok, PLANAR)
    up, down = pow2_range(tl.max(big, axis=0))
    shape: tl.constexpr = words.shape
    p04 = tl.broadcast_to(x_pair(x0, x4, up)[:, None], shape)
    p15 = tl.broadcast_to(x_pair(x1, x5, up * 0.0625)[:, None], shape)
    p26 = tl.broadcast_to(x_pair(x2, x6, up)[:, None], shape)
    p37 = tl.broadcast_to(x_pair(x3, x7, up * 0.0625)[:, None], shape)
    if ASM:
        part = dot8(words, p04, p15, p26, p37)
    else:
        part = dot8_emulated(words, p04, p15, p26, p37)
    return part, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), down


@triton.jit
def _x_scale(x_row, k0, k_per_split, K, X_SPAN: tl.constexpr):
    """(up, down = 1 / up): the power of two that puts the largest |x| of a program's K range in [256, 512), at most
    2^15 (fp16's largest power of two), over the whole 64-K blocks the range touches (planar words mix a block's K)."""
    lo = (k0 // 64) * 64
    hi = tl.minimum(((k0 + k_per_split + 63) // 64) * 64, K)
    at = lo + tl.arange(0, X_SPAN)
    xs = tl.load(x_row + at, mask=at < hi, other=0.0).to(tl.float32)
    up, down = pow2_range(tl.max(tl.abs(xs), axis=0))
    return tl.minimum(up, 32768.0), tl.maximum(down, 1.0 / 32768.0)


@triton.jit
def _gemv_step_pairs(words, x_row, kw, ok, up, ASM: tl.constexpr, X32: tl.constexpr):
    """`_gemv_step_half2`'s products for fp16 x on planar words, with the program's scale `up` (`_x_scale`): the
    pair of nibbles j and j + 4 is x at two adjacent K (an even K first), taken as x's own fp16 values and scaled
    on the fp16x2 units, not converted through fp32 with a scale found per step. X32 (x_row 4-byte aligned): each
    pair is one int32 load (`scaled_word`), else two fp16 loads (`scaled_pair`)."""
    shape: tl.constexpr = words.shape
    even, odd = x_pair(up, up, 1.0), x_pair(up, up, 0.0625)  # the PTX's scale pairs (`scaled_word`, `scaled_pair`)
    if X32:
        x_words = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + word_k(kw, 0, True) // 2
        w04, w15 = tl.load(x_words, mask=ok, other=0), tl.load(x_words + 8, mask=ok, other=0)
        w26, w37 = tl.load(x_words + 16, mask=ok, other=0), tl.load(x_words + 24, mask=ok, other=0)
        if ASM:
            p04, p15, p26, p37 = scaled_word(w04, even), scaled_word(w15, odd), scaled_word(w26, even), \
                scaled_word(w37, odd)
        else:
            p04, p15 = x_pair(half_of(w04, False), half_of(w04, True), up), \
                x_pair(half_of(w15, False), half_of(w15, True), up * 0.0625)
            p26, p37 = x_pair(half_of(w26, False), half_of(w26, True), up), \
                x_pair(half_of(w37, False), half_of(w37, True), up * 0.0625)
    else:
        k = word_k(kw, 0, True)
        x0, x4 = tl.load(x_row + k, mask=ok, other=0.0), tl.load(x_row + k + 1, mask=ok, other=0.0)
        x1, x5 = tl.load(x_row + k + 16, mask=ok, other=0.0), tl.load(x_row + k + 17, mask=ok, other=0.0)
        x2, x6 = tl.load(x_row + k + 32, mask=ok, other=0.0), tl.load(x_row + k + 33, mask=ok, other=0.0)
        x3, x7 = tl.load(x_row + k + 48, mask=ok, other=0.0), tl.load(x_row + k + 49, mask=ok, other=0.0)
        if ASM:
            p04, p15 = scaled_pair(x0, x4, even), scaled_pair(x1, x5, odd)
            p26, p37 = scaled_pair(x2, x6, even), scaled_pair(x3, x7, odd)
        else:
            f32 = tl.float32
            p04, p15 = x_pair(x0.to(f32), x4.to(f32), up), x_pair(x1.to(f32), x5.to(f32), up * 0.0625)
            p26, p37 = x_pair(x2.to(f32), x6.to(f32), up), x_pair(x3.to(f32), x7.to(f32), up * 0.0625)
    p04, p15 = tl.broadcast_to(p04[:, None], shape), tl.broadcast_to(p15[:, None], shape)
    p26, p37 = tl.broadcast_to(p26[:, None], shape), tl.broadcast_to(p37[:, None], shape)
    if ASM:
        return dot8(words, p04, p15, p26, p37)
    return dot8_emulated(words, p04, p15, p26, p37)


@triton.jit
def _gemv_step(acc, x_row, w_ptr, s_ptr, z_ptr, offs_n, mask_n, N, K, group_size, k0,
               HAS_ZERO: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr, BLOCK_K: tl.constexpr,
               PLANAR: tl.constexpr, PAIRS: tl.constexpr = False, up=1.0, up_down=1.0, X32: tl.constexpr = False):
    """acc [BLOCK_K/8, BLOCK_N] plus the step of word rows k0 / 8 .. (k0 + BLOCK_K) / 8: products per word row
    (PAIRS: `_gemv_step_pairs` with the program's scale up, its inverse up_down and X32; HALF2: `_gemv_step_half2`, else
    `_gemv_step_fp32`), zero points off as z * sum_j x_j (not with PAIRS), then the step's group scale. PLANAR
    words: each x is loaded from its nibble's K (the step's K still lie in one group: BLOCK_K <= 64 or both
    multiples of 64)."""
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    ok = kw < K // 8
    words = tl.load(w_ptr + kw.to(tl.int64)[:, None] * N + offs_n[None, :], mask=ok[:, None] & mask_n[None, :],
                    other=0, eviction_policy="evict_first")
    g = k0 // group_size
    smask = mask_n & (k0 < K)
    s = tl.load(s_ptr + g * N + offs_n, mask=smask, other=0.0).to(tl.float32)
    if PAIRS:
        return acc + _gemv_step_pairs(words, x_row, kw, ok, up, ASM, X32) * (s * up_down)[None, :]
    if HALF2:
        part, xsum, down = _gemv_step_half2(words, x_row, kw, ok, ASM, PLANAR)
    else:
        part, xsum, down = _gemv_step_fp32(words, x_row, kw, ok, PLANAR)
    if HAS_ZERO:
        z = tl.load(z_ptr + g * N + offs_n, mask=smask, other=0).to(tl.float32)
        return acc + (part * down - xsum[:, None] * z[None, :]) * s[None, :]
    return acc + part * (s * down)[None, :]


@triton.jit
def _gemv_loop(acc, x_row, w_ptr, s_ptr, z_ptr, offs_n, mask_n, N, K, group_size, k0, K_STEPS: tl.constexpr,
               HAS_ZERO: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr, BLOCK_K: tl.constexpr,
               PIPELINE: tl.constexpr, PLANAR: tl.constexpr, PAIRS: tl.constexpr = False, up=1.0, up_down=1.0,
               X32: tl.constexpr = False):
    """acc plus K_STEPS `_gemv_step`s from k0 (PIPELINE > 0: a `tl.range` loop staged num_stages deep)."""
    for step in tl.range(0, K_STEPS, num_stages=PIPELINE if PIPELINE else None):
        acc = _gemv_step(acc, x_row, w_ptr, s_ptr, z_ptr, offs_n, mask_n, N, K, group_size, k0 + step * BLOCK_K,
                         HAS_ZERO, HALF2, ASM, BLOCK_K, PLANAR, PAIRS, up, up_down, X32)
    return acc


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, out_ptr, b_ptr,
    N, K, stride_xm, group_size, k_per_split,
    K_STEPS: tl.constexpr, HAS_ZERO: tl.constexpr, ATOMIC: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PIPELINE: tl.constexpr = 0, PLANAR: tl.constexpr = False,
    FINISH: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, PAIRS: tl.constexpr = False,
    X_SPAN: tl.constexpr = 1,
):
    """GEMV over [BLOCK_K/8 word rows, BLOCK_N] tiles (BLOCK_K divides the group: one scale row per step), one
    `_gemv_step` per step (steps past K are masked). HALF2 (16-bit x): the products on fp16x2 (ASM False: the
    interpreter's stand-in). PIPELINE > 0: the loop is `tl.range(..., num_stages=PIPELINE)`, so Triton stages the
    weight tiles through shared memory with asynchronous copies (a plain loop's loads are not pipelined: no dot
    uses them). No configuration sets it: in the H200 sweep no pipelined candidate won a decode shape
    (benchmarks/int4_tune_gemv_s16.json). FINISH: the tile is written to out_ptr (+ bias) in out's dtype by
    `finish_split_tile` (split K: y_ptr is the zeroed fp32 accumulator [M, N], then one count per tile), else
    y_ptr gets the fp32 result (atomics when K is split). PAIRS (fp16 x, planar words, no zero points): the x
    pairs are x's own fp16 values (`_gemv_step_pairs`), scaled by one power of two per program (`_x_scale` over
    the X_SPAN K of `x_span`), loaded as int32 pairs where x's row is 4-byte aligned (checked in the kernel: the
    launch may be traced, where x has no address)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    k0 = pid_k * k_per_split
    if PAIRS:
        up, up_down = _x_scale(x_row, k0, k_per_split, K, X_SPAN)
        if x_row.to(tl.int64) % 4 == 0:  # x's pairs load as int32 words (as engines' x always is)
            acc = _gemv_loop(acc, x_row, w_ptr, s_ptr, z_ptr, offs_n, mask_n, N, K, group_size, k0, K_STEPS,
                             HAS_ZERO, HALF2, ASM, BLOCK_K, PIPELINE, PLANAR, True, up, up_down, True)
        else:
            acc = _gemv_loop(acc, x_row, w_ptr, s_ptr, z_ptr, offs_n, mask_n, N, K, group_size, k0, K_STEPS,
                             HAS_ZERO, HALF2, ASM, BLOCK_K, PIPELINE, PLANAR, True, up, up_down, False)
    else:
        acc = _gemv_loop(acc, x_row, w_ptr, s_ptr, z_ptr, offs_n, mask_n, N, K, group_size, k0, K_STEPS,
                         HAS_ZERO, HALF2, ASM, BLOCK_K, PIPELINE, PLANAR)
    if FINISH:
        count_ptr = y_ptr + tl.num_programs(2) * N + row * tl.num_programs(0) + pid_n
        finish_split_tile(tl.sum(acc, axis=0), mask_n, out_ptr + row * N + offs_n, b_ptr + offs_n,
                          y_ptr + row * N + offs_n, count_ptr, tl.num_programs(1), ATOMIC, HAS_BIAS)
    else:
        store_tile(y_ptr + row * N + offs_n, tl.sum(acc, axis=0), mask_n, ATOMIC)


def k_step(cfg_k: int, k: int, group_size: int) -> tuple[int, bool]:
    """(BLOCK_K, whether every step lies in one group). A group that is a multiple of the step keeps
    it (one scale row per step); a single group (per channel) allows any step."""
    block_k = min(cfg_k, max(16, triton.next_power_of_2(k)))
    while block_k > 16 and group_size % block_k and group_size != k:
        block_k //= 2
    return block_k, group_size % block_k == 0 or group_size == k


@functools.lru_cache(maxsize=None)
def x_span(k: int, per: int, splits: int) -> int:
    """`_x_scale`'s X_SPAN: a power of two covering the whole 64-K blocks that any split's K range touches."""
    return triton.next_power_of_2(max(min(cdiv(min(i * per + per, k), 64) * 64, k) - i * per // 64 * 64
                                      for i in range(splits)))


def launch_gemv(x2d, w_packed, w_scale, w_zero, group_size: int, cfg: dict, *, bias=None, out_dtype=None,
                wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """`x2d @ dequant(W)` [M, N] with the GEMV kernel (one program column per row of x): fp32, or with
    `out_dtype` given `+ bias` in out_dtype, finished in the kernel (the count of `finish_split_tile` follows the
    fp32 accumulator in one zeroed buffer, so the op launches a zero fill and the GEMV, no cast after it)."""
    m, k = x2d.shape
    n = w_packed.shape[1]
    mma = cfg.get("mma") and out_dtype is None and ptx_available()
    if mma and mma_gemv.applies(x2d, w_zero, k, n, group_size):
        return mma_gemv.launch(x2d, w_packed, w_scale, group_size, cfg["mma"], wrap=wrap, num_sms=num_sms)
    block_k, aligned = k_step(cfg["BLOCK_K"], k, group_size)
    if not aligned:
        raise ValueError(f"GEMV kernel: group size {group_size} must be a multiple of 16")
    block_n = cfg["BLOCK_N"]
    while block_n > 64 and n < cfg.get("MIN_TILES", 16) * block_n:  # narrower N, narrower tiles (H200 tuning)
        block_n //= 2
    tiles = cdiv(n, block_n)
    splits, per = split_for_waves(k, tiles, block_k, cfg["waves"], num_sms)
    finish = out_dtype is not None
    pairs = cfg.get("x_pairs", False) and x2d.dtype == torch.float16 and w_zero is None and is_planar(k, group_size)
    y, out = split_k_outputs(m, n, splits, m * tiles, out_dtype or torch.float32, x2d.device, finish)
    wrap(_int4_gemv_kernel)[(tiles, splits, m)](
        x2d, w_packed, w_scale, optional_arg(w_zero, w_scale), y, optional_arg(out, w_scale),
        optional_arg(bias, w_scale),
        n, k, x2d.stride(0), group_size, per, K_STEPS=per // block_k,
        HAS_ZERO=w_zero is not None, ATOMIC=splits > 1, HALF2=x2d.dtype in (torch.float16, torch.bfloat16),
        ASM=ptx_available(), BLOCK_N=block_n, BLOCK_K=block_k, PIPELINE=cfg.get("pipeline", 0),
        PLANAR=is_planar(k, group_size), FINISH=finish, HAS_BIAS=bias is not None,
        PAIRS=pairs, X_SPAN=x_span(k, per, splits) if pairs else 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out if finish else y
