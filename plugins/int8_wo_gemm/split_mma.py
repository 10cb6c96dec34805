"""The INT8 tensor-core path of `qcompile::int8_weight_only_gemm`: up to 16 rows of 16-bit x, wide layers (CUDA only).

The other small-M kernels convert every int8 weight to x's dtype in registers before it is multiplied. Here the
weight goes to the INT8 MMA as it is stored, and x is made integer instead. Per row of x and per chunk of K
(`CHUNK` = the GEMM's K step), `s = amax(chunk) / Q_MAX` and `q = round(x / s)` (|q| <= Q_MAX = 32639), and
`q = 256 hi + lo` with `hi`, `lo` int8 (the "planes"). Then, exactly in integers,

    x . w  ~=  sum over chunks of  s * (256 * (hi . w) + (lo . w))

with `hi . w` and `lo . w` int32 dot products on the tensor cores: the two planes are the MMA's narrow operand
([2 * MP, CHUNK], hi rows then lo rows, MP = the rows of x padded), the weight tile the wide one. The only new
error is q's rounding: at most s / 2 = amax(chunk) / 65278 per element of x (plus float32's rounding of x / s,
under s / 256), so an output moves by at most about `w_scale[n] * sum_k |w_q[n, k]| * s(chunk of k) / 2`: about
2^-16 of the chunk's largest element, where bf16 itself rounds x at 2^-9 of each element. On the H200, bf16
outputs were closer to float64 than those of dequantize + cuBLAS (relative L2 1.65e-3 against 2.4e-3, which
rounds the dequantized weight to bf16; the same with outlier channels in x; tools/diag/w8_int8_mma_probe.py at
commit a2fe773, benchmarks/w8_int8_mma_probe.json).

Two launches: `_split_kernel` writes the planes and scales (about 2 µs), `_mma_kernel` streams the weight: each
program owns BLOCK_N rows of the [N, K] weight over all of K and finishes them (chunk scales, the weight
scale, bias, cast). It pays off when N gives enough programs to fill the GPU with wide tiles (`pick_config`):
in the probe, at M = 16, 8192 x 28672 went from 82.5 to 64.5 µs and 4096 x 14336 from 26.7 to 21.5 µs, while
the two layers with N = 4096 ran slower than the shipped kernels (too few programs). float32 x keeps the IEEE
kernels (16-bit planes are coarser than float32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import cdiv, identity, optional_arg
from qcompile.plugins.triton_tiles import finish_split_tile, jit_any_m

Q_MAX = tl.constexpr(32639.0)  # 127 * 256 + 127: hi = (q + 128) >> 8 stays in [-127, 127], lo in [-128, 127]
SPLIT_CHUNKS = 8  # chunks per program of the split kernel
# Tiles, widest first: the first that gives at least MIN_WAVES waves of programs is taken (probe: 128 rows won on
# N = 28672, 64 on N = 14336; each lost badly where it gave fewer than one wave). 128 x 256 on 3 stages: 65.9 µs at
# M = 16 on 8192 x 28672 against 69.1 for 128 x 128 on 4 (tools/tune_w8a16_small_m.py --kinds mma,
# benchmarks/tune_w8a16_small_m_mma.json, where narrower tiles for N = 4096 lost to the other kernels).
CONFIGS = [dict(BLOCK_N=128, BLOCK_K=256, num_warps=4, num_stages=3),
           dict(BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4)]
MIN_WAVES = 1.5
MIN_SPLIT_STEPS = 8  # K steps per part, at least, when K is split to fill the GPU (`pick_config`)


def pick_config(n: int, k: int, num_sms: int) -> dict | None:
    """The tile for an [N, K] layer: the first of CONFIGS whose N tiles give MIN_WAVES waves of programs; else the
    narrowest with K split into the fewest parts (a power of two) that give them, when each part keeps at least
    MIN_SPLIT_STEPS K steps; else None (use the other kernels). H200, M = 16 (benchmarks/tune_w8a16_small_m_s16.json):
    14336 x 4096 in 4 parts of 14 steps ran 24.8 µs against 28.5 for the row-dot kernel; 4096 x 4096 in 4 parts of
    4 steps lost (13.2 against 11.8)."""
    cfg = next((c for c in CONFIGS if cdiv(n, c["BLOCK_N"]) >= MIN_WAVES * num_sms), None)
    if cfg is not None:
        return cfg
    narrow = CONFIGS[-1]
    tiles, splits = cdiv(n, narrow["BLOCK_N"]), 2
    while tiles * splits < MIN_WAVES * num_sms:
        splits *= 2
    return dict(narrow, splits=splits) if k // narrow["BLOCK_K"] >= splits * MIN_SPLIT_STEPS else None


def runs_one_row(cfg: dict) -> bool:
    """Whether the path takes M = 1 too on a layer given `cfg`: only on the widest tiles (CONFIGS[0], no split K).
    At one row the GEMV wins on the layers given narrower tiles: 4096 x 14336 (64 rows) ran 20.8 µs against 21.6
    on the H200 (benchmarks/tune_w8a16_small_m_s16.json) and 24.5 against 27.6 on the H100 (GEMV with "prmt",
    benchmarks/tune_w8a16_prmt-h100_s57.json); on 8192 x 28672 (128 rows) the H200 ran this path in 61.5 µs against
    65.9."""
    return cfg["BLOCK_N"] == CONFIGS[0]["BLOCK_N"] and "splits" not in cfg


def padded_rows(m: int) -> int:
    """MP: the planes' rows per part for an M known to be at most `m` (tl.dot needs 2 * MP >= 16)."""
    return max(8, triton.next_power_of_2(m))


@jit_any_m
def _split_kernel(x_ptr, planes_ptr, s_ptr, M, K, KC, stride_xm, MP: tl.constexpr, CHUNK: tl.constexpr,
                  CHUNKS: tl.constexpr):
    """Row m < MP, CHUNKS chunks: planes[m] = hi, planes[MP + m] = lo, s[m, c] = amax(chunk c) / Q_MAX (zeros for
    m >= M). The grid covers the MP rows, not M: AOTInductor runs the kernels of every torch.cond branch once
    while compiling, with the example's row count, which may exceed this branch's bound."""
    m = tl.program_id(0)
    offs_c, offs_k, ok, hi, lo, s = split_chunks(x_ptr, m, M, K, stride_xm, CHUNK, CHUNKS)
    tl.store(planes_ptr + m * K + offs_k, hi.to(tl.int8), mask=ok)
    tl.store(planes_ptr + (MP + m) * K + offs_k, lo.to(tl.int8), mask=ok)
    tl.store(s_ptr + m * KC + offs_c, s, mask=offs_c < KC)


@triton.jit
def split_chunks(x_ptr, m, M, K, stride_xm, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """This program's chunks of row m of x (zeros when m >= M): chunk indices [CHUNKS], k offsets and their mask
    [CHUNKS, CHUNK], hi and lo (int32 in int8 range) with x ~= s * (256 hi + lo), s [CHUNKS] = amax / Q_MAX."""
    offs_c = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)
    offs_k = offs_c[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    ok = offs_k < K
    x = tl.load(x_ptr + m * stride_xm + offs_k, mask=ok & (m < M), other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    hi, lo = hi_lo(x, amax[:, None])
    return offs_c, offs_k, ok, hi, lo, amax / Q_MAX


@triton.jit
def hi_lo(x, amax):
    """hi, lo (int32 in int8 range) with x ~= amax / Q_MAX * (256 hi + lo): q = round(x * Q_MAX / amax) (0 where
    amax is 0), hi = (q + 128) >> 8, lo = q - 256 hi (amax broadcast against x)."""
    q = tl.floor(x * tl.where(amax > 0, Q_MAX / amax, 0.0) + 0.5).to(tl.int32)
    hi = (q + 128) >> 8
    return hi, q - hi * 256


@jit_any_m
def _mma_kernel(planes_ptr, s_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, M, N, K, KC, HAS_BIAS: tl.constexpr,
                K_STEPS: tl.constexpr, MP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLITS: tl.constexpr = 1):
    """y[m, n] for BLOCK_N weight rows n and every row m < M: per K step one int8 MMA of the planes [2 MP, BLOCK_K]
    with the weight tile, scaled by the step's chunk scales (x 256 on the hi rows); hi and lo rows summed at the
    end.

    SPLITS > 1 (split K, grid axis 1): each program takes K_STEPS steps, adds its weight-scaled sums to the fp32
    workspace `part_ptr` [MP, N] (zeros), then counts itself in the N tile's count (after the workspace); the last
    of the tile's programs reads the sums back, adds the bias and writes y (`finish_split_tile`). One launch
    still, and wide tiles keep many weight bytes in flight per program on layers with few N tiles."""
    R: tl.constexpr = 2 * MP
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    r = tl.arange(0, R)
    row = r % MP
    valid = row < M
    weight_of_part = tl.where(r < MP, 256.0, 1.0)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for i in range(0, K_STEPS):
        step = tl.program_id(1) * K_STEPS + i if SPLITS > 1 else i
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = offs_k < K
        a = tl.load(planes_ptr + r[:, None] * K + offs_k[None, :], mask=valid[:, None] & ok[None, :], other=0)
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & ok[None, :], other=0,
                    eviction_policy="evict_first")
        d = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        smask = valid & (step < KC) if SPLITS > 1 else valid  # the last split's last steps may be past K
        sc = tl.load(s_ptr + row * KC + step, mask=smask, other=0.0) * weight_of_part
        acc += d.to(tl.float32) * sc[:, None]
    y = tl.sum(tl.reshape(acc, (2, MP, BLOCK_N)), axis=0)
    y = y * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_m = tl.arange(0, MP)
    at = offs_m[:, None] * N + offs_n[None, :]
    finish_split_tile(y, (offs_m < M)[:, None] & mask_n[None, :], y_ptr + at, b_ptr + offs_n[None, :] + 0 * at,
                      part_ptr + at, part_ptr + MP * N + tl.program_id(0), SPLITS, SPLITS > 1, HAS_BIAS)


def split_planes(x2d: torch.Tensor, chunk: int, rows: int, *, wrap=identity):
    """(planes int8 [2 * rows, K], scales float32 [rows, cdiv(K, chunk)]) of x [M, K], M <= rows (rows past M:
    zeros)."""
    m, k = x2d.shape
    kc = cdiv(k, chunk)
    planes = torch.empty((2 * rows, k), dtype=torch.int8, device=x2d.device)
    scales = torch.empty((rows, kc), dtype=torch.float32, device=x2d.device)
    wrap(_split_kernel)[(rows, cdiv(kc, SPLIT_CHUNKS))](x2d, planes, scales, m, k, kc, x2d.stride(0), MP=rows,
                                                     CHUNK=chunk, CHUNKS=SPLIT_CHUNKS)
    return planes, scales


def launch(x2d, w_q, w_scale, bias, cfg: dict, rows: int, *, wrap=identity) -> torch.Tensor:
    """`x2d @ dequant(w_q)^T + bias` in x.dtype for M <= `rows` rows of x (a static bound: MP = padded_rows).
    `cfg["splits"]` (default 1): split K in that many parts, or fewer so that each gets whole K steps and none
    is empty."""
    m, k = x2d.shape
    n = w_q.shape[0]
    mp = padded_rows(rows)
    planes, scales = split_planes(x2d, cfg["BLOCK_K"], mp, wrap=wrap)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    steps = cdiv(k, cfg["BLOCK_K"])
    per = cdiv(steps, cfg.get("splits", 1))
    splits = cdiv(steps, per)  # no split starts past K
    tiles = cdiv(n, cfg["BLOCK_N"])
    # split K: fp32 sums [mp, n] then one count per N tile (zeros)
    part = (torch.zeros(mp * n + tiles, dtype=torch.float32, device=x2d.device) if splits > 1 else scales)
    wrap(_mma_kernel)[(tiles, splits)](
        planes, scales, w_q, w_scale, optional_arg(bias, w_scale), y, part, m, n, k, scales.shape[1],
        HAS_BIAS=bias is not None, K_STEPS=per, MP=mp, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], SPLITS=splits, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
