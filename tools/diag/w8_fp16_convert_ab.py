"""Diagnostic (H200): the W8A16 row dot kernel (M = 16, fp16 x) with our int8 -> fp16 conversion (`_int8_to`) or with
Triton's own (`--triton-convert`: one I2F per weight). Run once each way; prints µs per call replayed from a CUDA
graph (rotating weights) next to cuBLAS fp16, on the two layers with N = 4096 (the dot kernel's, not split_mma's).
Not part of the product."""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/
from gpu_timing import MODE, bench, rotating  # noqa: E402

from qcompile.plugins.int8_wo_gemm import kernel  # noqa: E402


@triton.jit
def _triton_convert(w, dtype: tl.constexpr):
    return w.to(dtype)


def main():
    if "--triton-convert" in sys.argv:
        kernel._int8_to = _triton_convert  # before the first compile: the kernels resolve it then
    MODE["graph"] = True
    for k, n in [(4096, 4096), (14336, 4096), (4096, 6144)]:
        x = torch.randn(16, k, device="cuda", dtype=torch.float16)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        s = torch.rand(n, device="cuda") * 0.01 + 1e-3
        ref = x.double() @ (w.double() * s.double()[:, None]).t()
        err = float((kernel.launch_dot(x, w, s, None).double() - ref).norm() / ref.norm())
        nw = rotating(lambda: w.clone(), n * k)
        n16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.float16), n * k * 2)
        t16 = bench(lambda: x @ n16())
        t = bench(lambda: kernel.launch_dot(x, nw(), s, None))
        way = "triton" if "--triton-convert" in sys.argv else "ours"
        print(f"{way} {k}x{n} M=16 fp16: cuBLAS {t16:.1f} dot {t:.1f} "
              f"({t16 / t:.2f}x) rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
