"""The INT8 tensor-core path of `qcompile::int4_groupwise_gemm`: up to 16 rows of 16-bit x (CUDA only).

The tile kernels decode every nibble into x's float type before the MMA (5-7 instructions per weight). Here the
packed weight goes to the INT8 MMA almost as it is stored, and x is made integer instead (W8A16's `split_mma`
split, see its docstring):
- The engine words [N, K/8] are bytes [N, K/2]: byte b of row n holds q[2b] (low nibble) and q[2b + 1] (high).
  As int8, `byte << 4` is 16 q[2b] and `byte & 0xF0` is 16 q[2b + 1]: two int8 tiles per group with no
  float decoding (three bit operations per 8 weights, in inline PTX on four bytes per register).
- x is split per chunk of K (`chunk`: the group, at most 128) into hi and lo int8 planes with one scale per row
  and chunk, `x ~= s * (256 hi + lo)` (the added error is at most s / 2 = amax(chunk) / 65278 per element), and
  the planes are stored de-interleaved, even k apart from odd k, so each weight tile meets its own plane.
- Per chunk: `d = P_even . (16 q_even) + P_odd . (16 q_odd)` in int32 on the tensor cores; with zero points,
  `16 zp * sum(plane over the chunk)` comes off d (exact, in integers); then `d * s[m] / 16 * scale[g, n]`
  (x 256 on the hi rows) in float32.
Two launches, bias and cast included: the split kernel (a few µs), and the GEMM, which streams [BLOCK_N rows,
chunk / 2 bytes] weight tiles per chunk. When the N tiles are too few for `waves` waves of programs, K is split:
partial sums meet in float32 atomics in a workspace that the split kernel zeroes, and the last program of each
tile to arrive (a counter per tile, zeroed there too) adds the bias and writes y. Separate fill, cast and bias
kernels cost about 2 µs each in CUDA-graph replay: the first version of this path had them and was slower than
the kernels it replaced at M = 1 on three of the four kernel-target shapes.

On the H200 (bf16, g = 128, best tile per cell; the probe tools/diag/int4_int8_mma_probe.py at commit a160a3a,
benchmarks/int4_int8_mma_probe.json): 12.0 / 21.7 / 21.5 / 58.5 µs at M = 1 and 13.6 / 27.0 / 24.8 / 82.1 µs at
M = 16 on 4096x4096 / 4096x14336 / 14336x4096 / 8192x28672, against 14.0 / 25.2 / 26.3 / 63.9 and
17.8 / 32.7 / 31.6 / 93.6 for the tile GEMV and the swapped-operand tile kernel it replaces there; relative L2
error vs float64 1.7e-3 (2.2e-3 before). It needs chunks of at least 64 (the INT8 MMA's K of 32 bytes per
parity): groups of 32 keep the tile kernel.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import cdiv, identity, optional_arg
from qcompile.plugins.int8_wo_gemm.split_mma import padded_rows, split_chunks

MAX_CHUNK = 128
USE_PTX = os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter has no inline PTX
SPLIT_CHUNKS = 8  # chunks per program of the split kernel
ZERO_BLOCK = 1024  # elements per store of the split kernel's workspace zeroing
# GEMM tiles, from the probe's sweep (BLOCK_N x groups per step x split-K waves): 128 rows, one group per step,
# 2 waves won every cell but M = 1 on the widest layer, where 64 rows with two groups per step did (58.5 against
# 66.6 µs): taken while 128-row tiles alone make WIDE_WAVES waves of programs.
TILE = dict(BLOCK_N=128, STEP_GROUPS=1, waves=2, num_warps=4, num_stages=4)
TILE_WIDE_M1 = dict(BLOCK_N=64, STEP_GROUPS=2, waves=1, num_warps=4, num_stages=4)
WIDE_WAVES = 1.5


def chunk_for(group_size: int, k: int) -> int | None:
    """The K chunk of the split (a divisor of the group, or of K per channel), or None when the group is too
    small for the INT8 MMA (< 64)."""
    chunk = min(group_size, MAX_CHUNK)
    if chunk < 64 or group_size % chunk or k % chunk:
        return None
    return chunk


def pick_tile(rows: int, n: int, num_sms: int) -> dict:
    """The GEMM tile for at most `rows` rows of x and an N-wide layer."""
    if rows == 1 and cdiv(n, TILE["BLOCK_N"]) >= WIDE_WAVES * num_sms:
        return TILE_WIDE_M1
    return TILE


@triton.jit
def _split_pairs_kernel(x_ptr, planes_ptr, s_ptr, xsum_ptr, ws_ptr, count_ptr, M, N, K, KC, stride_xm, tiles,
                        MP: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, ZERO_WS: tl.constexpr,
                        ZERO_BLOCK: tl.constexpr, ZERO_STEPS: tl.constexpr, COUNT_STEPS: tl.constexpr):
    """Row m < MP (zeros past M), CHUNKS chunks: planes [2 (even k, odd k), 2 MP (hi rows, lo rows), K/2] int8,
    s [MP, KC] = amax(chunk) / Q_MAX, xsum [2 MP, KC] int32 = the chunk's sum of the hi (lo) plane. The grid covers
    the MP rows, not M (AOTInductor runs every torch.cond branch's kernels with the example's row count).
    ZERO_WS: also zeroes the GEMM's split-K workspace rows m < M (ws [M, N] float32, ZERO_STEPS blocks of N per
    program) and its per-tile arrival counters (count [tiles] int32), so the GEMM needs no fill kernel."""
    m = tl.program_id(0)
    offs_c, _, _, hi, lo, s = split_chunks(x_ptr, m, M, K, stride_xm, CHUNK, CHUNKS)
    half = K // 2
    offs_h = offs_c[:, None] * (CHUNK // 2) + tl.arange(0, CHUNK // 2)[None, :]
    ok_h = offs_h < half
    hi_e, hi_o = tl.split(tl.reshape(hi, (CHUNKS, CHUNK // 2, 2)))
    lo_e, lo_o = tl.split(tl.reshape(lo, (CHUNKS, CHUNK // 2, 2)))
    odd = planes_ptr + 2 * MP * half
    tl.store(planes_ptr + m * half + offs_h, hi_e.to(tl.int8), mask=ok_h)
    tl.store(planes_ptr + (MP + m) * half + offs_h, lo_e.to(tl.int8), mask=ok_h)
    tl.store(odd + m * half + offs_h, hi_o.to(tl.int8), mask=ok_h)
    tl.store(odd + (MP + m) * half + offs_h, lo_o.to(tl.int8), mask=ok_h)
    ok_c = offs_c < KC
    tl.store(s_ptr + m * KC + offs_c, s, mask=ok_c)
    tl.store(xsum_ptr + m * KC + offs_c, tl.sum(hi, axis=1), mask=ok_c)
    tl.store(xsum_ptr + (MP + m) * KC + offs_c, tl.sum(lo, axis=1), mask=ok_c)
    if ZERO_WS:
        zeros = tl.zeros((ZERO_BLOCK,), dtype=tl.float32)
        lo_n = tl.program_id(1) * (ZERO_STEPS * ZERO_BLOCK)
        for step in range(0, ZERO_STEPS):
            offs = lo_n + step * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
            tl.store(ws_ptr + m * N + offs, zeros, mask=(offs < N) & (m < M))
        if (m == 0) & (tl.program_id(1) == 0):
            for step in range(0, COUNT_STEPS):
                offs = step * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
                tl.store(count_ptr + offs, tl.zeros((ZERO_BLOCK,), dtype=tl.int32), mask=offs < tiles)


@triton.jit
def _nibbles_x16(b, ASM: tl.constexpr):
    """(16 q_even, 16 q_odd) int8 from bytes b (int8). ASM: on four bytes per 32-bit register (inline PTX: one
    shift and two ANDs per 8 weights); else element-wise int8 operations (the Triton interpreter's form)."""
    if ASM:
        even = tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r", [b],
                                         dtype=tl.int8, is_pure=True, pack=4)
        odd = tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [b], dtype=tl.int8, is_pure=True,
                                        pack=4)
        return even, odd
    return b << 4, b & -16


@triton.jit
def _bias_store(ptrs, y, b_ptr, offs_n, mask, mask_n, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _w4_mma_kernel(planes_ptr, s_ptr, xsum_ptr, w_ptr, gs_ptr, z_ptr, b_ptr, ws_ptr, count_ptr, y_ptr, M, N, K, KC,
                   group_size, chunks_per_split, splits, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ATOMIC: tl.constexpr, K_STEPS: tl.constexpr, MP: tl.constexpr, BLOCK_N: tl.constexpr,
                   CHUNK: tl.constexpr, STEP_GROUPS: tl.constexpr, ASM: tl.constexpr):
    """y[m, n] (+ bias, in y's dtype) for BLOCK_N weight rows over one K split: per chunk one pair of INT8 MMAs; a
    step covers STEP_GROUPS consecutive chunks. ATOMIC (K split): partial sums go to the zeroed float32 workspace
    ws in atomics; the tile's last program to arrive (its counter) adds the bias and writes y."""
    R: tl.constexpr = 2 * MP
    HALF: tl.constexpr = CHUNK // 2
    half = K // 2
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_first = tl.program_id(1) * chunks_per_split
    mask_n = offs_n < N
    r = tl.arange(0, R)
    row = r % MP
    valid = row < M
    part = tl.where(r < MP, 256.0 / 16.0, 1.0 / 16.0)  # hi rows weigh 256; the weights come as 16 q
    w_rows = w_ptr.to(tl.pointer_type(tl.int8)) + offs_n.to(tl.int64)[:, None] * half
    odd = planes_ptr + 2 * MP * half
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_STEPS):
        for i in tl.static_range(STEP_GROUPS):
            c = c_first + step * STEP_GROUPS + i
            in_k = (c < KC) & (c < c_first + chunks_per_split)
            offs_h = c * HALF + tl.arange(0, HALF)
            ok = (offs_h < half) & in_k
            b = tl.load(w_rows + offs_h[None, :], mask=mask_n[:, None] & ok[None, :], other=0,
                        eviction_policy="evict_first")
            pe = tl.load(planes_ptr + r[:, None] * half + offs_h[None, :], mask=valid[:, None] & ok[None, :],
                         other=0)
            po = tl.load(odd + r[:, None] * half + offs_h[None, :], mask=valid[:, None] & ok[None, :], other=0)
            w_even, w_odd = _nibbles_x16(b, ASM)
            d = tl.dot(pe, tl.trans(w_even), out_dtype=tl.int32)
            d = tl.dot(po, tl.trans(w_odd), d, out_dtype=tl.int32)
            g = (c * CHUNK) // group_size
            if HAS_ZERO:
                zp = tl.load(z_ptr + g * N + offs_n, mask=mask_n & in_k, other=0).to(tl.int32)
                xs = tl.load(xsum_ptr + r * KC + c, mask=valid & in_k, other=0)
                d -= 16 * xs[:, None] * zp[None, :]
            sx = tl.load(s_ptr + row * KC + c, mask=valid & in_k, other=0.0) * part
            gs = tl.load(gs_ptr + g * N + offs_n, mask=mask_n & in_k, other=0.0).to(tl.float32)
            acc += d.to(tl.float32) * sx[:, None] * gs[None, :]
    y = tl.sum(tl.reshape(acc, (2, MP, BLOCK_N)), axis=0)
    offs_m = tl.arange(0, MP)
    out = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(ws_ptr + out, y, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's atomics issued before the counter's release
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == splits - 1:
            tl.debug_barrier()
            total = tl.load(ws_ptr + out, mask=mask, other=0.0, cache_modifier=".cg")
            _bias_store(y_ptr + out, total, b_ptr, offs_n, mask, mask_n, HAS_BIAS)
    else:
        _bias_store(y_ptr + out, y, b_ptr, offs_n, mask, mask_n, HAS_BIAS)


def split_pairs(x2d: torch.Tensor, chunk: int, rows: int, *, wrap=identity, workspace=None):
    """(planes int8 [2, 2 * rows, K/2], scales float32 [rows, K/chunk], plane sums int32 [2 * rows, K/chunk]) of
    x [M, K], M <= rows (rows past M: zeros). `workspace`: (ws float32 [M, N], counters int32 [tiles]) to zero."""
    m, k = x2d.shape
    kc = k // chunk
    planes = torch.empty((2, 2 * rows, k // 2), dtype=torch.int8, device=x2d.device)
    scales = torch.empty((rows, kc), dtype=torch.float32, device=x2d.device)
    sums = torch.empty((2 * rows, kc), dtype=torch.int32, device=x2d.device)
    ws, counts = workspace if workspace is not None else (scales, sums)
    n, tiles = (ws.shape[1], counts.shape[0]) if workspace is not None else (0, 0)
    programs = cdiv(kc, SPLIT_CHUNKS)
    wrap(_split_pairs_kernel)[(rows, programs)](
        x2d, planes, scales, sums, ws, counts, m, n, k, kc, x2d.stride(0), tiles, MP=rows, CHUNK=chunk,
        CHUNKS=SPLIT_CHUNKS, ZERO_WS=workspace is not None, ZERO_BLOCK=ZERO_BLOCK,
        ZERO_STEPS=cdiv(cdiv(n, programs), ZERO_BLOCK), COUNT_STEPS=cdiv(tiles, ZERO_BLOCK))
    return planes, scales, sums


def launch(x2d, w_packed, w_scale, w_zero, bias, group_size: int, rows: int, *, out_dtype, wrap=identity,
           num_sms: int = 132, tile: dict | None = None) -> torch.Tensor:
    """`x2d @ dequant(W) + bias` [M, N] in out_dtype for M <= `rows` (a static bound) 16-bit rows of x, in two
    launches (split, GEMM). `chunk_for(group_size, K)` must not be None."""
    m, k = x2d.shape
    n = w_packed.shape[0]
    chunk = chunk_for(group_size, k)
    mp = padded_rows(rows)
    tile = tile or pick_tile(rows, n, num_sms)
    sg = tile["STEP_GROUPS"]
    kc = k // chunk
    tiles = cdiv(n, tile["BLOCK_N"])
    splits = 1
    while tiles * splits * 2 <= tile["waves"] * num_sms and kc // (splits * 2) >= 2 * sg:
        splits *= 2
    per = cdiv(kc, splits)
    splits = cdiv(kc, per)
    atomic = splits > 1
    workspace = ((torch.empty((m, n), dtype=torch.float32, device=x2d.device),
                  torch.empty((tiles,), dtype=torch.int32, device=x2d.device)) if atomic else None)
    planes, scales, sums = split_pairs(x2d, chunk, mp, wrap=wrap, workspace=workspace)
    ws, counts = workspace if atomic else (scales, sums)
    y = torch.empty((m, n), dtype=out_dtype, device=x2d.device)
    wrap(_w4_mma_kernel)[(tiles, splits)](
        planes, scales, sums, w_packed, w_scale, optional_arg(w_zero, w_scale), optional_arg(bias, w_scale), ws,
        counts, y, m, n, k, kc, group_size, per, splits, HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None,
        ATOMIC=atomic, K_STEPS=cdiv(per, sg), MP=mp, BLOCK_N=tile["BLOCK_N"], CHUNK=chunk, STEP_GROUPS=sg,
        ASM=USE_PTX, num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return y
