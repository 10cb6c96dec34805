"""The GEMM plugins' shared epilogues: `gemm_dispatch.add_bias` (the float32 sum of y and the bias, rounded once)
and `linear_bias` (the dequantize + cuBLAS paths' matmul with the bias in its epilogue); the split-K count
`split_for_waves`."""
from __future__ import annotations

import pytest
import torch

from qcompile.plugins.gemm_dispatch import add_bias, address_aligned, linear_bias, split_for_waves


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


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_add_bias_on_a_float32_accumulator_is_two_ops_and_the_float32_sum(bias_dtype):
    """The split-K ops' epilogue in eager calls: the 16-bit bias widened inside the add (one op for the sum, one for
    the cast), with the float32 sum's values; a float64 bias is first rounded to float32, not added in float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(11)
    acc = torch.randn(16, 40, generator=gen, dtype=torch.float64).mul(1e3).to(torch.float32)
    bias = torch.randn(40, generator=gen, dtype=torch.float64).to(bias_dtype)
    with CountOps() as mode:
        got = add_bias(acc, bias, torch.bfloat16)
    assert got.equal((acc + bias.to(torch.float32)).to(torch.bfloat16))
    if bias_dtype != torch.float64:
        assert len(mode.ops) == 2, mode.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias_dtype", ["same", "float32", None])
@pytest.mark.parametrize("out", ["same", "float32"])
def test_linear_bias_matches_float64(dtype, bias_dtype, out):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(33, 80, generator=gen).to(dtype)
    w_nk = torch.randn(48, 80, generator=gen).to(dtype)  # the FP4 / W8A16 layout, passed as a transposed view
    bias = None if bias_dtype is None else (torch.randn(48, generator=gen) * 4).to(
        dtype if bias_dtype == "same" else torch.float32)
    out_dtype = dtype if out == "same" else torch.float32
    got = linear_bias(x, w_nk.t(), bias, out_dtype)
    want = x.double() @ w_nk.double().t()
    if bias is not None:
        want = want + bias.to(dtype).double()  # the bias as x's dtype holds it
    assert got.dtype == out_dtype and got.shape == (33, 48)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8  # one rounding of the float32 sum (bf16: 2^-9 relative)
    err = (got.double() - want).abs() / want.abs().clamp_min(1.0)
    assert err.max().item() <= tol, f"{err.max().item():.3g}"


@pytest.mark.parametrize("k, tiles, resident, expected", [
    (8192, 448, 0, 1),  # occupancy unknown: the waves rule alone (448 tiles already exceed 2 waves of 132 SMs)
    (8192, 448, 3, 2),  # 448 programs on 396 slots: 2 waves of full-K programs; split in two, 3 of half K (1.5)
    (8192, 224, 3, 1),  # one resident wave holds them all: no extra split
    (8192, 792, 3, 1),  # exactly 2 resident waves: split in two, 4 waves of half K, no shorter
    (384, 448, 3, 1),   # 3 K steps: a split would be shorter than 2 steps
])
def test_split_for_waves_splits_again_when_programs_overflow_the_resident_slots(k, tiles, resident, expected):
    splits, per = split_for_waves(k, tiles, 128, 2, 132, resident)
    assert splits == expected
    assert per % 128 == 0 and (splits - 1) * per < k <= splits * per  # every split holds K, none is empty


def test_rows_of_a_batch_and_sequence_export_with_the_plain_row_stride():
    """An engine's x is [batch, seq, K] with both dims dynamic (seq may be 1): a reshape to rows would carry the
    symbolic row stride Min(K, K * seq), which AOTInductor writes verbatim into TMA descriptors in C++. The rows
    that `run_by_buckets` hands to its torch.cond buckets have the stride K, and every bucket computes the same
    product as a float64 matmul (M = 1 and 6 take the two buckets)."""
    import numpy as np

    from qcompile.plugins.gemm_dispatch import rows, run_by_buckets

    k, n = 64, 48
    w = torch.randn(k, n)

    class Gemm(torch.nn.Module):
        def forward(self, x, w):
            return run_by_buckets(x, k, n, [(1, lambda x2d, w: x2d @ w), (None, lambda x2d, w: (x2d * 1.0) @ w)], (w,))

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=1, max=32)
    ep = torch.export.export(Gemm(), (torch.randn(2, 3, k), w), dynamic_shapes=({0: batch, 1: seq}, None))
    conds = [node for node in ep.graph.nodes if node.target is torch.ops.higher_order.cond]
    assert conds
    operand = conds[0].args[3][0].meta["val"]
    assert operand.stride() == (k, 1), operand.stride()

    class Reshape(torch.nn.Module):
        def forward(self, x):
            return x.reshape(-1, k)

    plain = torch.export.export(Reshape(), (torch.randn(2, 3, k),), dynamic_shapes=({0: batch, 1: seq},))
    out = next(node for node in plain.graph.nodes if node.op == "output").args[0][0]
    assert "Min" in str(out.meta["val"].stride())  # what the rows would carry without `rows`
    module = ep.module()
    for b, s in ((1, 1), (2, 3)):
        x = torch.randn(b, s, k)
        np.testing.assert_allclose(module(x, w).double().numpy(), (x.double() @ w.double()).numpy(), rtol=1e-5,
                                   atol=1e-5)
    x = torch.randn(4, 5, k)[:, 1:4]  # rows that are not contiguous: copied
    assert rows(x, k).shape == (12, k) and torch.equal(rows(x, k), x.reshape(-1, k))
    assert rows(torch.randn(3, k * 2)[:, :k], k).stride() == (2 * k, 1)  # strided rows kept as they are


def test_address_aligned_reads_the_address_eagerly_and_traces_under_dynamo():
    """`address_aligned`: a real tensor's address decides (a view 4 bytes in is not 8-byte aligned); under Dynamo,
    which traces the op's `torch.cond` branches in an engine export, it answers True without a graph break (asking
    `is_fake` there broke the tensor-core GEMV's engine export: BENCHMARKS.md, forty-sixth session)."""
    base = torch.zeros(16, dtype=torch.int32)
    assert address_aligned(base, 8) and not address_aligned(base[1:], 8) and address_aligned(base[1:], 4)

    @torch.compile(fullgraph=True, backend="eager")
    def pick(t):
        return t + 1 if address_aligned(t, 8) else t - 1

    assert torch.equal(pick(base[1:]), base[1:] + 1)
