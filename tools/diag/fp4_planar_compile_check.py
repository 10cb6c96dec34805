"""Compile every specialization of the FP4 planar-word kernels for sm_90 on any machine (no GPU needed), so that a
Triton or ptxas error shows up before device time is spent: the one-dot kernel (bf16 / fp16 x, NVFP4 / MXFP4,
pointer / TMA loads, whole tiles or not, bias or not, split or not, its three tiles), the tile kernel and the
dequantize kernel with PLANAR, the planar GEMV and its x kernel. Not part of the product.

    cd tools/diag && PYTHONPATH=<triton>:$PWD/.. python3 fp4_planar_compile_check.py
"""
from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from sass_count import compile_sass  # noqa: E402

from qcompile.plugins.fp4_gemm import gemv_planar as gp  # noqa: E402
from qcompile.plugins.fp4_gemm import kernel as K  # noqa: E402
from qcompile.plugins.fp4_gemm import one_dot as f4o  # noqa: E402

failed: list = []
tried: list = []


def go(name, fn, sig, const, div, warps, stages):
    """Compile one specialization; record a failure with its last error line."""
    tried.append(name)
    try:
        compile_sass(fn, sig, const, div, warps, stages)
    except Exception as e:  # noqa: BLE001  (every failure is reported, the rest still compile)
        failed.append(name)
        print("FAIL", name, const, str(e).splitlines()[-1][:200], flush=True)


PTRS = ["x_ptr", "w_ptr", "s_ptr", "g_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "k_per_split"]
for dt, mx, tma, even, bias, atomic, (bm, bn) in itertools.product(
        ("bf16", "fp16"), (False, True), (False, True), (False, True), (False, True), (False, True),
        ((16, 128), (64, 64), (64, 128), (128, 64), (128, 128))):
    sig = dict(x_ptr=f"*{dt}", w_ptr="*i32", s_ptr="*u8", g_ptr="*fp32", b_ptr=f"*{dt}",
               y_ptr="*fp32" if atomic else f"*{dt}", M="i32", N="i32", K="i32", stride_xm="i32", k_per_split="i32")
    div = PTRS
    if tma:
        sig.update(x_ptr=f"tensordesc<{dt}[{bm}, 64]>", w_ptr=f"tensordesc<i32[{bn}, 8]>")
        div = [d for d in PTRS if d not in ("x_ptr", "w_ptr")]
    go("one_dot", f4o._fp4_one_dot_kernel, sig,
       dict(K_STEPS=4, MX=mx, POW_ACC=512.0, HAS_GLOBAL=not mx, HAS_BIAS=bias, EVEN=even, TMA=tma, ATOMIC=atomic,
            ASM=True, BLOCK_M=bm, BLOCK_N=bn), div, 4, 3)

for mx, even, cfg in itertools.product((False, True), (False, True), (K.SMALL, K.MID, K.WIDE)):  # fp32 x
    shift, x = (110, 16) if mx else (117, 9)
    fmt = dict(MX=mx, B=32 if mx else 16, SHIFT=shift, POW_SHIFT=2.0 ** shift, POW_ACC=2.0 ** x, HAS_GLOBAL=not mx)
    sig = dict(x_ptr="*fp32", w_ptr="*i32", s_ptr="*u8", g_ptr="*fp32", b_ptr="*fp32", y_ptr="*fp32", M="i32",
               N="i32", K="i32", stride_xm="i32")
    go("tile", K._fp4_gemm_kernel, sig,
       dict(fmt, K_STEPS=4, HAS_BIAS=True, ATOMIC=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=128,
            EVEN=even, PLANAR=True), ["x_ptr", "w_ptr", "s_ptr", "y_ptr", "N", "K", "stride_xm"], cfg["num_warps"],
       cfg["num_stages"])
    for out in ("bf16", "fp16", "fp32", "fp8e4nv"):  # fp8: the FP8 path's weight (plugins/fp8_large_m.py)
        go("dequant", K._fp4_dequant_kernel,
           dict(w_ptr="*i32", s_ptr="*u8", g_ptr="*fp32", mul_ptr="*fp32", out_ptr=f"*{out}", N="i32", K="i32"),
           dict(fmt, BLOCK_N=16, BLOCK_K=512, PLANAR=True, HAS_MUL=out == "fp8e4nv"),
           ["w_ptr", "s_ptr", "out_ptr", "N", "K"], 4, 1)

for dt, mx, bias in itertools.product(("bf16", "fp16"), (False, True), (False, True)):
    sig = dict(xs_ptr="*fp16", down_ptr="*fp32", w_ptr="*i32", s_ptr="*u8", g_ptr="*fp32", b_ptr=f"*{dt}",
               y_ptr=f"*{dt}", N="i32", KC="i32")
    for even in (False, True):
        go("gemv_planar", gp._fp4_gemv_planar_kernel, sig,
           dict(C_STEPS=4, MX=mx, HAS_GLOBAL=not mx, HAS_BIAS=bias, ASM=True, EVEN=even, BLOCK_N=4, BLOCK_C=64),
           ["xs_ptr", "w_ptr", "s_ptr", "y_ptr", "N", "KC"], 2, 3)
    go("x_scaled", gp._x_scaled_kernel, dict(x_ptr=f"*{dt}", xs_ptr="*fp16", down_ptr="*fp32", KB="i32",
                                             stride_xm="i32"), dict(BLOCK=64), ["x_ptr", "xs_ptr", "down_ptr"], 4, 1)

print(f"{len(tried) - len(failed)} of {len(tried)} specializations compiled for sm_90")
sys.exit(1 if failed else 0)
