#!/usr/bin/env python3
"""GPU benchmark of `qcompile::int4_groupwise_gemm` (W4A16, g128) against cuBLAS bf16 and torch tinygemm.

For each (K x N, M) of reference/kernel-targets.md it times, with `triton.testing.do_bench` (median):
  bf16        cuBLAS bf16 `x @ w` (w [K, N])
  tinygemm    `torch._weight_int4pack_mm` (torch's W4A16 kernel, g128, bf16)
  int4_op     our op, symmetric int4 g128, bias, bf16 in/out, compiled with torch.compile (as an engine runs it)
  int4_zp     our op with zero points
Weights are rotated over several copies so small-M runs read HBM, not L2. Prints a table of us and the
ratios bf16/int4_op (> 1: we are faster) and tinygemm/int4_op, writes JSON to --out. --cuda-graph times
calls replayed from a CUDA graph (GPU time only), --eager the eager op.

    python3 tools/bench_gemm.py --out bench_int4.json [--cuda-graph]
"""
from __future__ import annotations

import torch

from gpu_timing import bench, bench_parser, rotating, sweep, write_results

from qcompile.plugins.int4_gemm import register
from qcompile.plugins.int4_gemm.format import to_engine

GROUP = 128


def make_int4(k: int, n: int, zero: bool):
    dev = "cuda"
    q = torch.randint(-8, 8, (k, n), device=dev, dtype=torch.int8)
    scale = (torch.rand(k // GROUP, n, device=dev) * 0.01 + 1e-3).to(torch.bfloat16)
    zp = torch.randint(-8, 8, (k // GROUP, n), device=dev, dtype=torch.int8) if zero else None
    return to_engine(q, GROUP), scale, zp


def make_tinygemm(k: int, n: int):
    """(packed, scales_and_zeros) for `_weight_int4pack_mm` (uint8 [N, K/2] input, inner k tiles 8)."""
    w = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
    w_u8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
    packed = torch._convert_weight_to_int4pack(w_u8, 8)
    sz = torch.rand(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16)
    return packed, sz


def run_shape(k: int, n: int, m: int, op) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    r = {"K": k, "N": n, "M": m}
    w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.bfloat16), k * n * 2)
    r["bf16"] = bench(lambda: x @ w16())
    try:
        tg = rotating(lambda: make_tinygemm(k, n), k * n // 2)

        def tiny():
            packed, sz = tg()
            return torch._weight_int4pack_mm(x, packed, GROUP, sz)
        r["tinygemm"] = bench(tiny)
    except (RuntimeError, TypeError) as exc:  # API differences between torch versions
        r["tinygemm"] = None
        r["tinygemm_error"] = str(exc).splitlines()[0]
    for name, zero in (("int4_op", False), ("int4_zp", True)):
        w4 = rotating(lambda: make_int4(k, n, zero), k * n // 2)

        def ours():
            w_packed, scale, zp = w4()
            return op(x, w_packed, scale, zp, bias, GROUP)
        r[name] = bench(ours)
    r["bf16/int4_op"] = r["bf16"] / r["int4_op"]
    r["bf16/int4_zp"] = r["bf16"] / r["int4_zp"]
    r["tinygemm/int4_op"] = r["tinygemm"] / r["int4_op"] if r["tinygemm"] else None
    return r


def check_correct(op) -> float:
    """Relative L2 error of the op vs the float64 reference on one mid-size case (guards the timings)."""
    from qcompile.plugins.int4_gemm.reference import dequantize_weight

    w_packed, scale, zp = make_int4(4096, 4096, True)
    errs = []
    for m in (1, 16, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        y = op(x, w_packed, scale, zp, None, GROUP).double()
        ref = x.double() @ dequantize_weight(w_packed, scale, zp, GROUP).double()
        errs.append(((y - ref).norm() / ref.norm()).item())
    return max(errs)


def main() -> None:
    args = bench_parser(__doc__.splitlines()[0]).parse_args()
    eager_op = register()
    compiled = {}

    def op(x, w_packed, scale, zp, bias, group):
        if args.eager:
            return eager_op(x, w_packed, scale, zp, bias, group)
        key = zp is None
        if key not in compiled:
            # static shapes (one compile per M): with a symbolic M the op body is a torch.cond, which
            # AOTInductor compiles but torch.compile's Inductor lowering rejected (H200, torch 2.11)
            compiled[key] = torch.compile(lambda *a: eager_op(*a), dynamic=False, fullgraph=True)
        return compiled[key](x, w_packed, scale, zp, bias, group)
    torch._dynamo.config.recompile_limit = 64
    rel_err = check_correct(op)
    print(f"max relative L2 error vs float64 (M = 1, 16, 300): {rel_err:.2e}")
    cols = ["bf16", "tinygemm", "int4_op", "int4_zp", "bf16/int4_op", "bf16/int4_zp", "tinygemm/int4_op"]
    rows = sweep(args, cols, lambda k, n, m: run_shape(k, n, m, op))
    write_results(args, rows, group=GROUP, rel_l2_error=rel_err)

if __name__ == "__main__":
    main()
