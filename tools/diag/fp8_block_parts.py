"""Diagnostic (H200): where the FP8-block op's time goes above 16 rows (the sm90 cuBLASLt path), per K x N and M.

Times side by side, replayed from CUDA graphs: cuBLAS bf16; the op (x quantized by our Triton kernel + block-wise
`torch._scaled_mm` with the bias in its epilogue); the GEMM alone on x quantized beforehand, with and without the
bias; and the 1x128 quantization kernel alone in several row-block sizes and warp counts (its byte floor: x read
once, FP8 x and the scales written once, at the copy ceiling of 4.27 TB/s). Results: $OUT/fp8_block_parts.json.

    python3 tools/diag/fp8_block_parts.py [KxN ...]
"""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, "tools")
from gpu_timing import MODE, bench, rotating  # noqa: E402
from probe_util import run_grid  # noqa: E402

from qcompile.plugins.fp8_block_gemm import quantize_weight_blocks  # noqa: E402
from qcompile.plugins.fp8_block_gemm import kernel as fk  # noqa: E402
from qcompile.plugins.fp8_block_gemm import register  # noqa: E402
from qcompile.plugins.fp8_block_gemm.format import BLOCK  # noqa: E402

COPY_TBPS = 4.27
QUANT = [(bm, w) for bm in (8, 16, 32, 64) for w in (1, 2, 4, 8) if bm * BLOCK // (32 * w) >= 4]


def cell(k: int, n: int, m: int) -> dict:
    op = register()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda")
    wq, ws = quantize_weight_blocks(w)
    w16 = w.t().contiguous().to(torch.bfloat16)
    del w
    weights = rotating(lambda: (wq.clone(), ws.clone()), k * n)
    bf = rotating(lambda: w16.clone(), 2 * k * n)
    xq, sx = fk.quantize_blocks_triton(x, 4)  # the shipped tile: the reference for the variants below
    r = {"bf16": bench(lambda: x @ bf(), copies=4), "op": bench(lambda: op(x, *weights(), bias), copies=4),
         "gemm_bias": bench(lambda: torch._scaled_mm(xq, weights()[0].t(), sx, weights()[1].t(), bias=bias,
                                                     out_dtype=torch.bfloat16), copies=4),
         "gemm": bench(lambda: torch._scaled_mm(xq, weights()[0].t(), sx, weights()[1].t(),
                                                out_dtype=torch.bfloat16), copies=4),
         "quant_floor": (2 * m * k + m * k + 4 * m * k // BLOCK) / (COPY_TBPS * 1e6)}
    for bm, warps in QUANT:
        def quantize(bm=bm, warps=warps):
            return fk.quantize_blocks_triton(x, 4, block_m=bm, num_warps=warps)
        q = quantize()
        same = torch.equal(q[0].view(torch.uint8), xq.view(torch.uint8)) and torch.equal(q[1], sx)
        r[f"quant bm={bm} w={warps}"] = bench(quantize, copies=4) if same else "MISMATCH"
    r["bf16/op"] = r["bf16"] / r["op"]
    print(f"{k}x{n} M={m}: " + ", ".join(f"{key} {v:.1f}" if isinstance(v, float) else f"{key} {v}"
                                         for key, v in r.items()), flush=True)
    return r


if __name__ == "__main__":
    MODE["graph"] = True
    shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]] or [(4096, 4096), (14336, 4096)]
    run_grid(cell, shapes, (1024, 4096), "fp8_block_parts.json")
