"""Diagnostic (H200): the FP4 op's dequantize + cuBLAS path with W written [N, K] (the GEMM reads W^T, as now) or
[K, N] (the GEMM reads W as bf16 `x @ w` and the INT4 path do), per K x N and M, replayed from CUDA graphs.

Times cuBLAS bf16 (`x @ w`, w [K, N]), the INT4 op, and for NVFP4: the dequantize kernel alone and dequantize +
`gemm_dispatch.linear_bias` (bias in cuBLAS's epilogue) in both layouts, [K, N] in several tiles (checked
bit-exact against the [N, K] output transposed). Results: $OUT/fp4_dequant_layout.json.

    python3 tools/diag/fp4_dequant_layout.py
"""
from __future__ import annotations

import json
import sys

import torch

sys.path.insert(0, "tools")
from bench_fp4_gemm import GROUP, make_fp4, make_int4  # noqa: E402
from gpu_timing import MODE, bench, rotating  # noqa: E402
from probe_util import run_grid  # noqa: E402

from qcompile.plugins.fp4_gemm import kernel as fp4  # noqa: E402
from qcompile.plugins.gemm_dispatch import linear_bias  # noqa: E402
from qcompile.plugins.int4_gemm import register as register_int4  # noqa: E402

KN_TILES = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn, bk, w in
            ((64, 128, 4), (128, 64, 4), (128, 128, 8), (64, 256, 8), (256, 64, 8), (32, 256, 4))]
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]


def cell(k: int, n: int, m: int) -> dict:
    int4_op = register_int4()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.bfloat16), k * n * 2)
    w4 = rotating(lambda: make_int4(k, n), k * n // 2)
    wf = rotating(lambda: make_fp4("nvfp4", k, n), k * n // 2)
    r = {"bf16": bench(lambda: x @ w16(), copies=4),
         "int4_op": bench(lambda: int4_op(x, *w4(), None, bias, GROUP), copies=4),
         "nk dequant": bench(lambda: fp4.launch_dequant(*wf(), 16, torch.bfloat16), copies=4),
         "nk path": bench(lambda: linear_bias(x, fp4.launch_dequant(*wf(), 16, torch.bfloat16).t(), bias,
                                              torch.bfloat16), copies=4)}
    for t in KN_TILES:
        name = json.dumps(t)
        w = wf()
        got = fp4.launch_dequant(*w, 16, torch.bfloat16, cfg=t, kn=True)
        if not torch.equal(got, fp4.launch_dequant(*w, 16, torch.bfloat16).t()):
            r[f"kn {name}"] = "MISMATCH"
            continue
        r[f"kn dequant {name}"] = bench(lambda: fp4.launch_dequant(*wf(), 16, torch.bfloat16, cfg=t, kn=True),
                                        copies=4)
        r[f"kn path {name}"] = bench(lambda: linear_bias(
            x, fp4.launch_dequant(*wf(), 16, torch.bfloat16, cfg=t, kn=True), bias, torch.bfloat16), copies=4)
    print(f"{k}x{n} M={m}: " + ", ".join(f"{key} {v:.1f}" if isinstance(v, float) else f"{key} {v}"
                                         for key, v in r.items()), flush=True)
    return r


if __name__ == "__main__":
    MODE["graph"] = True
    run_grid(cell, SHAPES, (256, 1024), "fp4_dequant_layout.json")
