"""The FP4 GEMV on planar words (`plugins/fp4_gemm/gemv_planar.py`) against a float64 oracle under the CPU
interpreter (TRITON_INTERPRET=1: the emulated fp16x2 chains; skipped without triton) and on CUDA (the inline PTX). Its
pair decoding (`planar.pair_bits`) is checked for every code in test_fp4_planar.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fp4_testutil import FMTS, REL, cuda, oracle, planar_case, triton_interp


# ---------------------------------------------------------------- the GEMV vs float64

def assert_rel_l2_rows(y, ref: np.ndarray, dtype):
    """Relative L2 error of each row (each row of x has its own magnitudes) within REL[dtype]."""
    got = y.detach().double().cpu().numpy().reshape(ref.shape)
    for i in range(ref.shape[0]):
        err = np.linalg.norm(got[i] - ref[i]) / max(np.linalg.norm(ref[i]), 1e-30)
        assert err <= REL[dtype], f"row {i}: relative L2 error {err:.3g} > {REL[dtype]}"


def wide_x(m: int, k: int, dtype, seed: int) -> torch.Tensor:
    """Rows of x whose 16-blocks differ wildly in magnitude: row 0 from 1e-3 to 1e3 per block (shuffled), row 1 all
    about 1e-4 (on the GPU its fp16 products with `e2m1 * 2**-14` underflow unless scaled), row 2 up to 3e4
    (near fp16's largest); bf16 also beyond fp16's range (1e-8 and 1e8 blocks)."""
    g = torch.Generator().manual_seed(seed)
    kb = k // 16
    mags = [torch.logspace(-3, 3, kb)[torch.randperm(kb, generator=g)], torch.full((kb,), 1e-4),
            torch.full((kb,), 8e3)]
    if dtype == torch.bfloat16:
        mags[0][0::5], mags[0][1::5] = 1e-8, 1e8
    x = torch.randn(m, k, generator=g) * torch.stack(mags[:m]).repeat_interleave(16, dim=1)
    return x.to(dtype)


def run_case(fmt, m, k, n, has_bias, dtype, device, cfg=None):
    from qcompile.plugins.fp4_gemm.gemv_planar import launch_gemv_planar

    case = planar_case(fmt, k, n, seed=k + m, zero_scales=True)
    x = wide_x(m, k, dtype, seed=k)
    bias = torch.randn(n) if has_bias else None
    dev = [t.to(device) if t is not None else None for t in (x, case["w_packed"], case["w_scale"], case["w_global"],
                                                              bias)]
    y = launch_gemv_planar(*dev, case["block"], cfg)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_rel_l2_rows(y, oracle(x, case, bias), dtype)


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k", [64, 192, 1024])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_gemv_planar_interpreter(fmt, m, k, has_bias):
    """fp16 x, N = 37 (not a multiple of BLOCK_N); chunks per step: one partial step (K = 64), two steps with a
    partial last one (K = 192), four (K = 1024)."""
    from qcompile.plugins.fp4_gemm.gemv_planar import GEMV_PLANAR

    run_case(fmt, m, k, 37, has_bias, torch.float16, "cpu", dict(GEMV_PLANAR, BLOCK_C={64: 64, 192: 2, 1024: 4}[k]))


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
def test_gemv_planar_even_grid_interpreter(fmt):
    """N and the chunks fill the grid (EVEN: no masks, no clamped addresses): N = 38 rows of 2, K = 1024 in steps
    of 4 chunks."""
    from qcompile.plugins.fp4_gemm.gemv_planar import GEMV_PLANAR

    run_case(fmt, 1, 1024, 38, True, torch.float16, "cpu", dict(GEMV_PLANAR, BLOCK_N=2, BLOCK_C=4))


@triton_interp
def test_gemv_planar_extreme_mxfp4_scales_interpreter():
    """E8M0 scales from 2**-127 (code 0: normal only through the 2**16 shift) to 2**8 in one weight."""
    from qcompile.plugins.fp4_gemm.gemv_planar import launch_gemv_planar

    case = planar_case("mxfp4", 256, 16, seed=4)
    case["w_scale"] = torch.randint(100, 136, case["w_scale"].shape, generator=torch.Generator().manual_seed(4),
                                    dtype=torch.uint8)
    case["w_scale"][:, 0] = 0
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    y = launch_gemv_planar(x, case["w_packed"], case["w_scale"], None, None, case["block"])
    assert torch.isfinite(y).all()
    assert_rel_l2_rows(y, oracle(x, case), torch.float16)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k", [64, 1024, 4096])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_cuda_gemv_planar(fmt, dtype, m, k, has_bias):
    """The inline PTX: fp16 and bf16 x over many decades, N = 263 (a partial tile of rows), K of 1 to 64 chunks."""
    run_case(fmt, m, k, 263, has_bias, dtype, "cuda")
