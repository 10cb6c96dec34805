#!/usr/bin/env python3
"""GPU benchmark of `qcompile::scaled_gemm` (int8 / fp8 W8A8) against cuBLAS and the raw low-precision GEMMs.

For each (K x N, M) of reference/kernel-targets.md it times, with `triton.testing.do_bench` (median):
  bf16        cuBLAS bf16 `x @ w.T`
  int_mm      raw `torch._int_mm` on pre-quantized int8 (no quantize, no epilogue)
  int8_op     our op, int8, per-channel weight scale, bias, bf16 in/out (quantize + _int_mm + epilogue)
  fp8_tw      raw `torch._scaled_mm` tensorwise, bf16 out
  fp8_rw      raw `torch._scaled_mm` rowwise, bf16 out
  fp8_op_tw   our op, fp8, per-tensor weight scale, bias
  fp8_op_ch   our op, fp8, per-channel weight scale, bias (rowwise path for bf16)
Weights are rotated over several copies so small-M runs read HBM, not L2. Prints a table, writes JSON to --out.
Our op is timed compiled (torch.compile, dynamic shapes), as an engine runs it: Inductor inlines the op
body, so the activation quantization and the scale epilogue become fused Triton kernels around the cuBLASLt
GEMM (in an engine they fuse further into the neighbouring layers). --eager times the eager op instead
(one kernel per aten op, plus Python). --cuda-graph times GPU work only (no launch overhead).

    LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 tools/bench_scaled_gemm.py --out bench.json
"""
from __future__ import annotations

import torch

from gpu_timing import bench, bench_parser, rotating, sweep, write_results

from qcompile.plugins.scaled_gemm import register



def run_shape(k: int, n: int, m: int, op) -> dict:
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xs = torch.tensor(x.abs().max().item() / 127.0, device=dev)
    xs8 = torch.tensor(x.abs().max().item() / 448.0, device=dev)
    bias = torch.randn(n, device=dev)
    ws_ch = torch.rand(n, device=dev) * 0.01 + 1e-3
    ws_t = torch.tensor(0.005, device=dev)
    w16 = rotating(lambda: torch.randn(n, k, device=dev, dtype=torch.bfloat16), n * k * 2)
    wi8 = rotating(lambda: torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8), n * k)
    wf8 = rotating(lambda: torch.randn(n, k, device=dev).to(torch.float8_e4m3fn), n * k)
    xi8 = torch.randint(-127, 128, (max(m, 17), k), device=dev, dtype=torch.int8)
    xf8 = x.float().to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    sa = torch.ones(m, 1, device=dev)
    sb = torch.ones(1, n, device=dev)
    r = {"K": k, "N": n, "M": m}
    r["bf16"] = bench(lambda: x @ w16().t())
    r["int_mm"] = bench(lambda: torch._int_mm(xi8, wi8().t()))
    r["int8_op"] = bench(lambda: op(x, wi8(), ws_ch, xs, bias))
    r["fp8_tw"] = bench(lambda: torch._scaled_mm(xf8, wf8().t(), one, one, out_dtype=torch.bfloat16))
    try:
        r["fp8_rw"] = bench(lambda: torch._scaled_mm(xf8, wf8().t(), sa, sb, out_dtype=torch.bfloat16))
    except RuntimeError as exc:  # rowwise needs sm90 on some versions
        r["fp8_rw"] = None
        r["fp8_rw_error"] = str(exc).splitlines()[0]
    r["fp8_op_tw"] = bench(lambda: op(x, wf8(), ws_t, xs8, bias))
    r["fp8_op_ch"] = bench(lambda: op(x, wf8(), ws_ch, xs8, bias))
    r["int8_op/int_mm"] = r["int8_op"] / r["int_mm"]
    r["fp8_op_tw/fp8_tw"] = r["fp8_op_tw"] / r["fp8_tw"]
    r["fp8_op_ch/fp8_rw"] = r["fp8_op_ch"] / r["fp8_rw"] if r["fp8_rw"] else None
    r["bf16/int8_op"] = r["bf16"] / r["int8_op"]
    r["bf16/fp8_op_tw"] = r["bf16"] / r["fp8_op_tw"]
    return r


def main() -> None:
    args = bench_parser(__doc__.splitlines()[0]).parse_args()
    eager_op = register()
    compiled = {}  # one compiled function per variant (format, scale granularity): no recompile churn

    def op(x, w_q, w_scale, x_scale, bias):
        if args.eager:
            return eager_op(x, w_q, w_scale, x_scale, bias)
        key = (w_q.dtype, w_scale.dim())
        if key not in compiled:
            compiled[key] = torch.compile(lambda *a: eager_op(*a), dynamic=True, fullgraph=True)
        return compiled[key](x, w_q, w_scale, x_scale, bias)
    torch._dynamo.config.recompile_limit = 64  # M = 1 and shape specializations per variant
    cols = ["bf16", "int_mm", "int8_op", "fp8_tw", "fp8_rw", "fp8_op_tw", "fp8_op_ch",
            "int8_op/int_mm", "fp8_op_tw/fp8_tw", "fp8_op_ch/fp8_rw", "bf16/fp8_op_tw"]
    write_results(args, sweep(args, cols, lambda k, n, m: run_shape(k, n, m, op)))

if __name__ == "__main__":
    main()
