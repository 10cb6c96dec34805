#!/usr/bin/env python3
"""Choose the small-M paths of the W8A16 op on the GPU (`int8_wo_gemm.gemv.GEMV` and `kernel.DOT`).

For every (K x N, M) it times side by side, as an engine calls them (CUDA graphs with --cuda-graph; a split-K
zero fill and epilogue included where a configuration splits K): cuBLAS bf16; the shipped path of the op; the
row dot kernel (M <= 16) and, at M = 1, the row GEMV in several configurations; with `--kinds dot-warps` row dot
tiles with one warp per 16 weight rows or x as the MMA's first operand (`DOT_WARPS_CONFIGS`); with `--kinds
dot-finish` the row dot tile with K split and finished in the kernel (`DOT_FINISH_CONFIGS`); with `--kinds
dot-parts` the row dot tile with each step as alternating dots into two accumulators; with `--kinds dot-wide`
64- and 128-row tiles on 8 and 16 warps with K split (`DOT_WIDE_CONFIGS`); with `--kinds dot-ldsm` row dot
tiles whose x comes through ldmatrix ("x_ldmatrix", `DOT_LDSM_CONFIGS`); with `--kinds mma`
the INT8 tensor-core path (`split_mma`) in tiles from 16 to 128 rows; with `--kinds mma-rows` (fp16 x) the fp16
tensor-core kernel of `mma_rows` on 2-8 warps, 1-4 blocks a step; with `--kinds gemv-prmt` the GEMV with and
without its byte permutes ("prmt"); with `--kinds gemv-dp4a` the GEMV on x's int8 planes with dp4a
(`DP4A_GEMV_CONFIGS`). Each candidate is checked against a float32 reference first (relative L2
error). x is bf16 unless `--dtype fp16`; the baseline is cuBLAS bf16 either way (on x in bf16). Writes every
measurement as JSON and prints the best per cell.

    python3 tools/tune_w8a16_small_m.py --cuda-graph --out tune.json [--shapes 8192x28672] [--ms 1 16]
        [--kinds dot dot-warps dot-finish dot-parts dot-wide dot-ldsm gemv gemv-long gemv-prmt gemv-dp4a mma
                 mma-rows]
        [--dtype fp16]
"""
from __future__ import annotations

import json
import os

import torch

from gpu_timing import bench, bench_parser, check_cells, rel_errors, rotating, save_rows, set_mode, time_checked
from tune_fp8_block_w8a16 import best

from qcompile.plugins.int8_wo_gemm import gemv as w8_gemv, kernel as w8, mma_rows, split_mma

# around the first sweep's winners (GEMV: 8 rows x 256-512 words on 4 warps, no prefetch; dot: 32 rows x 256 K,
# 3-5 stages), with num_stages for the GEMV
GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w, num_stages=st, PREFETCH=False)
                for bn in (4, 8, 16) for bkw in (256, 512) for w in (4, 8) for st in (1, 2, 3)]
# the GEMV's loop as tl.range(num_stages=pipeline): words staged through shared memory with asynchronous copies
# (num_stages alone changes nothing: Triton pipelines no load of a loop without a dot)
GEMV_CONFIGS += [dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=4, num_stages=1, PREFETCH=False, pipeline=pipe)
                 for bn in (8, 16) for bkw in (256, 512) for pipe in (2, 3, 4)]
# gemv-long: 1024-2048 words per step (a whole K = 4096 row in one step: all of a program's loads in flight at
# once; at M = 1 the mid-size layers ran at 2.9 TB/s against 3.8 TB/s on 8192 x 28672)
LONG_GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w, num_stages=st, PREFETCH=False)
                     for bn in (4, 8) for bkw in (1024, 2048) for w in (4, 8) for st in (1, 2)]
# gemv-prmt (fifty-sixth session): the GEMV's bytes as floats by a byte permute each (5.27 sm_90 instructions per
# weight against 6.25; `tools/diag/sass_count.py w8a16_row_gemv_prmt`), with and without it on the shipped tiles and
# their neighbours. H100 (benchmarks/tune_w8a16_prmt-h100_s57.json): faster on 21 of the 24 pairs (by more than
# 0.5%), slower on 1; on in GEMV since the fifty-seventh session
PRMT_GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=4, num_stages=2, PREFETCH=False, prmt=prmt)
                     for bn in (4, 8, 16) for bkw in (256, 512) for prmt in (False, True)]
# gemv-dp4a (fifty-seventh session; on the H100 not faster than gemv-prmt, fifty-eighth session): x split into int8
# planes per 256 k and multiplied with dp4a ("dp4a", `gemv._row_gemv_step_dp4a`; `split_mma`'s rounding of x): 2.27
# sm_90 instructions per weight for 32 rows x 128 words on 4 warps, 2.96 for 16 x 256, 4.41 for 8 x 256 (x's planes are
# made per program: wider tiles share them)
DP4A_GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w, num_stages=1, PREFETCH=False, dp4a=True, group=4)
                     for bn, bkw, w in ((8, 256, 4), (16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 8),
                                        (64, 64, 4), (16, 512, 8))]
DOT_CONFIGS = ([dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=st, waves=1) for st in (3, 4, 5, 6)]
               + [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, waves=1)
                  for bn, bk in ((16, 512), (32, 512), (64, 256)) for st in (3, 4)]
               # wider tiles on 8 warps, more K per step: none beat 32 x 256 on 4 warps by more than 2% at M = 16
               # (benchmarks/tune_w8a16_small_m_8warps.json)
               + [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=8, num_stages=st, waves=1)
                  for bn, bk in ((64, 256), (64, 512), (128, 256), (32, 1024)) for st in (3, 4)])
# dot-warps (twenty-fourth session): with x's 16 rows as the MMA's second operand, Triton splits a 32-row tile's 4
# warps 2 x 2, so two warps convert each weight to bf16 (sm_90 loop: 5.89 instructions per weight;
# `tools/diag/sass_count.py`). Candidates: one warp per 16 weight rows (3.66 on 2 warps), or x as the first
# operand (`plain`: 4.59 on 4 warps, 3.97 for 64 x 256), with the K split for 1 and 2 waves (more, smaller
# programs for the narrow layers). Timed on the H100 in the fifty-seventh session
# (benchmarks/tune_w8a16_dot_warps-h100_s57c.json): `plain` on DOT's tile won, and DOT sets it; one-warp tiles lost.
DOT_WARPS_CONFIGS = ([dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=bn // 16, num_stages=st, waves=wv)
                      for bn, bk in ((16, 256), (32, 256), (32, 512)) for st in (4, 6) for wv in (1, 2)]
                     + [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, waves=wv, plain=True)
                        for bn, bk, st in ((32, 256, 4), (32, 256, 5), (64, 256, 4), (64, 128, 5), (128, 256, 3))
                        for wv in (1, 2)])
# dot-finish (fifty-seventh session; on the H100 behind DOT on 4096 x 4096, fifty-eighth session): K split for 2-4 waves
# with each tile finished by its last split ("finish": no epilogue kernels after the row dot kernel, only the zero fill
# before it). Unfinished, a split K lost to one wave on 4096 x 4096 at M = 16 (H100: 16.6-16.7 µs against 12.4,
# benchmarks/tune_w8a16_dot_warps-h100_s57c.json), where one wave gives each SM one program of 4 warps; also 16-row
# tiles (twice the programs, no split)
DOT_FINISH_CONFIGS = ([dict(w8.DOT, num_stages=st, waves=wv, finish=True) for st in (4, 5, 6) for wv in (2, 4)]
                      + [dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=st, waves=wv, plain=True, finish=True)
                         for st in (4, 6) for wv in (1, 2)])
# dot-parts (fifty-eighth session): DOT's tile with each K step as dots of part_k K summed alternately into two
# accumulators (`_row_dot_kernel`'s PART_K), so a warp's MMAs form two chains ptxas interleaves instead of one of 16
# (sm_90: 348 instructions per step for part_k 32 against 294; an in-order issue model with 33-cycle HMMAs gives 434
# cycles a step against 575). H100, 16 rows (benchmarks/tune_w8a16-parts-m16-h100_s59.json): no faster than DOT
# (part_k 64: 12.8 µs on 4096 x 4096, 29.6 on 14336 x 4096), 16 and 32 slower in proportion to their instructions
DOT_PARTS_CONFIGS = [dict(w8.DOT, part_k=pk, num_stages=st) for pk in (16, 32, 64) for st in (4, 5, 6)]
# dot-wide (fifty-ninth session): x first ("plain") on 64- and 128-row tiles over 8 and 16 warps, so each warp has
# DOT's work a step (sm_90: 296 and 298 instructions against 294), with K split in 2 and 4 ("waves" 1 on
# N = 4096) to keep DOT's 128 programs. Each program then reads x for half or a quarter of K (every DOT program
# reads all of it: at 16 rows as many bytes as its weight), and 2 or 4 warps share a scheduler; the split's partial
# sums meet in atomics (with "finish", finished in the kernel). H100 at 16 rows: 14.1 µs against DOT's 12.7 on
# 4096 x 4096; finished, 28.9 against split_mma's 31.1 on 14336 x 4096 (benchmarks/tune_w8a16-wide-m16-h100_s59.json)
DOT_WIDE_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=256, num_warps=bn // 8, num_stages=st, waves=1, plain=True, **fin)
                    for bn, stages in ((64, (3, 4, 5)), (128, (2, 3, 4))) for st in stages
                    for fin in ({}, {"finish": True})]
# dot-ldsm (sixtieth session): the row dot tiles with "x_ldmatrix" (the weight converted in impure inline PTX, so
# Triton gives both MMA operands 16-bit fragments and loads x with ldmatrix): sm_90 loop of DOT's tile 249
# instructions a step against 294 with bf16 x, 217 against 332 with fp16 (`sass_count.py w8a16_row_dot_plain_ldsm`);
# also x second (250), 64-row tiles (426 for twice the weights) and K split finished in the kernel. H100
# (benchmarks/tune_w8a16-ldsm-h100_s60.json): every one slower than the shipped op on every cell (4096 x 4096 at 16
# rows: 14.3 µs at best, x second, against 12.5), fp16 x and back-to-back timing alike
DOT_LDSM_CONFIGS = ([dict(w8.DOT, num_stages=st, x_ldmatrix=True) for st in (4, 5, 6)]
                    + [dict(w8.DOT, plain=False, x_ldmatrix=True),
                       dict(w8.DOT, waves=2, finish=True, x_ldmatrix=True),
                       dict(w8.DOT, waves=4, finish=True, x_ldmatrix=True)]
                    + [dict(BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=st, waves=wv, plain=True, x_ldmatrix=True,
                            **fin) for st in (4, 5) for wv, fin in ((1, {}), (2, {"finish": True}))])
# the INT8 tensor-core path in tiles from 16 to 128 rows (narrower ones give N = 4096 more programs). The first
# run (commit 2f737b2, benchmarks/tune_w8a16_small_m_mma.json) also had a FUSED variant, each MMA program splitting
# x itself instead of the split kernel: it tied at M = 1 and was 1.5-4.8x slower at M = 16, and was removed.
MMA_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st)
               for bn in (16, 32, 64, 128) for bk in (128, 256) for st in (3, 4)]
# wide tiles with split K (`splits`): the 16-64-row tiles above give narrow layers more programs but few bytes in
# flight each (14336 x 4096 at M = 16: 2.0 TB/s with 32 rows), where 128 x 256 tiles streamed 8192 x 28672 at 3.6
MMA_CONFIGS += [dict(BLOCK_N=bn, BLOCK_K=256, num_warps=4, num_stages=st, splits=sp)
                for bn, st in ((128, 3), (64, 4)) for sp in (2, 4, 8)]

# the fp16 tensor-core kernel (`mma_rows`, fp16 x only): one 16-row tile per program, K split over its warps, each
# warp `blocks` 64-K blocks a step (loaded a step ahead)
MMA_ROWS_CONFIGS = [dict(warps=w, blocks=b) for w in (2, 4, 8) for b in (1, 2, 4)]

KINDS = ("dot", "dot-warps", "dot-finish", "dot-parts", "dot-wide", "dot-ldsm", "gemv", "gemv-long", "gemv-prmt",
         "gemv-dp4a", "mma", "mma-rows")
KINDS_ENV = "QCOMPILE_TUNE8_KINDS"  # --kinds, seen by the spawned check workers too
DTYPE_ENV = "QCOMPILE_TUNE8_DTYPE"  # --dtype, likewise


def x_dtype() -> torch.dtype:
    """x's dtype (--dtype, through the environment so the spawned check workers see it)."""
    return getattr(torch, os.environ.get(DTYPE_ENV, "bfloat16"))


def candidates(x, weights, m: int) -> dict:
    """weights() -> (w_q [N, K], w_scale) of the next rotating copy; each candidate returns the op's output."""
    def shipped():
        return w8.int8_wo_gemm_triton(x, *weights(), None)

    def dot(cfg):
        return lambda: w8.launch_dot(x, *weights(), None, cfg)

    def gemv(cfg):
        return lambda: w8_gemv.launch_gemv(x, *weights(), None, cfg)

    def mma(cfg):
        return lambda: split_mma.launch(x, *weights(), None, cfg, rows=1 if m == 1 else w8.SMALL_M_MAX)

    kinds = os.environ.get(KINDS_ENV, "dot gemv").split()
    out = {"shipped": shipped}
    for kind, configs in (("dot", DOT_CONFIGS), ("dot-warps", DOT_WARPS_CONFIGS), ("dot-finish", DOT_FINISH_CONFIGS),
                          ("dot-parts", DOT_PARTS_CONFIGS), ("dot-wide", DOT_WIDE_CONFIGS),
                          ("dot-ldsm", DOT_LDSM_CONFIGS)):
        if kind in kinds:
            out.update({"dot " + json.dumps(c): dot(c) for c in configs})
    if m == 1:
        for kind, configs in (("gemv", GEMV_CONFIGS), ("gemv-long", LONG_GEMV_CONFIGS),
                              ("gemv-prmt", PRMT_GEMV_CONFIGS), ("gemv-dp4a", DP4A_GEMV_CONFIGS)):
            if kind in kinds:
                out.update({"gemv " + json.dumps(c): gemv(c) for c in configs})
    if "mma" in kinds:
        out.update({"mma " + json.dumps(c): mma(c) for c in MMA_CONFIGS})
    if "mma-rows" in kinds and x.dtype == torch.float16:
        out.update({"mma-rows " + json.dumps(c): (lambda c=c: mma_rows.launch(
            x, *weights(), None, cfg=c, rows=1 if m == 1 else w8.SMALL_M_MAX))
            for c in MMA_ROWS_CONFIGS})
    return out


def make_case(k: int, n: int, m: int):
    """(x [m, k] (bf16, or --dtype), int8 weight [n, k], scales [n], float32 reference of the op)."""
    g = torch.Generator(device="cuda").manual_seed(k + n + m)
    w_q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-3
    x = torch.randn(m, k, device="cuda", dtype=x_dtype(), generator=g)
    return x, w_q, w_scale, x.float() @ (w_q.float() * w_scale[:, None]).t()


def check_chunk(task):
    """Worker: compile and check candidates `names` of one (K, N, M) cell."""
    k, n, m, names = task
    x, w_q, w_scale, ref = make_case(k, n, m)
    return rel_errors(candidates(x, lambda: (w_q, w_scale), m), names, ref)


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--kinds", nargs="*", choices=KINDS, default=["dot", "gemv"],
                    help="candidate families: row dot tiles, M = 1 GEMVs (gemv-long: 1024-2048 words per step), "
                         "INT8 tensor-core tiles")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "bf16", "fp16"], default="bfloat16",
                    help="x's dtype (mma-rows takes fp16 only)")
    ap.set_defaults(ms=[1, 16])
    args = ap.parse_args()
    set_mode(args)
    os.environ[KINDS_ENV] = " ".join(args.kinds)
    os.environ[DTYPE_ENV] = {"bf16": "bfloat16", "fp16": "float16"}.get(args.dtype, args.dtype)
    cells = [(int(s.split("x")[0]), int(s.split("x")[1]), m) for s in args.shapes for m in args.ms]
    checked = check_cells(cells, lambda m: candidates(torch.empty(m, 1, dtype=x_dtype()), None, m), check_chunk,
                          args.workers, parts=3)
    print("compiled and checked", sum(len(v) for v in checked.values()), "candidates", flush=True)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w_q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        w_scale = torch.rand(n, device="cuda") * 0.01 + 1e-3
        w16 = (w_q.float() * w_scale[:, None]).t().contiguous().to(torch.bfloat16)
        # equal copies at different addresses, rotated so small M reads HBM, not L2
        copies = rotating(lambda: (w16.clone(), w_q.clone(), w_scale.clone()), k * n * 3)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=x_dtype())
            xb = x.to(torch.bfloat16)
            row = {"K": k, "N": n, "M": m, "dtype": str(x.dtype), "bf16": bench(lambda: xb @ copies()[0], copies=4),
                   "w8a16": time_checked(candidates(x, lambda: copies()[1:], m), checked[(k, n, m)])}
            rows.append(row)
            name, us = best(row["w8a16"])
            shipped = row["w8a16"]["shipped"].get("us", float("nan"))
            families = {key.split()[0] for key in row["w8a16"]} - {"shipped"}
            per_family = {f: best({key: v for key, v in row["w8a16"].items() if key.startswith(f + " ")})
                          for f in sorted(families)}
            print(f"{k}x{n} M={m}: bf16 {row['bf16']:.1f} | best {us:.1f} ({row['bf16'] / us:.2f}x) {name} | "
                  f"shipped {shipped:.1f} ({row['bf16'] / shipped:.2f}x)"
                  + "".join(f" | best {f} {u:.1f} {c}" for f, (c, u) in per_family.items()), flush=True)
            save_rows(args.out, rows)
        copies = None  # the rotating weights freed before the next shape
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
