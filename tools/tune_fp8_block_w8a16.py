#!/usr/bin/env python3
"""Choose the launch paths of the FP8 block and W8A16 ops on the GPU (`fp8_block_gemm.kernel.CONFIG`,
`int8_wo_gemm.kernel.LARGE_M`).

For every (K x N, M) it times side by side: cuBLAS bf16; the FP8 block GEMM alone (x quantized beforehand)
through cuBLASLt block-wise `torch._scaled_mm` (sm90) and through our Triton kernel in several configurations;
the 1x128 quantization of x as Inductor compiles the aten ops (row-major scales) and as our Triton kernel does
it for three row-block sizes (K-block-major scales, the cuBLASLt path); the W8A16 large-M path as dequantize +
cuBLAS, as our tiled kernel and as the row dot kernel on row tiles, in several configurations. Each candidate is
checked against a float32 reference first (relative L2 error). Writes every measurement as JSON and prints the
best of each per cell.

    python3 tools/tune_fp8_block_w8a16.py --cuda-graph --out tune.json [--shapes 8192x28672] [--ms 64 1024]
        [--ops fp8_block w8a16]
"""
from __future__ import annotations

import json

import torch

from gpu_timing import bench, bench_parser, rotating, save_rows, set_mode

from qcompile.plugins.fp8_block_gemm import quantize_weight_blocks
from qcompile.plugins.fp8_block_gemm.format import quantize_activation_blocks
from qcompile.plugins.fp8_block_gemm.kernel import quantize_blocks_triton
from qcompile.plugins.fp8_block_gemm.kernel import fp8_block_gemm_triton
from qcompile.plugins.int8_wo_gemm import kernel as w8_kernel

FP8_CONFIGS = [dict(BLOCK_M=bm, GROUP_M=8, num_warps=w, num_stages=st)
               for bm, w, st in ((64, 4, 3), (64, 4, 4), (64, 8, 4), (128, 4, 3), (128, 8, 3), (128, 8, 4))]
W8_CONFIGS = [dict(kernel="tiles", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8, num_stages=st)
              for bm, bn, bk, st in ((64, 128, 64, 3), (128, 128, 64, 3), (128, 256, 64, 3), (128, 128, 128, 3),
                                     (64, 128, 128, 4), (128, 256, 64, 4))]
# the small-M row dot kernel (weight rows as the MMA's wide operand) on row tiles of 32 / 64, K split to fill the SMs
W8_DOT_CONFIGS = [dict(kernel="dot", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, waves=1)
                  for bm, bn, bk, w, st in ((32, 32, 256, 4, 4), (64, 32, 256, 4, 4), (64, 64, 128, 4, 4),
                                            (64, 64, 256, 8, 3))]


def fp8_candidates(x, weights):
    """The GEMM alone on x quantized beforehand; weights() -> (wq, ws) of the next rotating copy."""
    xq, sx_rows = quantize_activation_blocks(x)  # scales [M, K/128] row-major, as the op's Triton path has them
    xq4, sx = quantize_blocks_triton(x, 4)  # scales K-block-major (strides (1, M)), as its cuBLASLt path has them

    def cublas():
        wq, ws = weights()
        return torch._scaled_mm(xq4, wq.t(), sx, ws.t(), out_dtype=torch.bfloat16)[:x.shape[0]]

    def triton_path(cfg, scales):
        return lambda: fp8_block_gemm_triton(xq, scales, *weights(), out_dtype=x.dtype, config=cfg)
    out = {"scaled_mm": cublas}
    out.update({"triton " + json.dumps(c): triton_path(c, sx_rows) for c in FP8_CONFIGS})
    return out


def w8_candidates(x, weights):
    """weights() -> (w_q, w_scale) of the next rotating copy."""
    def path(cfg):
        return lambda: w8_kernel.int8_wo_gemm_triton(x, *weights(), None, large_m=cfg)
    out = {"dequant": path({"kernel": "dequant"})}
    out.update({"tiles " + json.dumps(c): path(c) for c in W8_CONFIGS})
    out.update({"dot " + json.dumps(c): path(c) for c in W8_DOT_CONFIGS if x.shape[0] <= 4 * c["BLOCK_M"]})
    return out


def time_candidates(cands: dict, ref: torch.Tensor) -> dict:
    """{name: {"us": .., "rel_err": ..}} (no "us" for a failing or wrong candidate)."""
    res = {}
    for name, fn in cands.items():
        try:
            y = fn().float()
            err = ((y - ref).norm() / ref.norm()).item()
            res[name] = {"rel_err": err}
            if err < 2e-2:
                res[name]["us"] = bench(fn, copies=4)
        except Exception as exc:  # a configuration Triton cannot compile, or no sm90 scaled_mm
            res[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return res


def best(res: dict) -> tuple[str, float]:
    ok = [(v["us"], k) for k, v in res.items() if "us" in v]
    if not ok:
        return "-", float("nan")
    us, name = min(ok)
    return name, us


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.set_defaults(ms=[16, 64, 256, 1024, 4096])
    ap.add_argument("--ops", nargs="*", default=["fp8_block", "w8a16"])
    args = ap.parse_args()
    quant = torch.compile(quantize_activation_blocks)
    set_mode(args)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda")
        wq, ws = quantize_weight_blocks(w)
        w8, s8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8), torch.rand(n, device="cuda") * 0.01
        base = (w.t().contiguous().to(torch.bfloat16), (wq, ws), (w8, s8 + 1e-3))
        del w
        # equal copies at different addresses, rotated so small M reads HBM, not L2
        copies = rotating(lambda: (base[0].clone(), tuple(t.clone() for t in base[1]),
                                   tuple(t.clone() for t in base[2])), k * n * 4)
        w16, (wq, ws), (w8, s8) = base
        ref8_w = wq.float() * ws.repeat_interleave(128, 0).repeat_interleave(128, 1)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"K": k, "N": n, "M": m, "bf16": bench(lambda: x @ copies()[0], copies=4)}
            row["fp8_block"], row["w8a16"] = {}, {}
            if "fp8_block" in args.ops:
                xq, sx = quantize_activation_blocks(x)
                ref8 = (xq.float() * sx.repeat_interleave(128, 1)) @ ref8_w.t()
                row["fp8_block"] = time_candidates(fp8_candidates(x, lambda: copies()[1]), ref8)
                row["fp8_quant_compiled_us"] = bench(lambda: quant(x), copies=4)
                row["fp8_quant_triton_us"] = {bm: bench(lambda: quantize_blocks_triton(x, 4, block_m=bm), copies=4)
                                              for bm in (16, 32, 64)}  # the op uses block_m=32
            if "w8a16" in args.ops and m > 16:
                ref16 = x.float() @ (w8.float() * s8[:, None]).t()
                row["w8a16"] = time_candidates(w8_candidates(x, lambda: copies()[2]), ref16)
            rows.append(row)
            line = f"{k}x{n} M={m}: bf16 {row['bf16']:.1f}"
            for op in ("fp8_block", "w8a16"):
                if row[op]:
                    name, us = best(row[op])
                    line += f" | {op} {us:.1f} ({row['bf16'] / us:.2f}x) {name}"
                    if op == "fp8_block":
                        tname, tus = best({c: v for c, v in row[op].items() if c.startswith("triton")})
                        line += f" [best triton {tus:.1f} {tname}]"
                    if op == "fp8_block" and "us" in row[op].get("scaled_mm", {}):
                        line += (f" [scaled_mm {row[op]['scaled_mm']['us']:.1f}, quant: compiled aten "
                                 f"{row['fp8_quant_compiled_us']:.1f}, triton by block_m "
                                 + " / ".join(f"{v:.1f}" for v in row['fp8_quant_triton_us'].values()) + "]")
            print(line, flush=True)
            save_rows(args.out, rows)


if __name__ == "__main__":
    main()
