"""The W4A8 entry of the INT4 kernels (`kernel.int4_gemm_triton` with FP8 x and per-row scales) vs float64."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from qcompile.algorithms.int4 import quantize_rtn
from qcompile.plugins.int4_gemm.format import onnx_to_engine

HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_interp = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(m, k=256, n=48, group=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_rtn(torch.randn(k, n, generator=gen), group, symmetric=False)
    w_packed, w_zero = onnx_to_engine(qw.q, qw.zero, signed=False, group_size=group)
    x = torch.randn(m, k, generator=gen) * 3
    row_scale = x.abs().amax(dim=1) / 448.0  # per-token scales
    x8 = (x / row_scale[:, None]).to(torch.float8_e4m3fn)
    q = qw.q.numpy().astype(np.float64) - np.repeat(qw.zero.numpy().astype(np.float64), group, axis=0)
    w = q * np.repeat(qw.scale.numpy().astype(np.float64), group, axis=0)
    ref = (x8.float().numpy().astype(np.float64) * row_scale.numpy().astype(np.float64)[:, None]) @ w
    return (x8, w_packed, qw.scale, w_zero, group, row_scale), ref


def _rel(y, ref):
    return np.linalg.norm(y.double().cpu().numpy() - ref) / np.linalg.norm(ref)


def _run(args, device, out_dtype):
    from qcompile.plugins.int4_gemm import kernel

    x8, w_packed, scale, w_zero, group, row_scale = (a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    return kernel.int4_gemm_triton(x8, w_packed, scale, w_zero, None, group, x_row_scale=row_scale,
                                   out_dtype=out_dtype)


@triton_interp
@pytest.mark.parametrize("m", [1, 5, 20])
def test_w4a8_entry_interpreter(m):
    args, ref = _case(m, seed=m)
    y = _run(args, "cpu", torch.float16)
    assert y.dtype == torch.float16 and y.shape == (m, 48)
    assert _rel(y, ref) < 3e-3


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 16, 17, 300])
def test_w4a8_entry_cuda(m, out_dtype):
    args, ref = _case(m, seed=m)
    y = _run(args, "cuda", out_dtype)
    assert y.dtype == out_dtype and y.device.type == "cuda"
    assert _rel(y, ref) < (3e-3 if out_dtype == torch.float16 else 2e-2)


def test_w4a8_entry_rejects_a_float_x_with_row_scales():
    pytest.importorskip("triton")
    from qcompile.plugins.int4_gemm import kernel

    args, _ = _case(2)
    x8, w_packed, scale, w_zero, group, row_scale = args
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        kernel.int4_gemm_triton(x8.float(), w_packed, scale, w_zero, None, group, x_row_scale=row_scale,
                                out_dtype=torch.float16)
