"""The GEMM plugins' shared epilogue (`gemm_dispatch.add_bias`): the float32 sum of y and the bias, rounded once."""
from __future__ import annotations

import pytest
import torch

from qcompile.plugins.gemm_dispatch import add_bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias_dtype", ["same", "float32", None])
def test_add_bias_is_the_float32_sum_rounded_once(dtype, bias_dtype):
    gen = torch.Generator().manual_seed(7)
    # magnitudes over 20 binades, so sums that round (and near-cancellations) occur
    y = (torch.randn(64, 96, generator=gen) * 2.0 ** torch.randint(-10, 10, (64, 96), generator=gen)).to(dtype)
    bias = None if bias_dtype is None else torch.randn(96, generator=gen).to(
        dtype if bias_dtype == "same" else torch.float32)
    want = y.to(torch.float32) if bias is None else y.to(torch.float32) + bias.to(torch.float32)
    got = add_bias(y, bias, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))
    assert add_bias(y.to(torch.float32), bias, dtype).equal(want.to(dtype))  # float32 accumulators too
