#!/usr/bin/env python3
"""GPU benchmark of `qcompile::int8_weight_only_gemm` (W8A16) and `qcompile::fp8_block_gemm` (FP8 1x128 / 128x128
block scaling) against cuBLAS bf16, for the issue-6 targets (W8A16 >= 1.7x bf16 at M <= 16; FP8 block >= 1.3x at
M >= 1024).

For each (K x N, M) of reference/kernel-targets.md it times, with `triton.testing.do_bench` (median):
  bf16        cuBLAS bf16 `x @ w` (w [K, N]); with --dtype fp16 the column is fp16 and x, bias are fp16
  w8a16_op    our W8A16 op: int8 [N, K] per-channel weights, bias, bf16 in/out (up to 16 rows: the split INT8
              tensor-core path on wide layers, else the row GEMV at M = 1 and the row dot kernel; the tiled
              kernel / dequantize + cuBLAS above)
  fp8blk_raw  the op's sm90 path above 16 rows without a bias: x quantized by our Triton kernel, then
              `torch._scaled_mm` block-wise (1x128 x 128x128, cuBLASLt), bf16 out (the op adds the bias in the
              GEMM's epilogue)
  fp8blk_op   our FP8 block op: x quantized in 1x128 blocks inside the op + the GEMM + bias
Weights are rotated over several copies so small-M runs read HBM, not L2. Ops are compiled (torch.compile,
static shapes, one compile per M) as an engine runs them, or eager with --eager; --cuda-graph times GPU work only;
--w8a16-only leaves the FP8 block op out.
Prints the table with the ratios bf16/w8a16_op and bf16/fp8blk_op (> 1: we are faster), writes JSON to --out.

    LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 tools/bench_w8a16_fp8_block.py --cuda-graph --out b.json
"""
from __future__ import annotations

import torch

from gpu_timing import bench, bench_parser, rotating, sweep, write_results

from qcompile.plugins.fp8_block_gemm import quantize_weight_blocks
from qcompile.plugins.fp8_block_gemm import register as register_fp8_block
from qcompile.plugins.fp8_block_gemm.op import scaled_mm_blockwise
from qcompile.plugins.int8_wo_gemm import register as register_w8a16


def make_w8(k: int, n: int):
    """(int8 [N, K] engine weight, scales [N])."""
    return (torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8),
            torch.rand(n, device="cuda") * 0.01 + 1e-3)


def make_fp8_block(k: int, n: int):
    return quantize_weight_blocks(torch.randn(n, k, device="cuda"))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_shape(k: int, n: int, m: int, ops, dt: str = "bf16") -> dict:
    """One row: cuBLAS in `dt` (the column named after it), the W8A16 op, and (ops has it) the FP8 block op."""
    dtype = DTYPES[dt]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    r = {"K": k, "N": n, "M": m}
    w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=dtype), k * n * 2)
    r[dt] = bench(lambda: x @ w16())
    w8 = rotating(lambda: make_w8(k, n), k * n)
    r["w8a16_op"] = bench(lambda: ops["w8a16"](x, *w8(), bias))
    r[f"{dt}/w8a16_op"] = r[dt] / r["w8a16_op"]
    if "fp8_block" not in ops:
        return r
    wb = rotating(lambda: make_fp8_block(k, n), k * n)
    try:  # the sm90 cuBLASLt path on its own (x quantization included, unfused: eager aten ops)
        r["fp8blk_raw"] = bench(lambda: scaled_mm_blockwise(x, *wb()))
    except (RuntimeError, TypeError, ValueError) as exc:  # not sm90, or an API difference
        r["fp8blk_raw"] = None
        r["fp8blk_raw_error"] = str(exc).splitlines()[0]
    r["fp8blk_op"] = bench(lambda: ops["fp8_block"](x, *wb(), bias))
    r[f"{dt}/fp8blk_op"] = r[dt] / r["fp8blk_op"]
    return r


def check_correct(ops, dtype=torch.bfloat16) -> dict:
    """Relative L2 error of each op vs float64 on one mid-size case (guards the timings)."""
    from qcompile.plugins.fp8_block_gemm.reference import fp8_block_gemm_reference
    from qcompile.plugins.int8_wo_gemm.reference import dequantize_weight

    errs = {name: 0.0 for name in ops}
    w_q, w_s = make_w8(4096, 4096)
    wb_q, wb_s = make_fp8_block(4096, 4096)
    for m in (1, 16, 1024):
        x = torch.randn(m, 4096, device="cuda", dtype=dtype)
        ref = x.double() @ dequantize_weight(w_q, w_s).double().t()
        y = ops["w8a16"](x, w_q, w_s, None).double()
        errs["w8a16"] = max(errs["w8a16"], ((y - ref).norm() / ref.norm()).item())
        if "fp8_block" not in ops:
            continue
        ref = fp8_block_gemm_reference(x.cpu().float(), wb_q.cpu(), wb_s.cpu(), None).double()
        y = ops["fp8_block"](x, wb_q, wb_s, None).double().cpu()
        errs["fp8_block"] = max(errs["fp8_block"], ((y - ref).norm() / ref.norm()).item())
    return errs


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="x, bias and the cuBLAS baseline")
    ap.add_argument("--w8a16-only", action="store_true", help="leave the FP8 block op out")
    args = ap.parse_args()
    eager = {"w8a16": register_w8a16()}
    if not args.w8a16_only:
        eager["fp8_block"] = register_fp8_block()
    ops = eager if args.eager else {
        # static shapes (one compile per M): with a symbolic M the W8A16 body is a torch.cond (see bench_gemm.py)
        name: torch.compile(lambda *a, _op=op: _op(*a), dynamic=False, fullgraph=True) for name, op in eager.items()}
    torch._dynamo.config.recompile_limit = 64
    errs = check_correct(ops, DTYPES[args.dtype])
    print(f"max relative L2 error vs float64 (M = 1, 16, 1024): {errs}")
    dt = args.dtype
    cols = [c for c in (dt, "w8a16_op", "fp8blk_raw", "fp8blk_op", f"{dt}/w8a16_op", f"{dt}/fp8blk_op")
            if not (args.w8a16_only and "fp8" in c)]
    rows = sweep(args, cols, lambda k, n, m: run_shape(k, n, m, ops, dt))
    write_results(args, rows, rel_l2_error=errs, dtype=dt)


if __name__ == "__main__":
    main()
