"""Diagnostic (H200): tiles of the FP4 GEMV (`gemv.launch_gemv`: units of 16 codes, x pre-paired) at M = 1 with
bf16 x and a bias, next to the FP4 op, the INT4 op and cuBLAS bf16 (CUDA-graph replay, rotating weights); each
configuration checked against float64 first. Not part of the product.

First run (fourteenth session, commit 2f737b2, benchmarks/fp4_gemv_units_probe.json): the unit GEMV
(`launch_gemv_units` then) against the per-word GEMV it replaced (`launch_gemv` then, "shipped gemv" in the JSON;
the probe of that one was tools/diag/fp4_gemv_probe.py, last at commit 2f737b2). The per-word GEMV cost about 7
SASS instructions per weight: x's 8 values, their largest |x| and four pairs per word column inside the weight
loop (shared by only the few weight rows a thread holds), and a scale byte loaded and decoded per word.

    OUT=... python3 tools/diag/fp4_gemv_units_probe.py
"""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/
from bench_fp4_gemm import make_fp4, make_int4  # noqa: E402
from gpu_timing import MODE, bench, rotating  # noqa: E402
from probe_util import run_part, save  # noqa: E402

from qcompile.plugins.fp4_gemm.gemv import launch_gemv  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (4096, 6144), (4096, 28672)]
# (rows, units per step, warps) around the first run's best (4 x 256 on 4 warps; it also ran 8 x 128, 8 x 64,
# 4 x 128, 16 x 64 and 8 x 128 on 4 warps, 8 x 256 and 16 x 128 on 8)
UNIT_TILES = [(4, 256, 4), (2, 512, 4), (4, 512, 4), (2, 256, 2), (4, 256, 2), (4, 512, 8), (8, 256, 4),
              (2, 1024, 8)]


def part(k, n):
    from qcompile.plugins.fp4_gemm.op import fp4_gemm
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm
    res = {}
    dtype = torch.bfloat16
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    wb = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["cublas bf16"] = bench(lambda: torch.nn.functional.linear(x, wb(), bias))
    w4 = rotating(lambda: tuple(t.to(dtype) if t.is_floating_point() else t for t in make_int4(k, n)), k * n // 2)
    res["int4 op"] = bench(lambda: int4_groupwise_gemm(x, *w4(), None, bias, 128))
    for fmt, block in (("nvfp4", 16), ("mxfp4", 32)):
        wf = rotating(lambda: make_fp4(fmt, k, n), k * n // 2)
        w = wf()
        ref = x.double() @ dequantize_weight(*w, block).double().t() + bias.double()

        def check(name, y):
            res[name + " err"] = round(float((y.double() - ref).norm() / ref.norm()), 6)
        res[f"{fmt} op"] = bench(lambda: fp4_gemm(x, *wf(), None, bias, block))
        for bn, bu, warps in UNIT_TILES:
            cfg = dict(BLOCK_N=bn, BLOCK_U=bu, num_warps=warps)
            name = f"{fmt} units {bn}x{bu} w{warps}"
            check(name, launch_gemv(x, *w, bias, block, cfg))
            res[name] = bench(lambda: launch_gemv(x, *wf(), bias, block, cfg))
    line = " | ".join(f"{c}: {v:.1f}" if not c.endswith("err") else f"{c}: {v}" for c, v in res.items())
    print(f"{k}x{n}: {line}", flush=True)
    return res


def main():
    MODE["graph"] = True
    results = {}
    for k, n in SHAPES:
        run_part(results, f"{k}x{n}", part, k, n)
        save(results, "fp4_gemv_units_probe.json")


if __name__ == "__main__":
    main()
