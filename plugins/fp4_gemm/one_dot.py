"""FP4 (NVFP4 / MXFP4) on the tensor cores, one MMA per 128-K step, from planar words (Triton, CUDA only; imported
lazily). The INT4 one-dot design (`int4_gemm/one_dot.py`) for FP4: each decoded pair is already the (k, k + 1)
register pair of the MMA's first operand, so the four 16-K tiles of a 64-K block and the two blocks of a step are
joined in registers into one [BLOCK_N, 128] operand, with no layout conversion through shared memory (the byte
layout's tile kernel, `kernel._fp4_gemm_kernel`, converts each tile there). Swapped operands: `y^T = W x^T`.

Weights: planar words [N, K/8] (`format.to_planar_words`), a row's 64 K in 32 contiguous bytes; decoding and the
block-scale multipliers: `planar.py`. K must be a multiple of 128 (a row's scales of one step are one 8- or 4-byte
load). Each copy reads "row_words" words of each row (`row_words_for`): 8 (a 64-K block), 16 (a 128-K step) or 32
(128 bytes: the loop then steps 256 K, two dots a step), split into blocks in registers (`_halves`, no shared-memory
conversion in the sm_90 SASS). Pointers are formed once and a step adds scalars; whole tiles and splits (`EVEN`)
load without masks. With `tma` in the configuration x and the words load through host TMA descriptors ([BLOCK_M,
64] and [BLOCK_N, row_words] boxes; zero fill past M, N and K), as INT4's `one_dot.use_tma` decides. On row pairs
(`format.to_row_pairs`, PAIRED) a pair's two 16-word runs of a step are adjacent: a step's copies cover 128 contiguous
bytes per pair, through pointers or [BLOCK_N / 2, 1, 2, 16] boxes.

This kernel began as a probe (twenty-fourth session, `git show 36f33dc:tools/diag/fp4_one_dot_probe.py`): sm_90 SASS
of the main loop 3.55 instructions per weight at 16 rows and 3.52 at 64 (128-wide tiles, NVFP4, bf16), against 6.53
and 5.95 for the byte layout's tile kernel and 2.95 and 3.47 for INT4's TMA tiles. On the H200 (BENCHMARKS.md,
twenty-sixth session) the op on it ran 1.07-1.61x faster than on the byte tiles at 16-128 rows, and the TMA tile
13-14% faster still at 17-64 rows on layers with K >= 8192, where it runs (`kernel.MID_TMA`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from qcompile.plugins.fp4_gemm.format import is_row_pairs, weight_nk
from qcompile.plugins.fp4_gemm.planar import PAIR_ACC_SHIFT, pair_row_offset, step_multipliers, tile16
from qcompile.plugins.gemm_dispatch import (DEFAULT_SMS, cdiv, identity, optional_arg, split_for_waves, split_k_outputs,
                                            whole_tiles)
from qcompile.plugins.int4_gemm.one_dot import _cat_k, use_tma, with_tma_tile
from qcompile.plugins.triton_tiles import (finish_swapped_tile, jit_any_m, load_tile, load_xt_rows, store_tile,
                                           xt_columns)

STEP = 128  # K per step: one MMA (a literal in the kernels, which read no Python globals)


@triton.jit
def _block64(words, m0, m1, m2, m3, BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, 64] weights (times 2**-X) of a 64-K block from its 8 words of each row [BLOCK_N, 8], 16-K tile j
    times m_j."""
    return _cat_k(_cat_k(tile16(words, 0, m0, BLOCK_N, dt, ASM), tile16(words, 1, m1, BLOCK_N, dt, ASM), BLOCK_N, 16),
                  _cat_k(tile16(words, 2, m2, BLOCK_N, dt, ASM), tile16(words, 3, m3, BLOCK_N, dt, ASM), BLOCK_N, 16),
                  BLOCK_N, 32)


@triton.jit
def _row_words(w_src, unit, ok, WORDS: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
               PAIRED: tl.constexpr = False):
    """[BLOCK_N, WORDS] words of each row from word unit * WORDS (K unit * 8 * WORDS): a 64-K block's 8, a 128-K
    step's 16 or a 256-K step's 32. w_src: the pointers of each row's first WORDS words, or with TMA the words'
    descriptor ([BLOCK_N, WORDS] boxes). PAIRED (row pairs [N/2, K/128, 2, 16], `format.to_row_pairs`; WORDS 16,
    a row's run of a step): a pair's step is 32 words, and the boxes are [BLOCK_N / 2, 1, 2, 16], a pair's two rows
    adjacent as in the tile."""
    if PAIRED:
        tl.static_assert(WORDS == 16, "row pairs are read a 128-K step at a time")
        if TMA:
            words = tl.reshape(w_src.load([tl.program_id(0) * (BLOCK_N // 2), unit, 0, 0]), (BLOCK_N, WORDS))
        else:
            words = load_tile(w_src + unit * 32, ok[:, None], EVEN, True)
    elif TMA:
        words = w_src.load([tl.program_id(0) * BLOCK_N, unit * WORDS])
    else:
        words = load_tile(w_src + unit * WORDS, ok[:, None], EVEN, True)
    return words


@triton.jit
def _halves(words, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """words [BLOCK_N, WIDTH] as its first and second halves of columns (registers only: `_cat_k` undone)."""
    return tl.split(tl.reshape(words, (BLOCK_N, 2, WIDTH // 2)).permute(0, 2, 1))


@triton.jit
def _dot128(x_src, w0, w1, s_rows, k0, ok, K, acc, MX: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """acc plus the 128-K step at k0 from its two blocks' words w0, w1 [BLOCK_N, 8]: joined into one dot with
    x^T [128, BLOCK_M] (pointers), or with TMA one dot per block with x^T from its [BLOCK_M, 64] box."""
    m0, m1, m2, m3, m4, m5, m6, m7 = step_multipliers(s_rows, k0 // 128, ok, not EVEN, MX, dt == tl.float16, ASM)
    a = _block64(w0, m0, m1, m2, m3, BLOCK_N, dt, ASM)
    if TMA:
        acc = tl.dot(a, tl.trans(x_src.load([tl.program_id(2) * BLOCK_M, k0])), acc)
    a1 = _block64(w1, m4, m5, m6, m7, BLOCK_N, dt, ASM)
    if TMA:
        acc = tl.dot(a1, tl.trans(x_src.load([tl.program_id(2) * BLOCK_M, k0 + 64])), acc)
    else:
        acc = tl.dot(_cat_k(a, a1, BLOCK_N, 64), load_xt_rows(x_src, k0, K, EVEN, 128), acc)
    return acc


@triton.jit
def _step(x_src, w_src, s_rows, k0, mask_n, K, acc, MX: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
          ROW_WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
          PAIRED: tl.constexpr = False):
    """acc plus the step at k0: 128 K, or 256 with ROW_WORDS 32. The words of each row come ROW_WORDS at a time
    (`_row_words`; 8: a copy per 64-K block; 16: the 128-K step's 64 bytes; 32: the 256-K step's 128 bytes, two
    `_dot128`), split into blocks in registers. Past N or K (a split's last steps) words and scales load as 0."""
    if TMA:
        dt: tl.constexpr = x_src.dtype
    else:
        dt: tl.constexpr = x_src.dtype.element_ty
    ok = mask_n & (k0 < K)  # the scales load through pointers with TMA too: masked unless EVEN
    if ROW_WORDS == 8:
        acc = _dot128(x_src, _row_words(w_src, k0 // 64, ok, 8, EVEN, TMA, BLOCK_N, PAIRED),
                      _row_words(w_src, k0 // 64 + 1, ok, 8, EVEN, TMA, BLOCK_N, PAIRED), s_rows, k0, ok, K, acc, MX,
                      EVEN, TMA, BLOCK_M, BLOCK_N, dt, ASM)
    elif ROW_WORDS == 16:
        w0, w1 = _halves(_row_words(w_src, k0 // 128, ok, 16, EVEN, TMA, BLOCK_N, PAIRED), BLOCK_N, 16)
        acc = _dot128(x_src, w0, w1, s_rows, k0, ok, K, acc, MX, EVEN, TMA, BLOCK_M, BLOCK_N, dt, ASM)
    else:
        lo, hi = _halves(_row_words(w_src, k0 // 256, ok, 32, EVEN, TMA, BLOCK_N), BLOCK_N, 32)
        w0, w1 = _halves(lo, BLOCK_N, 16)
        acc = _dot128(x_src, w0, w1, s_rows, k0, ok, K, acc, MX, EVEN, TMA, BLOCK_M, BLOCK_N, dt, ASM)
        w2, w3 = _halves(hi, BLOCK_N, 16)
        acc = _dot128(x_src, w2, w3, s_rows, k0 + 128, ok, K, acc, MX, EVEN, TMA, BLOCK_M, BLOCK_N, dt, ASM)
    return acc


@jit_any_m
def _fp4_one_dot_kernel(x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, out_ptr, M, N, K, stride_xm, k_per_split,
                        K_STEPS: tl.constexpr, MX: tl.constexpr, POW_ACC: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                        HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, ATOMIC: tl.constexpr,
                        ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        FINISH: tl.constexpr = False, ROW_WORDS: tl.constexpr = 8, PAIRED: tl.constexpr = False):
    """y [M, N] (or its split-K part) from K_STEPS steps of 128 K (256 with ROW_WORDS 32: `_step`), the first
    peeled off the loop (one accumulator, wgmmas in flight across steps); grid (N tiles, K splits, M tiles). The
    accumulator is multiplied by POW_ACC (2**X) and NVFP4's global scale, the bias added by the first split. x's
    rows past M wrap (`xt_columns`) or, with TMA (x_ptr, w_ptr: descriptors), load as 0. FINISH: out_ptr gets
    `y + bias` in its dtype from `finish_swapped_tile` (split K: y_ptr is the zeroed fp32 accumulator [M, N], then
    one count per tile). PAIRED: the words are row pairs (`format.to_row_pairs`)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    k_lo = tl.program_id(1) * k_per_split
    if TMA:
        x_src = x_ptr
        w_src = w_ptr
    else:
        x_src = xt_columns(x_ptr, offs_m, M, stride_xm, 128)
        # the row stride K / 8 words written K // 128 * 16 (K % 128 == 0 here): provably a multiple of 16 words,
        # so the words copy 16 bytes at a time (LDGSTS.E.BYPASS.128), not 8: up to 18% faster at 16 and 64 rows
        # (H100; benchmarks/sass_fp4_one_dot_word_loads_s49.txt, fp4_int4_gemm-new-stride-h100_s50.log)
        if PAIRED:
            w_src = w_ptr + pair_row_offset(offs_n.to(tl.int64), K)[:, None] + tl.arange(0, ROW_WORDS)[None, :]
        else:
            w_src = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 128 * 16) + tl.arange(0, ROW_WORDS)[None, :]
    s_type: tl.constexpr = tl.int32 if MX else tl.int64
    s_rows = s_ptr.to(tl.pointer_type(s_type)) + offs_n.to(tl.int64) * (K // 128)
    STEP_K: tl.constexpr = 256 if ROW_WORDS == 32 else 128
    acc = _step(x_src, w_src, s_rows, k_lo, mask_n, K, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), MX, EVEN, TMA,
                ROW_WORDS, BLOCK_M, BLOCK_N, ASM, PAIRED)
    for step in range(1, K_STEPS):
        acc = _step(x_src, w_src, s_rows, k_lo + step * STEP_K, mask_n, K, acc, MX, EVEN, TMA, ROW_WORDS, BLOCK_M,
                    BLOCK_N, ASM, PAIRED)
    acc = acc * POW_ACC
    if HAS_GLOBAL:
        acc = acc * tl.load(g_ptr)
    at = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    mask = (offs_m < M)[None, :] & mask_n[:, None]
    if FINISH:
        finish_swapped_tile(acc, at, mask, offs_m, offs_n, M, N, y_ptr, out_ptr, b_ptr, ATOMIC, HAS_BIAS)
    else:
        if HAS_BIAS:  # added once: by the first K split
            acc += tl.load(b_ptr + offs_n, mask=mask_n & (tl.program_id(1) == 0), other=0.0).to(tl.float32)[:, None]
        store_tile(y_ptr + at, acc, mask, ATOMIC)


def supports(x_dtype: torch.dtype, k: int) -> bool:
    """Whether this kernel takes the call: 16-bit x and K a multiple of the step (planar words)."""
    return x_dtype in (torch.float16, torch.bfloat16) and k % STEP == 0


def step_k(row_words: int) -> int:
    """K per loop step of `_fp4_one_dot_kernel` (its STEP_K): 256 when it reads 32 words of each row, else STEP."""
    return 2 * STEP if row_words == 32 else STEP


def row_words_for(cfg: dict, k: int, pairs: bool = False) -> int:
    """Words of each weight row one copy reads per step: cfg's "row_words" (8, the default: one copy per 64-K block;
    16: the 128-K step's 64 bytes; 32: 128 bytes, a 256-K step, which needs K a multiple of 256 and falls back to 16
    otherwise). Row pairs (`pairs`) read each row's 16-word run of a step, whatever the setting. With TMA, the
    words' box is [BLOCK_N, row_words] ([BLOCK_N / 2, 1, 2, 16] on row pairs)."""
    words = cfg.get("row_words", 8)
    if words not in (8, 16, 32):
        raise ValueError(f"one-dot FP4 kernel: row_words must be 8, 16 or 32 (got {words})")
    return 16 if pairs or (words == 32 and k % step_k(32)) else words


def launch(x2d, words, w_scale, w_global, bias, cfg: dict, *, asm: bool, finish: bool = False, wrap=identity,
           num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """`x2d @ dequant(W).T (+ bias)` [M, N] with `_fp4_one_dot_kernel`: fp32 when split-K (atomics; the bias already
    added), else x2d.dtype; x2d.dtype either way with `finish` (the kernel writes it, `finish_split_tile`).
    cfg: BLOCK_M, BLOCK_N, num_warps, num_stages, waves and resident (`split_for_waves`), optionally row_words
    (`row_words_for`) and tma (`int4_gemm.one_dot.use_tma`: {"min_n": ...}; "on_pairs": False keeps row pairs on
    pointers; its other keys override the tile's)."""
    m, k = x2d.shape
    n = weight_nk(words)[0]
    pairs = is_row_pairs(words)
    if not supports(x2d.dtype, k):
        raise ValueError(f"one-dot FP4 kernel: needs fp16/bf16 x and K a multiple of {STEP} (got {x2d.dtype}, K = {k})")
    mx = w_scale.dtype == torch.uint8
    if pairs and not cfg.get("tma", {}).get("on_pairs", True):
        cfg = {key: v for key, v in cfg.items() if key != "tma"}
    tma = use_tma(cfg, x2d, n, x2d.device.type == "cpu")
    x_src, w_src = x2d, words
    if tma:
        cfg = with_tma_tile(cfg)
    row_words = row_words_for(cfg, k, pairs)
    if tma:
        x_src = TensorDescriptor.from_tensor(x2d, [cfg["BLOCK_M"], 64])
        box = [cfg["BLOCK_N"] // 2, 1, 2, row_words] if pairs else [cfg["BLOCK_N"], row_words]  # pairs: both rows
        w_src = TensorDescriptor.from_tensor(words, box)
    tiles_n = cdiv(n, cfg["BLOCK_N"])
    splits, per = split_for_waves(k, tiles_n, step_k(row_words), cfg["waves"], num_sms, cfg.get("resident", 0))
    tiles_m = cdiv(m, cfg["BLOCK_M"])
    y, out = split_k_outputs(m, n, splits, tiles_m * tiles_n, x2d.dtype, x2d.device, finish)
    wrap(_fp4_one_dot_kernel)[(tiles_n, splits, tiles_m)](
        x_src, w_src, w_scale, optional_arg(w_global, w_scale), optional_arg(bias, x2d), y, optional_arg(out, x2d),
        m, n, k, x2d.stride(0),
        per, K_STEPS=per // step_k(row_words), MX=mx, POW_ACC=2.0 ** PAIR_ACC_SHIFT[mx, x2d.dtype],
        HAS_GLOBAL=w_global is not None,
        HAS_BIAS=bias is not None, EVEN=whole_tiles(n, cfg["BLOCK_N"], splits, per, k), TMA=tma, ATOMIC=splits > 1,
        ASM=asm, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FINISH=finish, ROW_WORDS=row_words, PAIRED=pairs,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out if finish else y
