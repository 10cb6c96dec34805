#!/usr/bin/env python3
"""Choose the tile paths of the FP4 op on the GPU (`fp4_gemm.kernel.SMALL`, `MID`, `WIDE` and `LARGE_M_MIN`).

For every (K x N, M) it times side by side, as the eager op calls them (CUDA graphs with --cuda-graph; the split-K
zero fill and the cast to x's dtype included where a configuration splits K): cuBLAS bf16; our INT4 g128 op (the
issue-5 yardstick); the shipped FP4 path; dequantize + cuBLAS (`_fp4_dequant_kernel`, then `x @ W.T` and the
bias); and `_fp4_gemm_kernel` in several tile configurations (not with --no-tiles). With --planar also the op on
planar words (`planar shipped`: `kernel.ONE_DOT`, `gemv_planar.GEMV_PLANAR`) and `one_dot._fp4_one_dot_kernel` in
the tiles of `one_dot_configs`, or at M = 1 the planar GEMV in those of `gemv_planar_configs`; with --pairs those
candidates read the same words in row pairs (`format.to_row_pairs`). NVFP4 weights (--fmt mxfp4: MXFP4), bf16
x, with bias. Each candidate is checked against a float32 reference first (relative L2 error). Writes every
measurement as JSON and prints the best per cell.

    python3 tools/tune_fp4_gemm.py --cuda-graph --out tune.json [--shapes 8192x28672] [--ms 16 64 256] \
        [--planar [--pairs] [--no-tiles]]
"""
from __future__ import annotations

import json

import torch

from bench_fp4_gemm import GROUP, make_fp4, make_int4, pairs_weights, planar_weights
from gpu_timing import bench, bench_parser, check_cells, rel_errors, rotating, save_rows, set_mode, time_checked
from tune_fp8_block_w8a16 import best

from qcompile.plugins.fp4_gemm import kernel as fp4
from qcompile.plugins.fp4_gemm import one_dot as fp4_one_dot
from qcompile.plugins.fp4_gemm.gemv_planar import launch_gemv_planar
from qcompile.plugins.gemm_dispatch import bucket_for, linear_bias
from qcompile.plugins.int4_gemm.half2 import ptx_available

BLOCKS = {"nvfp4": 16, "mxfp4": 32}  # elements per block scale
# M <= 16: one row tile of 16, split-K over N tiles of 32-128 rows (shipped: 64 rows, 4 warps, 3 stages, 1 SM per
# N tile); above: 32-128 x 64-256 tiles (shipped: 64 x 128, 4 warps, 3 stages, 4 SMs per N tile).
SMALL_CONFIGS = ([dict(BLOCK_M=16, BLOCK_N=bn, num_warps=4, num_stages=st, sms_per_tile=spt)
                  for bn in (32, 64, 128) for st in (3, 4, 5) for spt in (1, 2)]
                 + [dict(BLOCK_M=16, BLOCK_N=bn, num_warps=8, num_stages=st, sms_per_tile=1)
                    for bn in (64, 128) for st in (3, 4)]
                 + [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3, sms_per_tile=spt)
                    for spt in (1, 2)])
MID_CONFIGS = ([dict(BLOCK_M=64, BLOCK_N=bn, num_warps=w, num_stages=st, sms_per_tile=spt)
                for bn in (64, 128, 256) for w in (4, 8) for st in (3, 4) for spt in (1, 2, 4)]
               + [dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3, sms_per_tile=spt) for spt in (1, 2)]
               + [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, sms_per_tile=spt) for spt in (1, 2)])


def one_dot_configs(m: int) -> list:
    """The one-dot tiles for M rows: BLOCK_M 16, 64 or 128 from M; 64 or 128 weight rows (256 at 16 rows: 3.11 sm_90
    instructions per weight against 3.55 at 128), 3 or 4 stages, 1-8 waves of programs, and 128-wide TMA tiles. At
    16 rows also deeper pipelines, 8 warps and 16 waves on the 128-wide tile: on 8192 x 28672, the one layer where
    the op is more than 10% slower than INT4's, only more waves helped (BENCHMARKS.md, twenty-seventh session). And
    INT4's own tiles: at 16 rows 64 columns for 7.5 (or 16) waves, with and without 64-wide TMA boxes; at 64 rows
    64 columns with K split for 3 resident programs per SM. Up to 64 rows the candidates finish in the kernel, as
    the shipped buckets do (`kernel.finished`)."""
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    widths = (64, 128, 256) if bm == 16 else (64, 128)
    tiles = ([dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=st, waves=wv) for bn in widths for st in (3, 4)
              for wv in (1, 2, 4, 8)]
             + [dict(BLOCK_M=bm, BLOCK_N=128, num_warps=4, num_stages=3, waves=wv, tma=dict(min_n=0))
                for wv in (2, 4, 8)])
    if bm == 16:
        tiles += [dict(BLOCK_M=16, BLOCK_N=128, num_warps=w, num_stages=st, waves=wv)
                  for w, st, wv in ((4, 5, 4), (4, 5, 8), (8, 3, 4), (8, 3, 8), (8, 4, 4), (8, 4, 8), (4, 3, 16))]
        tiles += [dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=st, waves=wv, **tma)  # INT4's 16-row tiles
                  for st in (3, 4) for wv in (7.5, 16) for tma in ({}, dict(tma=dict(min_n=0, BLOCK_N=64)))]
    if bm == 64:
        tiles += [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, waves=wv, resident=3)  # INT4's 64-row tile
                  for wv in (2, 4)]
    return tiles


def row_words_configs(m: int) -> list:
    """The shipped one-dot tile for M rows (`kernel.ONE_DOT`) reading each weight row's words 8, 16 or 32 at a
    time per step ("row_words", `one_dot.row_words_for`; 32 is a 256-K step) through pointers, and with 32 also at
    twice the waves, on the other width (64 or 128 rows of weights) and, where the bucket has a TMA tile
    (`kernel.MID_TMA`), in [BLOCK_N, 32] boxes."""
    shipped = bucket_for(fp4.ONE_DOT, m)
    base = {key: v for key, v in shipped.items() if key != "tma"}
    other = 64 if base["BLOCK_N"] == 128 else 128
    return ([dict(base, row_words=rw) for rw in (8, 16, 32)]
            + [dict(base, row_words=32, waves=2 * base["waves"]), dict(base, row_words=32, BLOCK_N=other)]
            + ([dict(shipped, row_words=32)] if "tma" in shipped else []))


def gemv_planar_configs() -> list:
    """The planar GEMV's tiles for M = 1: 2-8 weight rows, 32-128 chunks per step, a chunk per thread or two."""
    return [dict(BLOCK_N=bn, BLOCK_C=bc, num_warps=w) for bn in (2, 4, 8) for bc, w in ((32, 1), (64, 2), (128, 4))
            ] + [dict(BLOCK_N=4, BLOCK_C=128, num_warps=2), dict(BLOCK_N=8, BLOCK_C=64, num_warps=4)]


def shipped_finish(m: int) -> bool:
    """Whether the shipped one-dot bucket for M rows finishes in the kernel (`kernel.ONE_DOT`; none from
    LARGE_M_MIN rows, where dequantize + cuBLAS runs)."""
    return m < fp4.LARGE_M_MIN and bucket_for(fp4.ONE_DOT, m)["finish"]


def candidates(x, bias, weights, m: int, planar=None, tiles: bool = True, row_words: bool = False,
               words: int = 0, block: int = 16) -> dict:
    """weights() -> (w_packed, w_scale, w_global) of the next rotating copy, planar() the same as planar words (None:
    no planar candidates); tiles: also the byte layout's tile configurations; row_words: the one-dot candidates are
    `row_words_configs`, not `one_dot_configs`; words: each of `one_dot_configs` reads that many words of each
    weight row per step (its "row_words"; 0: the kernel's default); block: 16 (NVFP4) or 32 (MXFP4). Each candidate
    returns the output."""
    def shipped():
        return fp4.fp4_gemm_triton(x, *weights(), bias, block)

    def dequant():
        w_packed, w_scale, w_global = weights()
        return linear_bias(x, fp4.launch_dequant(w_packed, w_scale, w_global, block, x.dtype).t(), bias, x.dtype)

    def tile(cfg):
        return lambda: fp4.launch_gemm(x, *weights(), bias, block, cfg).to(x.dtype)

    def one_dot(cfg):
        return lambda: fp4_one_dot.launch(x, *planar(), bias, cfg, asm=ptx_available(), finish=shipped_finish(m))

    def gemv(cfg):
        return lambda: launch_gemv_planar(x, *planar(), bias, block, cfg)

    out = {"shipped": shipped, "dequant": dequant}
    if tiles:
        out.update({"tile " + json.dumps(c): tile(c) for c in (SMALL_CONFIGS if m <= 16 else MID_CONFIGS)})
    if planar is not None:
        out["planar shipped"] = lambda: fp4.fp4_gemm_triton(x, *planar(), bias, block)
        if m == 1:
            out.update({"gemv_planar " + json.dumps(c): gemv(c) for c in gemv_planar_configs()})
        else:
            configs = row_words_configs(m) if row_words else [dict(c, row_words=words) if words else c
                                                              for c in one_dot_configs(m)]
            out.update({"one_dot " + json.dumps(c): one_dot(c) for c in configs})
    return out


def make_case(k: int, n: int, m: int, fmt: str):
    """(x bf16 [m, k], bias, `fmt` weights, float32 reference of the op)."""
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight

    torch.manual_seed(k + n + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    w = make_fp4(fmt, k, n)
    return x, bias, w, x.float() @ dequantize_weight(*w, BLOCKS[fmt]).t().float() + bias.float()


def check_chunk(task):
    """Worker: compile and check candidates `names` of one (K, N, M) cell."""
    k, n, m, names, row_words, words, pairs, fmt = task
    x, bias, w, ref = make_case(k, n, m, fmt)
    wp = (pairs_weights if pairs else planar_weights)(w)
    return rel_errors(candidates(x, bias, lambda: w, m, lambda: wp, row_words=row_words, words=words,
                                 block=BLOCKS[fmt]), names, ref)


def main() -> None:
    from qcompile.plugins.int4_gemm import register as register_int4

    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--planar", action="store_true", help="also the op on planar words: one-dot tiles, or GEMV "
                    "tiles at M = 1")
    ap.add_argument("--no-tiles", action="store_true", help="leave out the byte layout's tile configurations")
    ap.add_argument("--row-words", action="store_true", help="with --planar: the shipped one-dot tiles reading 8, "
                    "16 or 32 words of each weight row a step (`row_words_configs`) instead of the tile sweep")
    ap.add_argument("--words", type=int, default=0, choices=(0, 8, 16, 32), help="with --planar: every one-dot "
                    "candidate of the tile sweep reads this many words of each weight row a step (0: the default, 8)")
    ap.add_argument("--pairs", action="store_true", help="with --planar: the planar candidates on row pairs")
    ap.add_argument("--fmt", choices=tuple(BLOCKS), default="nvfp4")
    ap.set_defaults(ms=[16, 64, 256])
    args = ap.parse_args()
    set_mode(args)
    int4_op = register_int4()
    cells = [(int(s.split("x")[0]), int(s.split("x")[1]), m) for s in args.shapes for m in args.ms]
    tiles = not args.no_tiles
    planar_names = (lambda: None) if args.planar else None  # names only: the candidates are not called here
    checked = check_cells(cells, lambda m: candidates(None, None, None, m, planar_names, tiles, args.row_words,
                                                      args.words),
                          check_chunk, args.workers, extra=(args.row_words, args.words, args.pairs, args.fmt))
    print("compiled and checked", sum(len(v) for v in checked.values()), "candidates", flush=True)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.bfloat16), k * n * 2)
        w4 = rotating(lambda: make_int4(k, n), k * n // 2)
        wf = rotating(lambda: make_fp4(args.fmt, k, n), k * n // 2)
        layout = pairs_weights if args.pairs else planar_weights
        wp = rotating(lambda: layout(make_fp4(args.fmt, k, n)), k * n // 2) if args.planar else None
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            row = {"K": k, "N": n, "M": m, "bf16": bench(lambda: x @ w16(), copies=4),
                   "int4_op": bench(lambda: int4_op(x, *w4(), None, bias, GROUP), copies=4),
                   args.fmt: time_checked(candidates(x, bias, wf, m, wp, tiles, args.row_words, args.words,
                                                     BLOCKS[args.fmt]), checked[(k, n, m)])}
            rows.append(row)
            name, us = best(row[args.fmt])
            shipped = row[args.fmt]["shipped"].get("us", float("nan"))
            print(f"{k}x{n} M={m}: bf16 {row['bf16']:.1f} int4 {row['int4_op']:.1f} | best {us:.1f} "
                  f"(int4/fp4 {row['int4_op'] / us:.2f}) {name} | shipped {shipped:.1f} "
                  f"({row['int4_op'] / shipped:.2f}) | dequant {row[args.fmt]['dequant'].get('us', float('nan')):.1f}",
                  flush=True)
            save_rows(args.out, rows)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
