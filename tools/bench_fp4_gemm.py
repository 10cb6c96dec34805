#!/usr/bin/env python3
"""GPU benchmark of `qcompile::fp4_gemm` (NVFP4 / MXFP4 weight-only) against cuBLAS bf16 and our INT4 g128 op, for
the issue-5 targets (FP4 within 10% of our INT4 kernel at M <= 256, >= 0.95x bf16 at M >= 1024).

For each (K x N, M) of reference/kernel-targets.md it times, with `triton.testing.do_bench` (median):
  bf16      cuBLAS bf16 `x @ w` (w [K, N])
  int4_op   `torch.ops.qcompile.int4_groupwise_gemm`, symmetric int4 g128 (whatever kernel it currently runs)
  nvfp4_op  `torch.ops.qcompile.fp4_gemm`, NVFP4 (E4M3 scale per 16 + FP32 global)
  mxfp4_op  `torch.ops.qcompile.fp4_gemm`, MXFP4 (E8M0 scale per 32)
all with bias, bf16 in/out. --fp4-planar adds nvfp4_planar_op and mxfp4_planar_op: the FP4 op on the same weights
as planar words (`format.to_planar_words`: the one-dot kernel at 1-128 rows), with int4/<fmt>_planar and
<fmt>/<fmt>_planar (> 1: planar faster); --fp4-pairs (with --fp4-planar) also <fmt>_pairs_op, the same words in
row pairs (`format.to_row_pairs`, CUDA engines' layout "pairs"), with int4/<fmt>_pairs and <fmt>_planar/<fmt>_pairs
(> 1: row pairs faster). --int4-pointers adds int4_ptr_op: the INT4 op without its TMA tiles
(`kernel.pointer_tiles`), timed in the same cell, and int4_ptr/int4 (> 1: the TMA tiles faster); --int4-unfinished
adds int4_unfinished_op: the INT4 op without the cast and bias in its one-dot kernels (fp32 sums, then a cast;
`kernel.finished`), and int4_unfinished/int4 (> 1: finishing in the kernel, as shipped, faster);
--int4-tma-min-n overrides the TMA tiles' smallest N for int4_op. Each output is checked against a float32
reference of the same weights (`rel%_*`: relative L2 error in percent, on one weight copy). Weights are rotated
over several copies so small-M runs read HBM, not L2. Ops are compiled (torch.compile, static shapes, one compile
per M) or eager with --eager; --cuda-graph times GPU work only. Prints the table with the ratios int4/fp4
(>= 0.9: FP4 within 10% of INT4) and bf16/fp4 (> 1: FP4 faster than bf16), writes JSON to --out.

    LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 tools/bench_fp4_gemm.py --eager --cuda-graph --out b.json
"""
from __future__ import annotations

import torch

from gpu_timing import bench, bench_parser, rotating, sweep, write_results
from int4_tiles import int4_tiles
from kernel_variants import KERNEL_VARIANTS

from qcompile.plugins.fp4_gemm import register as register_fp4
from qcompile.plugins.int4_gemm import register as register_int4

GROUP = 128
FP4 = {"nvfp4": 16, "mxfp4": 32}  # format -> block size


def make_int4(k: int, n: int, device: str = "cuda"):
    from qcompile.plugins.int4_gemm.format import to_engine

    q = torch.randint(-8, 8, (k, n), device=device, dtype=torch.int8)
    scale = (torch.rand(k // GROUP, n, device=device) * 0.01 + 1e-3).to(torch.bfloat16)
    return to_engine(q, GROUP), scale


def make_fp4(fmt: str, k: int, n: int, device: str = "cuda"):
    """(w_packed uint8 [N, K/2], w_scale, w_global) with random codes and realistic scales."""
    w_packed = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    nblocks = k // FP4[fmt]
    if fmt == "mxfp4":  # 2**-10 .. 2**-4
        return w_packed, torch.randint(117, 124, (n, nblocks), device=device, dtype=torch.uint8), None
    scale = (torch.rand(n, nblocks, device=device) * 440 + 8).to(torch.float8_e4m3fn)
    return w_packed, scale, torch.tensor(2e-5, device=device)


def rel_pct(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error in percent."""
    return 100.0 * ((y.float() - ref).norm() / ref.norm()).item()


# column -> `kernel_variants.KERNEL_VARIANTS` name
INT4_VARIANTS = {"ptr": "int4-pointers", "unfinished": "int4-unfinished"}


def run_shape(k: int, n: int, m: int, ops, int4_variants: tuple[str, ...] = (), tma_min_n: int | None = None,
              planar: bool = False, pairs: bool = False) -> dict:
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight as fp4_weight
    from qcompile.plugins.int4_gemm.reference import dequantize_weight as int4_weight

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    xf, bf = x.float(), bias.float()
    r = {"K": k, "N": n, "M": m}
    w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.bfloat16), k * n * 2)
    r["bf16"] = bench(lambda: x @ w16())
    w4 = rotating(lambda: make_int4(k, n), k * n // 2)
    w = w4()
    ref4 = xf @ int4_weight(*w, None, GROUP) + bf
    with int4_tiles(tma_min_n=tma_min_n):
        r["rel%_int4"] = rel_pct(ops["int4"](x, *w, None, bias, GROUP), ref4)
        r["int4_op"] = bench(lambda: ops["int4"](x, *w4(), None, bias, GROUP))
    for variant in int4_variants:  # `INT4_VARIANTS`, timed in the same cell
        with KERNEL_VARIANTS[INT4_VARIANTS[variant]]():
            r[f"rel%_int4_{variant}"] = rel_pct(ops["int4"](x, *w, None, bias, GROUP), ref4)
            r[f"int4_{variant}_op"] = bench(lambda: ops["int4"](x, *w4(), None, bias, GROUP))
        r[f"int4_{variant}/int4"] = r[f"int4_{variant}_op"] / r["int4_op"]
    del ref4
    def fp4_op(name: str, block: int, make) -> float:
        """Checks then times the FP4 op on rotating weights `make()`: r["rel%_<name>"], returns its time."""
        weights = rotating(make, k * n // 2)
        w = weights()
        r[f"rel%_{name}"] = rel_pct(ops["fp4"](x, *w, None, bias, block), xf @ fp4_weight(*w, block).t() + bf)
        del w
        return bench(lambda: ops["fp4"](x, *weights(), None, bias, block))

    for fmt, block in FP4.items():
        r[f"{fmt}_op"] = fp4_op(fmt, block, lambda: make_fp4(fmt, k, n))
        r[f"int4/{fmt}"] = r["int4_op"] / r[f"{fmt}_op"]
        r[f"bf16/{fmt}"] = r["bf16"] / r[f"{fmt}_op"]
        if planar:
            r[f"{fmt}_planar_op"] = fp4_op(f"{fmt}_planar", block, lambda: planar_weights(make_fp4(fmt, k, n)))
            r[f"int4/{fmt}_planar"] = r["int4_op"] / r[f"{fmt}_planar_op"]
            r[f"{fmt}/{fmt}_planar"] = r[f"{fmt}_op"] / r[f"{fmt}_planar_op"]
        if planar and pairs:
            r[f"{fmt}_pairs_op"] = fp4_op(f"{fmt}_pairs", block, lambda: pairs_weights(make_fp4(fmt, k, n)))
            r[f"int4/{fmt}_pairs"] = r["int4_op"] / r[f"{fmt}_pairs_op"]
            r[f"{fmt}_planar/{fmt}_pairs"] = r[f"{fmt}_planar_op"] / r[f"{fmt}_pairs_op"]
    return r


def planar_weights(w):
    """(w_packed, w_scale, w_global) with the codes as planar words (`format.to_planar_words`)."""
    from qcompile.plugins.fp4_gemm.format import to_planar_words

    return (to_planar_words(w[0], w[1]),) + tuple(w[1:])


def pairs_weights(w):
    """`planar_weights` with the words in row pairs (`format.to_row_pairs`)."""
    from qcompile.plugins.fp4_gemm.format import to_row_pairs

    w = planar_weights(w)
    return (to_row_pairs(w[0]),) + w[1:]


def compiled_ops(eager: dict, use_eager: bool) -> dict:
    """The ops as timed: eager, or torch.compile'd with static shapes (one compile per shape, M and flag: the FP8
    path's benchmark needs more than 64 over its four layers)."""
    if use_eager:
        return eager
    torch._dynamo.config.recompile_limit = 1024
    return {name: torch.compile(lambda *a, _op=op: _op(*a), dynamic=False, fullgraph=True)
            for name, op in eager.items()}


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--int4-pointers", action="store_true",
                    help="also time the INT4 op without its TMA tiles (needs --eager)")
    ap.add_argument("--int4-tma-min-n", type=int, help="the TMA tiles' smallest N (default: kernel.TMA_TILES'; "
                    "needs --eager)")
    ap.add_argument("--int4-unfinished", action="store_true",
                    help="also time the INT4 op without the cast and bias in its kernels (needs --eager)")
    ap.add_argument("--fp4-planar", action="store_true", help="also the FP4 op on planar words")
    ap.add_argument("--fp4-pairs", action="store_true", help="with --fp4-planar: also on planar words in row pairs")
    args = ap.parse_args()
    int4_variants = tuple(v for v, on in (("ptr", args.int4_pointers), ("unfinished", args.int4_unfinished)) if on)
    if (int4_variants or args.int4_tma_min_n is not None) and not args.eager:
        ap.error("--int4-pointers, --int4-unfinished and --int4-tma-min-n swap the INT4 op's tiles per call, which a "
                 "torch.compile'd op would not see: add --eager")
    ops = compiled_ops({"int4": register_int4(), "fp4": register_fp4()}, args.eager)
    cols = ["bf16", "int4_op", "nvfp4_op", "mxfp4_op", "int4/nvfp4", "int4/mxfp4", "bf16/nvfp4", "bf16/mxfp4",
            "rel%_int4", "rel%_nvfp4", "rel%_mxfp4"]
    errs = ["rel%_int4", "rel%_nvfp4", "rel%_mxfp4"]
    if args.fp4_planar:
        cols[4:4] = ["nvfp4_planar_op", "mxfp4_planar_op", "int4/nvfp4_planar", "int4/mxfp4_planar",
                     "nvfp4/nvfp4_planar", "mxfp4/mxfp4_planar"]
        errs += ["rel%_nvfp4_planar", "rel%_mxfp4_planar"]
        cols += ["rel%_nvfp4_planar", "rel%_mxfp4_planar"]
    if args.fp4_planar and args.fp4_pairs:
        cols[4:4] = ["nvfp4_pairs_op", "mxfp4_pairs_op", "int4/nvfp4_pairs", "int4/mxfp4_pairs",
                     "nvfp4_planar/nvfp4_pairs", "mxfp4_planar/mxfp4_pairs"]
        errs += ["rel%_nvfp4_pairs", "rel%_mxfp4_pairs"]
        cols += ["rel%_nvfp4_pairs", "rel%_mxfp4_pairs"]
    for variant in reversed(int4_variants):
        cols[2:2] = [f"int4_{variant}_op", f"int4_{variant}/int4"]
        errs.append(f"rel%_int4_{variant}")
        cols.append(f"rel%_int4_{variant}")
    rows = sweep(args, cols, lambda k, n, m: run_shape(k, n, m, ops, int4_variants, args.int4_tma_min_n,
                                                       args.fp4_planar, args.fp4_pairs))
    errs = {c: max(r[c] for r in rows) for c in errs}
    print(f"max relative L2 error vs float32 (%): {errs}")
    write_results(args, rows, int4_group=GROUP, fp4_blocks=FP4, max_rel_l2_error_pct=errs)


if __name__ == "__main__":
    main()
