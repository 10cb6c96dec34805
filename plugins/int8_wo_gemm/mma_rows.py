"""W8A16 at up to 16 rows of fp16 x on the fp16 tensor cores, the int8 weight decoded in registers (CUDA only).

The row GEMV (`gemv._row_gemv_kernel`) multiplies every weight on the CUDA cores in fp32 (integer ops, a
subtraction and an FMA per weight), and the 16-row kernels convert weights for `tl.dot` through Triton's layouts.
Here `mma.sync` m16n8k16 multiplies, with 16 weight rows as the 16-row operand A and up to 8 rows of x as B (a
second MMA on the same A for rows 8-15), so what is left per weight is decoding it:
- Lane (g, c) = (lane // 4, lane % 4) loads rows g and g + 8 of its 16-row tile at K 8c .. 8c + 7 and 32 + 8c ..
  32 + 8c + 7 of each 64-K block (two int64 loads a row: the 4 lanes of a row read 32 contiguous bytes per load).
  Its word kt (4 bytes, 4 consecutive K) becomes its A registers of MMA K tile kt. A K tile's 16 K are then not
  consecutive, but each is held by the same lanes c in A and in B, and the sum over K does not care about order.
- A word becomes two fp16 pairs exactly in 5 instructions (`_fp16_pairs`): XOR 0x80 per byte (q + 128), PRMT under
  the fp16 exponent of 1024 (1024 + q + 128, ulp 1), subtract 1152.
- B: lane (g, c) loads x's row g (8 + g for the second MMA) at the same K as its weight words, as int64 (two fp16
  pairs) where x is 8-byte aligned (checked in the kernel), else as fp16 values.
- Products are exact and sums fp32 (the MMA's accumulator), over the whole of K: the per-row weight scale and the
  bias are applied once, at the end, and the output written in x's dtype. One launch, no atomics.
- A program is WARPS warps on one 16-row tile, warp w taking the 64-K blocks w, w + WARPS, ...; a step's blocks
  (cfg "blocks") and their x are loaded a step ahead, each block with accumulators of its own. At the end the
  warps' sums meet in one reduction per accumulator (`_warp_sum`; every value that feeds the MMA is computed from the
  thread's `%tid.x`, `mma_lanes`, so the kernel holds whatever layout Triton picks).

fp16 x only (B would need bf16 weights, and int8 has no exact bf16 trick of this kind), K a multiple of 64, the
weight 8-byte aligned (`applies`). 2.53 sm_90 instructions per weight at one MMA group (`tools/diag/sass_count.py`).

Opt-in (`kernel.MMA_ROWS`), not shipped: on the H100 it beat the shipped paths on one of the eight kernel-target
cells (4096 x 14336 at one row, 4%) and was 7-21% slower on the others (BENCHMARKS.md, forty-third session).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import address_aligned, cdiv, identity, optional_arg, whole_tiles
from qcompile.plugins.mma_lanes import half_pair, load_live, mma_f16, thread_index
from qcompile.plugins.triton_tiles import jit_any_m

BLOCK_K = 64  # K per block: 4 MMA K tiles, 16 bytes of each of a lane's two rows


@triton.jit
def _fp16_pairs(word):
    """(bytes 0-1, bytes 2-3) of an int32 word of four int8 weights as two fp16 pairs, exactly."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 w8u, w8e, w8m, w8t0, w8t1; "
        "xor.b32 w8u, $2, 0x80808080; "  # q + 128 in each byte
        "mov.b32 w8e, 0x64646464; mov.b32 w8m, 0x64806480; "  # 0x64XX: the fp16 1024 + XX; 1152 in each half
        "prmt.b32 w8t0, w8u, w8e, 0x4140; prmt.b32 w8t1, w8u, w8e, 0x4342; "
        "sub.f16x2 $0, w8t0, w8m; sub.f16x2 $1, w8t1, w8m; }",
        "=r,=r,r", [word], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _row_words(at, live, EVEN: tl.constexpr):
    """A lane's 4 int32 words of one weight row in a 64-K block (int64 loads at `at`, its K 8c, and at + 32; EVEN:
    unmasked)."""
    lo = load_live(at.to(tl.pointer_type(tl.int64), bitcast=True), live, EVEN)
    hi = load_live((at + 32).to(tl.pointer_type(tl.int64), bitcast=True), live, EVEN)
    return lo.to(tl.int32), (lo >> 32).to(tl.int32), hi.to(tl.int32), (hi >> 32).to(tl.int32)


@triton.jit
def _x_words(x_at, live, X64: tl.constexpr):
    """x's fp16 pairs at the K of a lane's weight words in a block, in MMA order (K tile kt: b0, b1): x_at points at
    K 8c as int64 (two pairs; X64: x 8-byte aligned), else as fp16; 0 where not live."""
    if X64:
        p0 = tl.load(x_at, mask=live, other=0)
        p1 = tl.load(x_at + 1, mask=live, other=0)
        p2 = tl.load(x_at + 8, mask=live, other=0)
        p3 = tl.load(x_at + 9, mask=live, other=0)
        return (p0.to(tl.int32), (p0 >> 32).to(tl.int32), p1.to(tl.int32), (p1 >> 32).to(tl.int32),
                p2.to(tl.int32), (p2 >> 32).to(tl.int32), p3.to(tl.int32), (p3 >> 32).to(tl.int32))
    return (half_pair(tl.load(x_at, mask=live, other=0), tl.load(x_at + 1, mask=live, other=0)),
            half_pair(tl.load(x_at + 2, mask=live, other=0), tl.load(x_at + 3, mask=live, other=0)),
            half_pair(tl.load(x_at + 4, mask=live, other=0), tl.load(x_at + 5, mask=live, other=0)),
            half_pair(tl.load(x_at + 6, mask=live, other=0), tl.load(x_at + 7, mask=live, other=0)),
            half_pair(tl.load(x_at + 32, mask=live, other=0), tl.load(x_at + 33, mask=live, other=0)),
            half_pair(tl.load(x_at + 34, mask=live, other=0), tl.load(x_at + 35, mask=live, other=0)),
            half_pair(tl.load(x_at + 36, mask=live, other=0), tl.load(x_at + 37, mask=live, other=0)),
            half_pair(tl.load(x_at + 38, mask=live, other=0), tl.load(x_at + 39, mask=live, other=0)))


@triton.jit
def _block_mmas(acc, a, xs):
    """acc (4 accumulators) plus one block: the 4 K tiles' MMAs on the decoded A registers a and x's pairs xs."""
    e0, e1, e2, e3 = acc
    for kt in tl.static_range(4):
        e0, e1, e2, e3 = mma_f16(a[4 * kt], a[4 * kt + 1], a[4 * kt + 2], a[4 * kt + 3], xs[2 * kt], xs[2 * kt + 1],
                                 e0, e1, e2, e3)
    return e0, e1, e2, e3


@triton.jit
def _decode(wg, wh):
    """A registers of a block's 4 K tiles from the words of rows g (wg) and g + 8 (wh): (g, 2c..), (g + 8, 2c..),
    (g, 2c + 8..), (g + 8, 2c + 8..) per tile, in the order of `mma_lanes.mma_f16`."""
    g0, g1 = _fp16_pairs(wg[0])
    h0, h1 = _fp16_pairs(wh[0])
    g2, g3 = _fp16_pairs(wg[1])
    h2, h3 = _fp16_pairs(wh[1])
    g4, g5 = _fp16_pairs(wg[2])
    h4, h5 = _fp16_pairs(wh[2])
    g6, g7 = _fp16_pairs(wg[3])
    h6, h7 = _fp16_pairs(wh[3])
    return (g0, h0, g1, h1, g2, h2, g3, h3, g4, h4, g5, h5, g6, h6, g7, h7)


@triton.jit
def _block_loads(w_g, w_h, x_at0, x_at1, blk, live_g, live_h, x_live0, x_live1, KB, X64: tl.constexpr,
                 TWO: tl.constexpr, EVEN: tl.constexpr):
    """What block `blk` (of 64 K) needs: the words of rows g and g + 8 and x's pairs of rows g (and 8 + g with TWO),
    the pointers at block 0; masked past KB unless EVEN."""
    on = blk < KB
    wg = _row_words(w_g + blk * 64, live_g & on, EVEN)
    wh = _row_words(w_h + blk * 64, live_h & on, EVEN)
    x_step = 16 if X64 else 64  # a block of x in x_at's elements
    xs0 = _x_words(x_at0 + blk * x_step, x_live0 & on, X64)
    xs1 = _x_words(x_at1 + blk * x_step, x_live1 & on, X64) if TWO else xs0
    return wg, wh, xs0, xs1


@triton.jit
def _step_loads(w_g, w_h, x_at0, x_at1, blk, live_g, live_h, x_live0, x_live1, KB, WARPS: tl.constexpr,
                U: tl.constexpr, X64: tl.constexpr, TWO: tl.constexpr, EVEN: tl.constexpr):
    """`_block_loads` of a step's U blocks blk, blk + WARPS, ... (a tuple)."""
    loads = ()
    for u in tl.static_range(U):
        loads = loads + (_block_loads(w_g, w_h, x_at0, x_at1, blk + u * WARPS, live_g, live_h, x_live0, x_live1, KB,
                                      X64, TWO, EVEN),)
    return loads


@triton.jit
def _loop(x_at0, x_at1, x_live0, x_live1, w_g, w_h, live_g, live_h, warp, KB, STEPS: tl.constexpr,
          WARPS: tl.constexpr, U: tl.constexpr, X64: tl.constexpr, TWO: tl.constexpr, EVEN: tl.constexpr):
    """The accumulators of x's rows g (and 8 + g with TWO) over the warp's blocks warp, warp + WARPS, ... of KB, in
    STEPS steps of U blocks (x_at*, w_* at block 0). Each step's words and x are loaded a step ahead, and each of
    its U blocks has its own accumulators (no MMA waits on another block's). EVEN (16 | N, every warp STEPS * U
    blocks): no load is masked, and the last step's look-ahead loads that step again (not past the weight)."""
    z = tl.zeros(warp.shape, dtype=tl.float32)
    accs = ()
    for u in tl.static_range(U):
        accs = accs + (((z, z, z, z), (z, z, z, z)),)
    blk = warp
    loads = _step_loads(w_g, w_h, x_at0, x_at1, blk, live_g, live_h, x_live0, x_live1, KB, WARPS, U, X64, TWO, EVEN)
    for i in range(STEPS):
        if EVEN:
            blk = tl.where(i + 1 < STEPS, blk + U * WARPS, blk)
        else:
            blk += U * WARPS
        nxt = _step_loads(w_g, w_h, x_at0, x_at1, blk, live_g, live_h, x_live0, x_live1, KB, WARPS, U, X64, TWO,
                          EVEN)
        new = ()
        for u in tl.static_range(U):
            wg, wh, xs0, xs1 = loads[u]
            a = _decode(wg, wh)
            acc0 = _block_mmas(accs[u][0], a, xs0)
            acc1 = _block_mmas(accs[u][1], a, xs1) if TWO else accs[u][1]
            new = new + ((acc0, acc1),)
        accs = new
        loads = nxt
    acc0 = accs[0][0]
    acc1 = accs[0][1]
    for u in tl.static_range(1, U):
        acc0 = (acc0[0] + accs[u][0][0], acc0[1] + accs[u][0][1], acc0[2] + accs[u][0][2], acc0[3] + accs[u][0][3])
        acc1 = (acc1[0] + accs[u][1][0], acc1[1] + accs[u][1][1], acc1[2] + accs[u][1][2], acc1[3] + accs[u][1][3])
    return acc0, acc1


@triton.jit
def _warp_sum(v, lane, in_order, WARPS: tl.constexpr):
    """[32]: the sum over the warps of v's value in each lane. in_order (thread i holds element i, as Triton lays out
    a [32 * WARPS] tensor on WARPS warps): one reduction of v as [WARPS, 32]; else a masked sum over every element,
    which holds for any layout."""
    if in_order:
        total = tl.sum(tl.reshape(v, (WARPS, 32)), axis=0)
    else:
        total = tl.sum(tl.where(tl.arange(0, 32)[:, None] == lane[None, :], v[None, :], 0.0), axis=1)
    return total


@triton.jit
def _store_group(acc, lane, in_order, n0, m0, M, N, s_ptr, b_ptr, y_ptr, WARPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ONE_ROW: tl.constexpr):
    """y[m, n] = scale[n] * (the warps' summed accumulators) + bias[n] for one MMA group (x's rows m0 .. m0 + 7):
    accumulator e of lane (g, c) is row n0 + g + 8 (e // 2) of the weight and row m0 + 2c + e % 2 of x. ONE_ROW:
    only x's row 0 (e = 0, 2)."""
    lanes = tl.arange(0, 32)
    for e in tl.static_range(0, 4, 2 if ONE_ROW else 1):
        total = _warp_sum(acc[e], lane, in_order, WARPS)
        n = n0 + lanes // 4 + 8 * (e // 2)
        m = m0 + 2 * (lanes % 4) + e % 2
        ok = (n < N) & (m < M)
        y = total * tl.load(s_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty), mask=ok)


@jit_any_m
def _w8_mma_rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, STEPS: tl.constexpr,
                        WARPS: tl.constexpr, U: tl.constexpr, TWO: tl.constexpr, ONE_ROW: tl.constexpr,
                        HAS_BIAS: tl.constexpr, EVEN: tl.constexpr = False):
    """y [M, N] (x's dtype) = x @ (scale * q)^T + bias for one 16-row tile of the [N, K] int8 weight per program, M <=
    8 (TWO: <= 16); WARPS warps split K in 64-K blocks, STEPS steps of U blocks each (the last ones masked past
    K)."""
    tid = thread_index(tl.zeros((32 * WARPS,), dtype=tl.int32))
    lane = tid % 32
    warp = tid // 32
    g = lane // 4
    c = lane % 4
    n0 = tl.program_id(0) * 16
    KB = K // 64
    w_g = w_ptr + (n0 + g).to(tl.int64) * K + 8 * c
    w_h = w_g + 8 * K
    live_g = n0 + g < N
    live_h = n0 + g + 8 < N
    x_row0 = x_ptr + g * stride_xm
    x_row1 = x_row0 + 8 * stride_xm
    if (x_ptr.to(tl.int64) % 8 == 0) & (stride_xm % 4 == 0):  # x's pairs load as int64 (engines' x always)
        acc0, acc1 = _loop(x_row0.to(tl.pointer_type(tl.int64), bitcast=True) + 2 * c,
                           x_row1.to(tl.pointer_type(tl.int64), bitcast=True) + 2 * c, g < M, g + 8 < M,
                           w_g, w_h, live_g, live_h, warp, KB, STEPS, WARPS, U, True, TWO, EVEN)
    else:
        acc0, acc1 = _loop(x_row0 + 8 * c, x_row1 + 8 * c, g < M, g + 8 < M,
                           w_g, w_h, live_g, live_h, warp, KB, STEPS, WARPS, U, False, TWO, EVEN)
    in_order = tl.sum((tid != tl.arange(0, 32 * WARPS)).to(tl.int32), axis=0) == 0
    _store_group(acc0, lane, in_order, n0, 0, M, N, s_ptr, b_ptr, y_ptr, WARPS, HAS_BIAS, ONE_ROW)
    if TWO:
        _store_group(acc1, lane, in_order, n0, 8, M, N, s_ptr, b_ptr, y_ptr, WARPS, HAS_BIAS, ONE_ROW)


def applies(x2d, w_q) -> bool:
    """Whether the kernel can take the call: fp16 x, K a multiple of 64, the weight 8-byte aligned
    (`address_aligned`)."""
    k = w_q.shape[1]
    return (x2d.dtype == torch.float16 and k % BLOCK_K == 0
            and address_aligned(w_q, 8))


def launch(x2d, w_q, w_scale, bias, *, cfg: dict, rows: int, wrap=identity) -> torch.Tensor:
    """`x2d @ dequant(w_q)^T + bias` in x.dtype for at most `rows` (<= 16) rows of x (`applies` holds): one program
    per 16 weight rows on cfg["warps"] warps, each warp cfg["blocks"] (default 1) 64-K blocks per step."""
    m, k = x2d.shape
    n = w_q.shape[0]
    warps, per_step = cfg["warps"], cfg.get("blocks", 1)
    steps = cdiv(k // BLOCK_K, warps * per_step)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    wrap(_w8_mma_rows_kernel)[(cdiv(n, 16),)](
        x2d, w_q, w_scale, optional_arg(bias, w_scale), y, m, n, k, x2d.stride(0),
        STEPS=steps, WARPS=warps, U=per_step, TWO=rows > 8, ONE_ROW=rows == 1, HAS_BIAS=bias is not None,
        EVEN=whole_tiles(n, 16, warps * per_step, steps * BLOCK_K, k), num_warps=warps, num_stages=1)
    return y
