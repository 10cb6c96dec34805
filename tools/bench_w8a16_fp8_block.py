#!/usr/bin/env python3
"""GPU benchmark of `qcompile::int8_weight_only_gemm` (W8A16) and `qcompile::fp8_block_gemm` (FP8 1x128 / 128x128
block scaling) against cuBLAS bf16, for the issue-6 targets (W8A16 >= 1.7x bf16 at M <= 16; FP8 block >= 1.3x at
M >= 1024).

For each (K x N, M) of reference/kernel-targets.md it times, with `triton.testing.do_bench` (median):
  bf16        cuBLAS bf16 `x @ w` (w [K, N])
  w8a16_op    our W8A16 op: int8 [N, K] per-channel weights, bias, bf16 in/out (Triton row GEMV at M = 1, the
              row dot kernel up to 16, the tiled kernel / dequantize + cuBLAS above)
  fp8blk_raw  the op's sm90 path above 16 rows without a bias: x quantized by our Triton kernel, then
              `torch._scaled_mm` block-wise (1x128 x 128x128, cuBLASLt), bf16 out (the op adds the bias in the
              GEMM's epilogue)
  fp8blk_op   our FP8 block op: x quantized in 1x128 blocks inside the op + the GEMM + bias
Weights are rotated over several copies so small-M runs read HBM, not L2. Ops are compiled (torch.compile,
static shapes, one compile per M) as an engine runs them, or eager with --eager; --cuda-graph times GPU work only.
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


def run_shape(k: int, n: int, m: int, ops) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    r = {"K": k, "N": n, "M": m}
    w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.bfloat16), k * n * 2)
    r["bf16"] = bench(lambda: x @ w16())
    w8 = rotating(lambda: make_w8(k, n), k * n)
    r["w8a16_op"] = bench(lambda: ops["w8a16"](x, *w8(), bias))
    wb = rotating(lambda: make_fp8_block(k, n), k * n)
    try:  # the sm90 cuBLASLt path on its own (x quantization included, unfused: eager aten ops)
        r["fp8blk_raw"] = bench(lambda: scaled_mm_blockwise(x, *wb()))
    except (RuntimeError, TypeError, ValueError) as exc:  # not sm90, or an API difference
        r["fp8blk_raw"] = None
        r["fp8blk_raw_error"] = str(exc).splitlines()[0]
    r["fp8blk_op"] = bench(lambda: ops["fp8_block"](x, *wb(), bias))
    r["bf16/w8a16_op"] = r["bf16"] / r["w8a16_op"]
    r["bf16/fp8blk_op"] = r["bf16"] / r["fp8blk_op"]
    return r


def check_correct(ops) -> dict:
    """Relative L2 error of each op vs float64 on one mid-size case (guards the timings)."""
    from qcompile.plugins.fp8_block_gemm.reference import fp8_block_gemm_reference
    from qcompile.plugins.int8_wo_gemm.reference import dequantize_weight

    errs = {"w8a16": 0.0, "fp8_block": 0.0}
    w_q, w_s = make_w8(4096, 4096)
    wb_q, wb_s = make_fp8_block(4096, 4096)
    for m in (1, 16, 1024):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ dequantize_weight(w_q, w_s).double().t()
        errs["w8a16"] = max(errs["w8a16"], ((ops["w8a16"](x, w_q, w_s, None).double() - ref).norm() / ref.norm()).item())
        ref = fp8_block_gemm_reference(x.cpu().float(), wb_q.cpu(), wb_s.cpu(), None).double()
        y = ops["fp8_block"](x, wb_q, wb_s, None).double().cpu()
        errs["fp8_block"] = max(errs["fp8_block"], ((y - ref).norm() / ref.norm()).item())
    return errs


def main() -> None:
    args = bench_parser(__doc__.splitlines()[0]).parse_args()
    eager = {"w8a16": register_w8a16(), "fp8_block": register_fp8_block()}
    ops = eager if args.eager else {
        # static shapes (one compile per M): with a symbolic M the W8A16 body is a torch.cond (see bench_gemm.py)
        name: torch.compile(lambda *a, _op=op: _op(*a), dynamic=False, fullgraph=True) for name, op in eager.items()}
    torch._dynamo.config.recompile_limit = 64
    errs = check_correct(ops)
    print(f"max relative L2 error vs float64 (M = 1, 16, 1024): {errs}")
    cols = ["bf16", "w8a16_op", "fp8blk_raw", "fp8blk_op", "bf16/w8a16_op", "bf16/fp8blk_op"]
    rows = sweep(args, cols, lambda k, n, m: run_shape(k, n, m, ops))
    write_results(args, rows, rel_l2_error=errs)


if __name__ == "__main__":
    main()
