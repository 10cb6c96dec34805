#!/usr/bin/env python3
"""GPU benchmark of the 4-bit GEMMs' opt-in FP8 path above 128 rows (`plugins/fp8_large_m.py`, the ops'
`fp8_large_m`) against cuBLAS bf16, cuBLASLt FP8 rowwise and the exact path, for the M >= 1024 targets of issues 4
and 5 (>= 0.95x cuBLAS bf16; reference/kernel-targets.md allows an FP8 path there).

For each (K x N, M) it times, with `triton.testing.do_bench` (median; the ops torch.compile'd with static shapes, as
an engine fuses x's quantization into one kernel, or eager with --eager; --cuda-graph: GPU time only):
  bf16            cuBLAS bf16 `x @ w`
  fp8_rowwise     `torch._scaled_mm` rowwise on operands already in FP8 (the GEMM alone: the path's floor)
  int4_exact      the INT4 g128 op as shipped (dequantize + cuBLAS bf16 above 128 rows)
  int4_fp8        the INT4 op with fp8_large_m
  nvfp4_exact / nvfp4_fp8 / mxfp4_fp8   the FP4 op (planar words, as CUDA engines store them) without / with it
  int4_w8, nvfp4_w8   the path's dequantize-to-FP8 kernel alone (`dequant_fp8.fp8_weight`, `kernel.fp8_weight`)
  x_quant         the per-row FP8 quantization of x alone (compiled like the ops; fused into x's producer in engines)
with ratios bf16/<op> (>= 0.95: the target met) and the relative L2 error in percent against float64 of the same
weights (`rel%_*`: the FP8 path's price). bf16 in and out, with bias; weights rotated so they are read from HBM.
--tiles also times `int4_w8` with each DEQUANT_T tile of `TILES` (key `int4_w8[BLOCK_N,BLOCKS,warps]`).

    LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 tools/bench_fp8_large_m.py --cuda-graph --out b.json
"""
from __future__ import annotations

import torch

from bench_fp4_gemm import GROUP, compiled_ops, make_fp4, make_int4, planar_weights, rel_pct
from gpu_timing import bench, bench_parser, rotating, sweep, write_results

from qcompile.plugins import fp8_large_m
from qcompile.plugins.fp4_gemm import register as register_fp4
from qcompile.plugins.int4_gemm import register as register_int4

MS = [256, 1024, 4096]
TILES = [dict(BLOCK_N=64, BLOCKS=1, num_warps=4), dict(BLOCK_N=64, BLOCKS=2, num_warps=4),
         dict(BLOCK_N=128, BLOCKS=1, num_warps=4), dict(BLOCK_N=128, BLOCKS=2, num_warps=8),
         dict(BLOCK_N=32, BLOCKS=4, num_warps=4), dict(BLOCK_N=64, BLOCKS=4, num_warps=8)]


def run_shape(k: int, n: int, m: int, ops: dict, tiles: bool) -> dict:
    from qcompile.plugins.fp4_gemm.kernel import fp8_weight as fp4_w8
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight as fp4_weight
    from qcompile.plugins.int4_gemm import dequant_fp8
    from qcompile.plugins.int4_gemm.reference import dequantize_weight as int4_weight

    int4, fp4, quantize_rows = ops["int4"], ops["fp4"], ops["x_quant"]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    r = {"K": k, "N": n, "M": m}
    w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.bfloat16), k * n * 2)
    r["bf16"] = bench(lambda: x @ w16())
    xq, row = quantize_rows(x)
    w8 = rotating(lambda: (torch.randn(n, k, device="cuda") * 50).to(fp8_large_m.FP8), k * n)
    col = torch.rand(n, device="cuda") + 0.5
    r["fp8_rowwise"] = bench(lambda: fp8_large_m.rowwise_scaled_mm(xq, row, w8(), col, bias))
    r["x_quant"] = bench(lambda: quantize_rows(x))

    w4 = rotating(lambda: make_int4(k, n), k * n // 2)
    one4 = make_int4(k, n)
    ref4 = x.double() @ int4_weight(*one4, None, GROUP).double() + bias.double()
    for name, flag in (("int4_exact", False), ("int4_fp8", True)):
        r[f"rel%_{name}"] = rel_pct(int4(x, *one4, None, bias, GROUP, None, False, flag), ref4)
        r[name] = bench(lambda: int4(x, *w4(), None, bias, GROUP, None, False, flag))
    r["int4_w8"] = bench(lambda: dequant_fp8.fp8_weight(*w4(), None, GROUP))
    if tiles:
        for cfg in TILES:
            key = f"int4_w8[{cfg['BLOCK_N']},{cfg['BLOCKS']},{cfg['num_warps']}]"
            s = torch.ones(n, device="cuda")
            r[key] = bench(lambda: dequant_fp8.launch_dequant_t(*w4(), None, GROUP, s, fp8_large_m.FP8, cfg=cfg))

    for fmt, block in (("nvfp4", 16), ("mxfp4", 32)):
        wf = rotating(lambda: planar_weights(make_fp4(fmt, k, n)), k * n // 2)
        onef = planar_weights(make_fp4(fmt, k, n))
        reff = x.double() @ fp4_weight(*onef, block, torch.float32).double().t() + bias.double()
        for name, flag in ((f"{fmt}_exact", False), (f"{fmt}_fp8", True)):
            r[f"rel%_{name}"] = rel_pct(fp4(x, *onef, None, bias, block, flag), reff)
            r[name] = bench(lambda: fp4(x, *wf(), None, bias, block, flag))
        r[f"{fmt}_w8"] = bench(lambda: fp4_w8(*wf(), block))
    for name in ("fp8_rowwise", "int4_exact", "int4_fp8", "nvfp4_exact", "nvfp4_fp8", "mxfp4_exact", "mxfp4_fp8"):
        r[f"bf16/{name}"] = r["bf16"] / r[name]
    return r


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.set_defaults(ms=MS)
    ap.add_argument("--tiles", action="store_true", help="also time the INT4 dequantize-to-FP8 kernel's tiles")
    args = ap.parse_args()
    cols = ["bf16", "fp8_rowwise", "int4_exact", "int4_fp8", "nvfp4_exact", "nvfp4_fp8", "mxfp4_fp8", "int4_w8",
            "nvfp4_w8", "x_quant", "bf16/int4_exact", "bf16/int4_fp8", "bf16/nvfp4_fp8", "bf16/mxfp4_fp8",
            "rel%_int4_exact", "rel%_int4_fp8", "rel%_nvfp4_fp8"]
    ops = compiled_ops({"int4": register_int4(), "fp4": register_fp4(), "x_quant": fp8_large_m.quantize_rows},
                       args.eager)
    rows = sweep(args, cols, lambda k, n, m: run_shape(k, n, m, ops, args.tiles))
    write_results(args, rows, group=GROUP)


if __name__ == "__main__":
    main()
