"""The one-row INT4 GEMV on tensor cores: `mma.sync` m16n8k16 with the weight as the 16-row operand (CUDA only).

The fp16x2 GEMV (`gemv._int4_gemv_kernel`) multiplies every pair of weights on the fp16x2 units: about 3 SASS
instructions per weight, which holds it below HBM's rate at one row. Here the tensor cores multiply, so what is
left per weight is decoding it:
- The MMA's A operand is a 16 x 16 tile of W^T (16 output columns by 16 K). Lane (g, c) = (lane // 4, lane % 4)
  holds rows g and g + 8 at K 2c, 2c + 1 and 2c + 8, 2c + 9 of each 16-K tile, as fp16 pairs of adjacent K.
- A planar word (`format.py`) of column n and word row kw holds the pairs of adjacent K at 64 (kw // 8) +
  2 (kw % 8) + 16 j (nibbles j and j + 4). So the 4 words of rows 8b + c and 8b + c + 4 in columns g and g + 8 are
  exactly lane (g, c)'s A registers for the 4 K tiles of the 64-K block b: no shuffle, each word decoded where it
  is loaded (one LOP3 and one HSUB2/HFMA2 per pair, as in `half2.dot8`: the nibble in 1024.0's mantissa).
- B (16 K x 8) holds x in all 8 columns: lane (g, c) loads x's pairs at K 2c and 2c + 8 of each tile as int32 words
  (x 4-byte aligned, checked in the kernel), else as two fp16 each. Every column of D is then `W^T x`; lane (g, c)
  keeps D[g][2c] and D[g + 8][2c].
- Products are exact and sums fp32 (the MMA's accumulator): x needs no scaling.
- Each 64-K block's sums are scaled by the block's group scale in fp32; K is split across programs as the GEMV
  splits it, partial sums meeting in fp32 atomics.

Which lane holds which element is the hardware's: every value that feeds the MMA is computed from the thread's own
`%tid.x` (`mma_lanes.thread_index`), never from Triton's element index, so the kernel is correct whatever register
layout Triton gives its [32 * num_warps] tensors. fp16 x only (the decode is fp16's), planar words, no zero points.

1.9 SASS instructions per weight, against the fp16x2 GEMV's 3.05. Opt-in (a GEMV bucket's "mma" key), not shipped:
on the H100 it reads the down projection's weight from L2 26% faster than the fp16x2 GEMV, but from HBM no faster,
and the decode step lost (BENCHMARKS.md, forty-second session). The H200 is still to time. Decoding the weights as
fp16 subnormals instead (one LOP3 a pair, the offset taken off by an MMA chain of x's sums: 1.57 instructions per
weight) was slower on the H100 on the two wide decode layers, and from L2 on the down projection (commit a25309b;
BENCHMARKS.md, forty-sixth session).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import address_aligned, cdiv, split_for_waves, split_k_outputs, whole_tiles
from qcompile.plugins.int4_gemm.format import is_planar
from qcompile.plugins.mma_lanes import half_pair, load_live, thread_index
from qcompile.plugins.triton_tiles import store_tile

BLOCK_K = 64  # K per block: one planar block of 8 word rows, 4 MMA K tiles


@triton.jit
def _block_mma(w_a, w_b, w_c, w_d, x0, x1, x2, x3, x4, x5, x6, x7):
    """(D[g][2c], D[g + 8][2c]) of one 64-K block: the 4 words of lane (g, c) (rows c, c + 4 of the block in columns
    g, g + 8: w_a = (c, g), w_b = (c, g + 8), w_c = (c + 4, g), w_d = (c + 4, g + 8)), decoded into the A registers of
    the block's 4 K tiles, times x's pairs (x0, x1: K 2c and 2c + 8 of tile 0, ...), in 4 chained MMAs from zero."""
    return tl.inline_asm_elementwise(
        "{ "
        ".reg .b32 c0, c1, s16, m72, a0, a1, a2, a3, wa, wb, wc, wd; "
        ".reg .f32 e0, e1, e2, e3; "
        "mov.b32 c0, 0x64086408; "  # 1032 in each half: 1024 + (q + 8) - 1032 = q
        "mov.b32 c1, 0x64806480; "  # 1152: 1024 + 16 (q + 8) for the nibble 4 bits up
        "mov.b32 s16, 0x2C002C00; "  # 1 / 16
        "mov.b32 m72, 0xD480D480; "  # -72: (1152 + 16 q) / 16 - 72 = q
        "mov.f32 e0, 0f00000000; mov.f32 e1, 0f00000000; mov.f32 e2, 0f00000000; mov.f32 e3, 0f00000000; "
        # K tile 0: nibbles 0, 4
        "lop3.b32 a0, $2, 0x000F000F, c0, 0x6a; sub.f16x2 a0, a0, c0; "
        "lop3.b32 a1, $3, 0x000F000F, c0, 0x6a; sub.f16x2 a1, a1, c0; "
        "lop3.b32 a2, $4, 0x000F000F, c0, 0x6a; sub.f16x2 a2, a2, c0; "
        "lop3.b32 a3, $5, 0x000F000F, c0, 0x6a; sub.f16x2 a3, a3, c0; "
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {e0, e1, e2, e3}, {a0, a1, a2, a3}, {$6, $7}, "
        "{e0, e1, e2, e3}; "
        # K tile 1: nibbles 1, 5
        "lop3.b32 a0, $2, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a0, a0, s16, m72; "
        "lop3.b32 a1, $3, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a1, a1, s16, m72; "
        "lop3.b32 a2, $4, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a2, a2, s16, m72; "
        "lop3.b32 a3, $5, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a3, a3, s16, m72; "
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {e0, e1, e2, e3}, {a0, a1, a2, a3}, {$8, $9}, "
        "{e0, e1, e2, e3}; "
        "shr.u32 wa, $2, 8; shr.u32 wb, $3, 8; shr.u32 wc, $4, 8; shr.u32 wd, $5, 8; "
        # K tile 2: nibbles 2, 6
        "lop3.b32 a0, wa, 0x000F000F, c0, 0x6a; sub.f16x2 a0, a0, c0; "
        "lop3.b32 a1, wb, 0x000F000F, c0, 0x6a; sub.f16x2 a1, a1, c0; "
        "lop3.b32 a2, wc, 0x000F000F, c0, 0x6a; sub.f16x2 a2, a2, c0; "
        "lop3.b32 a3, wd, 0x000F000F, c0, 0x6a; sub.f16x2 a3, a3, c0; "
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {e0, e1, e2, e3}, {a0, a1, a2, a3}, {$10, $11}, "
        "{e0, e1, e2, e3}; "
        # K tile 3: nibbles 3, 7
        "lop3.b32 a0, wa, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a0, a0, s16, m72; "
        "lop3.b32 a1, wb, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a1, a1, s16, m72; "
        "lop3.b32 a2, wc, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a2, a2, s16, m72; "
        "lop3.b32 a3, wd, 0x00F000F0, c1, 0x6a; fma.rn.f16x2 a3, a3, s16, m72; "
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {e0, e1, e2, e3}, {a0, a1, a2, a3}, {$12, $13}, "
        "{e0, e1, e2, e3}; "
        "mov.f32 $0, e0; mov.f32 $1, e2; "
        "} ",  # LOP3 0x6a: (a & b) ^ c
        "=f,=f,r,r,r,r,r,r,r,r,r,r,r,r",
        [w_a, w_b, w_c, w_d, x0, x1, x2, x3, x4, x5, x6, x7], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _x_pairs(x_at, live, X32: tl.constexpr, EVEN: tl.constexpr):
    """x's fp16 pairs at K k, k + 8, k + 16, ..., k + 56 of lane (g, c)'s block, k = 64 b + 2c: x_at points at k as
    int32 words (X32: x's row 4-byte aligned), else at k as fp16 (two loads a pair); 0 where not live."""
    if X32:
        return (load_live(x_at, live, EVEN), load_live(x_at + 4, live, EVEN), load_live(x_at + 8, live, EVEN),
                load_live(x_at + 12, live, EVEN), load_live(x_at + 16, live, EVEN), load_live(x_at + 20, live, EVEN),
                load_live(x_at + 24, live, EVEN), load_live(x_at + 28, live, EVEN))
    return (half_pair(load_live(x_at, live, EVEN), load_live(x_at + 1, live, EVEN)),
            half_pair(load_live(x_at + 8, live, EVEN), load_live(x_at + 9, live, EVEN)),
            half_pair(load_live(x_at + 16, live, EVEN), load_live(x_at + 17, live, EVEN)),
            half_pair(load_live(x_at + 24, live, EVEN), load_live(x_at + 25, live, EVEN)),
            half_pair(load_live(x_at + 32, live, EVEN), load_live(x_at + 33, live, EVEN)),
            half_pair(load_live(x_at + 40, live, EVEN), load_live(x_at + 41, live, EVEN)),
            half_pair(load_live(x_at + 48, live, EVEN), load_live(x_at + 49, live, EVEN)),
            half_pair(load_live(x_at + 56, live, EVEN), load_live(x_at + 57, live, EVEN)))


@triton.jit
def _tile_words(w_at, N, live, EVEN: tl.constexpr, PAIRED: tl.constexpr):
    """Lane (g, c)'s 4 words of a block in one 16-column tile (`_block_mma`'s w_a .. w_d); w_at points at word row
    8b + c, the column of row g (0 where not live: decodes to weights 0). PAIRED: rows g and g + 8 are adjacent
    columns, loaded as one int64 per word row; else 8 columns apart."""
    if PAIRED:
        lo = load_live(w_at.to(tl.pointer_type(tl.int64), bitcast=True), live, EVEN)
        hi = load_live((w_at + 4 * N).to(tl.pointer_type(tl.int64), bitcast=True), live, EVEN)
        return lo.to(tl.int32), (lo >> 32).to(tl.int32), hi.to(tl.int32), (hi >> 32).to(tl.int32)
    return (load_live(w_at, live, EVEN), load_live(w_at + 8, live, EVEN), load_live(w_at + 4 * N, live, EVEN),
            load_live(w_at + 4 * N + 8, live, EVEN))


@triton.jit
def _warp_words(w_at, N, live, EVEN: tl.constexpr, PAIRED: tl.constexpr):
    """The words of a block in the warp's 4 tiles (`_tile_words` each), w_at at tile 0."""
    return (_tile_words(w_at, N, live, EVEN, PAIRED), _tile_words(w_at + 16, N, live, EVEN, PAIRED),
            _tile_words(w_at + 32, N, live, EVEN, PAIRED), _tile_words(w_at + 48, N, live, EVEN, PAIRED))


@triton.jit
def _tile_sums(acc, w, xs, s_at, live, EVEN: tl.constexpr, PAIRED: tl.constexpr):
    """acc (rows g, g + 8 of a tile) plus one block's sums (the tile's words w, x's pairs xs), times the block's group
    scales at s_at (column g)."""
    d_lo, d_hi = _block_mma(w[0], w[1], w[2], w[3], xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7])
    return (acc[0] + d_lo * load_live(s_at, live, EVEN).to(tl.float32),
            acc[1] + d_hi * load_live(s_at + (1 if PAIRED else 8), live, EVEN).to(tl.float32))


@triton.jit
def _warp_sums(accs, words, x_at, s_at, k, N, K, warp_live, GROUP_BLOCKS: tl.constexpr, X32: tl.constexpr,
               EVEN: tl.constexpr, PAIRED: tl.constexpr):
    """The warp's 4 tiles' sums plus the block at K k (its words, x at x_at, scale row of k's group at s_at + row N)."""
    live = warp_live & (k < K)
    xs = _x_pairs(x_at, live, X32, EVEN)
    s_row = s_at + ((k // 64) // GROUP_BLOCKS) * N if GROUP_BLOCKS else s_at
    return (_tile_sums(accs[0], words[0], xs, s_row, live, EVEN, PAIRED),
            _tile_sums(accs[1], words[1], xs, s_row + 16, live, EVEN, PAIRED),
            _tile_sums(accs[2], words[2], xs, s_row + 32, live, EVEN, PAIRED),
            _tile_sums(accs[3], words[3], xs, s_row + 48, live, EVEN, PAIRED))


@triton.jit
def _gemv_mma_loop(x_at, w_at, s_at, N, K, k0, warp_live, BLOCKS: tl.constexpr, GROUP_BLOCKS: tl.constexpr,
                   X32: tl.constexpr, EVEN: tl.constexpr, PAIRED: tl.constexpr):
    """The sums of a warp's 4 tiles (rows g, g + 8 of each) over BLOCKS 64-K blocks from k0 (x_at, w_at at k0,
    tile 0; s_at at tile 0's column g of scale row 0). GROUP_BLOCKS: 64-K blocks a group (0: one group, per
    channel). Each block's words are loaded a block ahead. EVEN (every warp's columns inside N, the splits covering
    K exactly): no load is masked, and the last block's look-ahead reads that block again (not past the weight).
    (Two blocks ahead, or Triton's cp.async pipeline, were slower: BENCHMARKS.md, forty-second session.)"""
    z = tl.zeros(warp_live.shape, dtype=tl.float32)
    accs = ((z, z), (z, z), (z, z), (z, z))
    words = _warp_words(w_at, N, warp_live & (k0 < K), EVEN, PAIRED)
    for i in range(BLOCKS):
        k = k0 + i * 64
        w_at += tl.where(i + 1 < BLOCKS, 8 * N, 0) if EVEN else 8 * N
        nxt = _warp_words(w_at, N, warp_live & (k + 64 < K) & (i + 1 < BLOCKS), EVEN, PAIRED)
        accs = _warp_sums(accs, words, x_at, s_at, k, N, K, warp_live, GROUP_BLOCKS, X32, EVEN, PAIRED)
        x_at += 32 if X32 else 64
        words = nxt
    return accs


@triton.jit
def _int4_gemv_mma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, k_per_split,
                          BLOCKS: tl.constexpr, GROUP_BLOCKS: tl.constexpr, WARPS: tl.constexpr,
                          ATOMIC: tl.constexpr, EVEN: tl.constexpr = False, PAIRED: tl.constexpr = False):
    """y[row, the program's WARPS x 64 columns] (+)= the sums over the program's K split (BLOCKS 64-K blocks;
    ATOMIC: added to the zeroed y): each warp 4 tiles of 16 columns (N a multiple of 64). num_warps = WARPS."""
    tid = thread_index(tl.zeros((32 * WARPS,), dtype=tl.int32))
    lane = tid % 32
    c = lane % 4
    n0 = (tl.program_id(0) * WARPS + tid // 32) * 64
    n = n0 + (2 if PAIRED else 1) * (lane // 4)  # tile row g's column (row g + 8's: n + 1, or n + 8)
    warp_live = n0 < N
    row = tl.program_id(2)
    x_row = x_ptr + row * stride_xm
    k0 = tl.program_id(1) * k_per_split
    w_at = w_ptr + (k0 // 8 + c).to(tl.int64) * N + n
    if x_row.to(tl.int64) % 4 == 0:
        x_at = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + k0 // 2 + c
        accs = _gemv_mma_loop(x_at, w_at, s_ptr + n, N, K, k0, warp_live, BLOCKS, GROUP_BLOCKS, True, EVEN, PAIRED)
    else:
        accs = _gemv_mma_loop(x_row + k0 + 2 * c, w_at, s_ptr + n, N, K, k0, warp_live, BLOCKS, GROUP_BLOCKS,
                              False, EVEN, PAIRED)
    y_at = y_ptr + row * N + n
    out = warp_live & (c == 0)
    for t in tl.static_range(4):
        store_tile(y_at + 16 * t, accs[t][0], out, ATOMIC)
        store_tile(y_at + 16 * t + (1 if PAIRED else 8), accs[t][1], out, ATOMIC)


def applies(x2d, w_zero, k: int, n: int, group_size: int) -> bool:
    """Whether the MMA GEMV can take the call: fp16 x, planar words (K and the group multiples of 64), no zero
    points, N a multiple of 64 (a warp's 4 tiles)."""
    return x2d.dtype == torch.float16 and w_zero is None and is_planar(k, group_size) and n % 64 == 0


def launch(x2d, w_packed, w_scale, group_size: int, cfg: dict, *, wrap, num_sms: int) -> torch.Tensor:
    """fp32 `x2d @ dequant(W)` [M, N] (`applies` holds): one program column per row of x, cfg["warps"] warps of 64
    columns a program, K split for cfg["waves"] waves of programs (zeroed y and atomics when split); cfg["paired"]:
    a tile's two rows in adjacent columns, each lane's two words of a word row one int64 load (where w_packed is
    8-byte aligned, `address_aligned`: every row of an [K / 8, N % 64 == 0] weight is when its allocation is)."""
    m, k = x2d.shape
    n = w_packed.shape[1]
    warps = cfg["warps"]
    tiles = cdiv(n, 64 * warps)
    splits, per = split_for_waves(k, tiles, BLOCK_K, cfg["waves"], num_sms)
    y, _ = split_k_outputs(m, n, splits, 0, torch.float32, x2d.device, False)
    wrap(_int4_gemv_mma_kernel)[(tiles, splits, m)](
        x2d, w_packed, w_scale, y, n, k, x2d.stride(0), per, BLOCKS=per // BLOCK_K,
        GROUP_BLOCKS=0 if group_size == k else group_size // BLOCK_K, WARPS=warps, ATOMIC=splits > 1,
        EVEN=whole_tiles(n, 64 * warps, splits, per, k),
        PAIRED=cfg.get("paired", False) and address_aligned(w_packed, 8), num_warps=warps, num_stages=1)
    return y
