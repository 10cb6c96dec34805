"""Tests of W4A4's activation fake-quantization kernel (`fp4_gemm/act_quant.py`): bit for bit the plain-torch
`format.nvfp4_fake_quantize` rounded to x's dtype, under the Triton CPU interpreter and on the GPU (gpu)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from qcompile.plugins.fp4_gemm import format as F

HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_interp = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SMALL_TILE = dict(BLOCK_M=4, BLOCK_K=64, num_warps=4)


def heavy_tailed(m, k, dtype, seed):
    """x [M, K] over many decades (so some blocks' E4M3 scales are subnormal or 0), with an all-zero block, a -0.0,
    and the largest magnitude setting the global scale as calibration would. Finite in `dtype` (fp16 tops out at
    65504; an inf would make the global scale and so every value NaN)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, k, generator=gen) * 3)
    x = x.clamp(-torch.finfo(dtype).max / 2, torch.finfo(dtype).max / 2)
    x[0, :16] = 0.0
    x[0, 16] = -0.0
    return x.to(dtype)


def reference(x, g):
    return F.nvfp4_fake_quantize(x.to(torch.float32), g.reshape(())).to(x.dtype)


def assert_bit_equal(got, want):
    """Equal values and equal signs of zero (torch.equal takes -0.0 == 0.0); NaNs equal whatever their sign."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(got) & torch.isnan(want)
    same = (got == want) | nan
    assert bool(same.all()), f"{int((~same).sum())} values differ, e.g. {got[~same][:4]} vs {want[~same][:4]}"
    assert torch.equal(torch.signbit(got)[~nan], torch.signbit(want)[~nan]), "signs of zero differ"


def run_kernel(x2d, g, device, cfg=SMALL_TILE):
    from qcompile.plugins.fp4_gemm.act_quant import nvfp4_fake_quantize_rows

    return nvfp4_fake_quantize_rows(x2d.to(device), g.reshape(1).to(device), cfg).cpu()


@triton_interp
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])  # the interpreter truncates float32 to bf16
@pytest.mark.parametrize("m, k", [(1, 64), (5, 48), (9, 512)])
def test_kernel_equals_the_reference_bit_for_bit(dtype, m, k):
    """M not whole row tiles, K (a multiple of 16) not whole column tiles."""
    x = heavy_tailed(m, k, DTYPES[dtype], seed=m * k)
    g = x.float().abs().amax() / (F.E2M1_MAX * F.E4M3_MAX)
    assert_bit_equal(run_kernel(x, g, "cpu"), reference(x, g))


@triton_interp
def test_rows_with_a_longer_stride():
    """x's rows as a slice of a wider tensor (a row stride larger than K) read where they are."""
    wide = heavy_tailed(6, 96, torch.float16, seed=7)
    x = wide[:, 16:80]
    g = torch.tensor(0.01)
    assert x.stride(0) == 96
    assert_bit_equal(run_kernel(x, g, "cpu"), reference(x.contiguous(), g))


@triton_interp
def test_block_scales_round_to_e4m3_like_torch_over_every_code_and_midpoint():
    """With g = 1 the block of amax 6v gets the scale e4m3(v) (6v / 6 is exact), and its largest element becomes
    e2m1(6v / scale) * scale. v runs over every positive E4M3 value, the midpoints between neighbours (ties to
    even), values one float32 step either side of each midpoint, and values past 448 (saturated)."""
    codes = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)  # 2**-9 .. 448
    mids = (codes[:-1] + codes[1:]) / 2
    v = torch.cat([codes, mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.full((), 1e9)),
                   torch.tensor([449.0, 464.0, 500.0, 1e6])])
    x = torch.zeros(len(v), 16)
    x[:, 0] = 6 * v
    x[:, 1] = -v  # an element well inside the grid
    g = torch.tensor(1.0)
    assert bool((6 * v / 6 == v).all())
    got = run_kernel(x, g, "cpu", dict(BLOCK_M=8, BLOCK_K=16, num_warps=4))
    assert_bit_equal(got, reference(x, g))
    scale = torch.clamp(v, max=448).to(torch.float8_e4m3fn).to(torch.float32)  # torch's cast, round to nearest even
    assert torch.equal(got[:, 0], F.e2m1_round(6 * v / scale) * scale)


@triton_interp
def test_e2m1_ties_go_to_the_even_code_and_values_past_6_saturate():
    """A block of scale 1 (amax 6, g = 1) holding every E2M1 midpoint, its neighbours and values past 6, both signs."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.cat([mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, torch.full((), 9.0)),
                        torch.tensor([6.0, 0.0])])
    x = torch.cat([values, -values, torch.tensor([-0.0])])
    x = torch.cat([x, torch.zeros(-len(x) % 16)]).reshape(-1, 16)
    x[:, 15] = 6.0
    got = run_kernel(x, torch.tensor(1.0), "cpu", dict(BLOCK_M=4, BLOCK_K=16, num_warps=4))
    assert_bit_equal(got, reference(x, torch.tensor(1.0)))
    assert got.flatten()[:7].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # ties: 0, 1, 1, 2, 2, 4, 4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m, k", [(1, 2048), (37, 5632)])
def test_cuda_kernel_equals_the_reference_bit_for_bit(dtype, m, k):
    x = heavy_tailed(m, k, DTYPES[dtype], seed=m)
    g = x.float().abs().amax() / (F.E2M1_MAX * F.E4M3_MAX)
    want = reference(x, g)
    assert bool(torch.isfinite(want).all())
    assert_bit_equal(run_kernel(x, g, "cuda", None), want)
