"""Shared by the INT4 GEMM tests: fresh random INT4 weights in the engine layout, the float64 oracle, the skip
markers."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from qcompile.algorithms.int4 import quantize_rtn
from qcompile.plugins.int4_gemm import register
from qcompile.plugins.int4_gemm.format import onnx_to_engine

register()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_interp = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def make_case(k=256, n=48, group=32, zero=False, bias=True, seed=0):
    """Fresh random int4 weights: (q int8 [K,N] signed values, scale, zp int8 or None, bias, group) + engine args.

    With `zero`, the weights are asymmetric uint4 (q, zp in [0, 15]) shifted to the engine's signed form."""
    g = k if group == "channel" else group
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=gen)
    qw = quantize_rtn(w, g, symmetric=not zero)
    q, s, z = qw.q, qw.scale, qw.zero
    s = s * (1 + torch.rand(s.shape, generator=gen))  # scales not tied to the data: any positive value
    b = torch.randn(n, generator=gen) if bias else None
    wq_eng, z_eng = onnx_to_engine(q, z, signed=not zero, group_size=g)
    return {"q": q, "scale": s, "zero": z, "bias": b, "g": g, "w_packed": wq_eng, "w_zero": z_eng}


def oracle(x, case) -> np.ndarray:
    """Independent float64 numpy computation of the contract from the ONNX-form values."""
    q = case["q"].numpy().astype(np.float64)
    g = case["g"]
    zp = 0.0 if case["zero"] is None else np.repeat(case["zero"].numpy().astype(np.float64), g, axis=0)
    s = np.repeat(case["scale"].numpy().astype(np.float64), g, axis=0)
    y = x.float().numpy().astype(np.float64) @ ((q - zp) * s)
    if case["bias"] is not None:
        y = y + case["bias"].numpy().astype(np.float64)
    return y


def assert_finished_like(y, fp32, bias, out_dtype, exact: bool):
    """`y` (a kernel's output finished in the kernel) against the fp32 result `fp32` followed by the op's epilogue:
    bit for bit (`exact`: one order of the split sums, as in the interpreter), else within one rounding of
    out_dtype (on the GPU the atomics add the splits in a different order each run)."""
    from qcompile.plugins.gemm_dispatch import add_bias

    want = add_bias(fp32, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == want.shape
    rtol = 0 if exact else torch.finfo(out_dtype).eps
    torch.testing.assert_close(y, want, rtol=rtol, atol=0 if exact else 1e-5 * want.float().abs().max().item())
