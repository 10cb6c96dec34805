#!/usr/bin/env python3
"""Does the FP4 one-dot kernel's TMA tile work inside an AOTInductor package? (H200; not part of the product.)

The 17-64-row TMA tile (`[BLOCK_N, 8]` word boxes: 32-byte rows) was 13-14% faster than the shipped pointer tile on
layers with K >= 8192 (BENCHMARKS.md, twenty-sixth session), but INT4's TMA tiles needed 128-byte box rows before
AOTInductor's descriptors worked. This exports the op with that tile on every 17-64-row call, packages it, and
compares 40 rows against float64 (the eager op with the same tile alongside). Prints one line per check.

On the H200 it did (twenty-seventh session: relative L2 1.68e-3 for the eager op and the package alike,
benchmarks/fp4_tma_aoti_check_s27.log), so the tile now ships for K >= 8192 (`kernel.MID_TMA`); this check forces it
on at any K.

    LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 tools/diag/fp4_tma_aoti_check.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from fp4_testutil import aoti_fp4_linear, args, oracle, planar_case  # noqa: E402

from qcompile.plugins.fp4_gemm import kernel  # noqa: E402

K, N, M = 8192, 256, 40


def rel(y, ref) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


def main() -> None:
    kernel.ONE_DOT = [(limit, dict(cfg, tma=dict(kernel.MID_TMA, min_k=0)) if limit == kernel.MID_M_MAX else cfg)
                      for limit, cfg in kernel.ONE_DOT]  # the shipped tile, at any K
    case = planar_case("nvfp4", k=K, n=N, seed=3)
    weights = [t.cuda() if t is not None else None for t in args(case)]
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = torch.from_numpy(oracle(x, case, bias.cpu()))
    eager = torch.ops.qcompile.fp4_gemm(x.cuda(), *weights, None, bias, case["block"])
    print(f"eager op with the TMA tile, {M} rows: rel L2 {rel(eager, ref):.2e}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            y = aoti_fp4_linear(weights, bias, case["block"], K, Path(tmp) / "tma.pt2")(x.cuda())
        except Exception as exc:  # noqa: BLE001  (the point is to see whether and how it fails)
            print(f"AOTInductor package with the TMA tile: FAILED ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[-1][:300]})")
            return
    err = rel(y, ref)
    print(f"AOTInductor package with the TMA tile, {M} rows: rel L2 {err:.2e} ({'PASS' if err < 1e-2 else 'WRONG'})")


if __name__ == "__main__":
    main()
