"""Tests of the INT4 GEMV (`plugins/int4_gemm/gemv.py`, the op's M = 1-16 path): its loops, x's fp16 pairs
(`x_pairs`), the tensor-core GEMV (`mma_gemv`), the cast and bias finished in the kernel, the packed-half2 path;
under the CPU interpreter and on the GPU, against float64."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from int4_testutil import assert_finished_like, cuda, make_case, needs_triton, oracle, triton_interp
from qc_testutil import assert_close_to, launch_spy

GEMV_LOOPS = [(0, 0), (8, 0), (0, 3)]  # (split-K waves, `pipeline` stages: 0 = the plain loop)


@triton_interp
@pytest.mark.parametrize("group", [32, 128, "channel"])
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
def test_gemv_kernel_interpreter(group, zero):
    """The GEMV, split-K and not, plain and pipelined loop. x holds bf16 values (what engines feed): its
    x * (136 + q) products are then exact."""
    from qcompile.plugins.int4_gemm import gemv

    k, n = 384, 80
    case = make_case(k=k, n=n, group=group, zero=zero, seed=5)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).float()
    for waves, pipeline in GEMV_LOOPS:
        cfg = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "waves": waves, "pipeline": pipeline}
        acc = gemv.launch_gemv(x, case["w_packed"], case["scale"], case["w_zero"], case["g"], cfg, num_sms=1)
        assert acc.dtype == torch.float32 and acc.shape == (2, n)
        assert_close_to(acc, oracle(x, {**case, "bias": None}), 1e-5)


def rows_strided(x: torch.Tensor, device: str, stride: int) -> torch.Tensor:
    """x's values on `device` with rows `stride` elements apart (x.to() would make a gapped view contiguous)."""
    view = torch.zeros(x.shape[0] * stride, dtype=x.dtype, device=device).as_strided(x.shape, (stride, 1))
    return view.copy_(x)


def rows_across_binades(k: int, seed: int) -> torch.Tensor:
    """fp16 x [3, K]: a row of plain values, one with four thousand-sized outliers, one of 1e-4-sized values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, k, generator=gen)
    x[1, torch.randint(0, k, (4,), generator=gen)] = torch.tensor([3000.0, -2500.0, 1800.0, -4000.0])
    x[2] *= 1e-4
    return x.to(torch.float16)


def check_gemv_x_pairs(device: str, k: int, n: int, groups, cfgs, sms: int):
    """The GEMV with `x_pairs` (fp16 x on planar words: x's fp16 values as the pairs, one power-of-two scale per
    program) takes that path (PAIRS at the launch), and is close to float64 on x whose rows span many binades: one
    row of plain values, one with a few thousand-sized outliers (the scale must keep fp16 sums finite), one tiny
    (its products must stay normal fp16), all in fp16 products (the half2 GEMV's 2^-11 each). x's rows are
    contiguous (each 4-byte aligned: its pairs load as int32 words) or an odd number of elements apart (the middle
    row only 2-byte aligned: two fp16 loads per pair), in one launch."""
    from qcompile.plugins.int4_gemm import gemv

    x = rows_across_binades(k, seed=k + n)
    for group in groups:
        case = make_case(k=k, n=n, group=group, seed=n)
        for cfg, stride in [(cfg, k) for cfg in cfgs] + [(cfgs[-1], k + 1)]:
            launches = []
            y = gemv.launch_gemv(rows_strided(x, device, stride), case["w_packed"].to(device),
                                 case["scale"].to(device), None, case["g"], dict(cfg, x_pairs=True), num_sms=sms,
                                 wrap=launch_spy(lambda grid, kw: launches.append(kw)))
            assert [kw["PAIRS"] for kw in launches] == [True]
            want = oracle(x.float(), {**case, "bias": None})
            got = y.double().cpu().numpy()
            for row in range(3):  # each row to its own size: the tiny row is not lost beside the outliers
                scale = np.abs(want[row]).max()
                np.testing.assert_allclose(got[row], want[row], rtol=3e-3, atol=3e-3 * scale)


@triton_interp
def test_gemv_x_pairs_interpreter():
    """(`check_gemv_x_pairs`) K whole and split in 32-K steps (a split that ends inside a 64-K block of the planar
    words, whose pairs reach into the next split's K), on 64-, 128- and whole-K groups."""
    cfgs = [{"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "waves": waves} for waves in (0, 8)]
    check_gemv_x_pairs("cpu", 448, 80, [64, "channel"], cfgs, 1)  # 2 splits of 224 K: the first ends mid-block
    check_gemv_x_pairs("cpu", 384, 80, [128], cfgs, 1)


MMA_CFG = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "waves": 0,
           "mma": {"warps": 2, "waves": 8}}


def check_gemv_mma(k: int, n: int, groups, cfg: dict, sms: int):
    """The tensor-core GEMV (`mma_gemv`, fp16 x on planar words) takes the launch and matches float64 closely:
    its products are exact and its sums fp32. x rows as in `check_gemv_x_pairs` (outliers, tiny values; contiguous
    or an odd number of elements apart: int32 or fp16 loads of x's pairs), K split or not per `cfg`."""
    from qcompile.plugins.int4_gemm import gemv

    x = rows_across_binades(k, seed=k * 3 + n)
    for group, stride in itertools.product(groups, (k, k + 1)):
        case = make_case(k=k, n=n, group=group, seed=n + stride)
        launched = []
        y = gemv.launch_gemv(rows_strided(x, "cuda", stride), case["w_packed"].cuda(), case["scale"].cuda(), None,
                             case["g"], cfg, num_sms=sms, wrap=launch_spy(lambda grid, kw: launched.append(kw)))
        assert [kw["WARPS"] for kw in launched] == [cfg["mma"]["warps"]]  # the MMA kernel's launch, no other
        want = oracle(x.float(), {**case, "bias": None})
        got = y.double().cpu().numpy()
        for row in range(3):
            scale = np.abs(want[row]).max()
            np.testing.assert_allclose(got[row], want[row], rtol=1e-4, atol=1e-5 * scale)


@needs_triton
def test_gemv_mma_takes_fp16_x_on_planar_words_with_no_zero_points(monkeypatch):
    """The tensor-core GEMV (a GEMV bucket's "mma") takes fp16 x on planar words, symmetric, N a multiple of 64;
    elsewhere the GEMV kernel runs. "paired" loads int64 words only where the weight is 8-byte aligned (checked at the
    launch, without running)."""
    from qcompile.plugins.int4_gemm import gemv

    monkeypatch.setattr(gemv, "ptx_available", lambda: True)  # as on a GPU, also under the CPU interpreter
    seen = []

    class Stop(Exception):
        """Raised at the launch (after its arguments are recorded), so no kernel runs."""

    def record(grid, kw):
        seen.append("mma" if "WARPS" in kw else "gemv")  # `_int4_gemv_mma_kernel` or `_int4_gemv_kernel`
        raise Stop

    for dtype, k, n, group, zero, want in ((torch.float16, 128, 64, 64, False, "mma"),
                                           (torch.float16, 256, 128, "channel", False, "mma"),
                                           (torch.bfloat16, 128, 64, 64, False, "gemv"),
                                           (torch.float16, 96, 64, 32, False, "gemv"),  # not planar
                                           (torch.float16, 128, 64, 64, True, "gemv"),
                                           (torch.float16, 128, 96, 64, False, "gemv")):  # N not in 64-column warps
        case = make_case(k=k, n=n, group=group, zero=zero)
        with pytest.raises(Stop):
            gemv.launch_gemv(torch.zeros(1, k, dtype=dtype), case["w_packed"], case["scale"], case["w_zero"],
                             case["g"], MMA_CFG, num_sms=1, wrap=launch_spy(record))
        assert seen[-1] == want
    aligned = make_case(k=128, n=64, group=64)["w_packed"]
    shifted = torch.empty(aligned.numel() + 1, dtype=aligned.dtype)[1:].view(aligned.shape).copy_(aligned)  # 4 bytes
    paired = []
    for w in (aligned, shifted):  # int64 word loads only on the 8-byte aligned weight
        with pytest.raises(Stop):
            gemv.launch_gemv(torch.zeros(1, 128, dtype=torch.float16), w, torch.ones(2, 64), None, 64,
                             dict(MMA_CFG, mma=dict(MMA_CFG["mma"], paired=True)), num_sms=1,
                             wrap=launch_spy(lambda grid, kw: paired.append(kw["PAIRED"]) or record(grid, kw)))
    assert paired == [True, False]


@needs_triton
def test_x_scale_span_covers_each_splits_64_k_blocks():
    """`gemv.x_span`: a power of two no shorter than the whole 64-K blocks (cut at K) that any split touches,
    counted K by K."""
    from qcompile.plugins.int4_gemm.gemv import x_span

    for k, per in ((4096, 64), (14336, 448), (448, 224), (448, 96), (384, 384), (640, 160)):
        splits = -(-k // per)
        need = 0
        for i in range(splits):
            touched = {kk // 64 for kk in range(i * per, min(i * per + per, k))}
            covered = [kk for kk in range(k) if kk // 64 in touched]
            need = max(need, max(covered) - min(covered) + 1)
        span = x_span(k, per, splits)
        assert need <= span < 2 * need and span & (span - 1) == 0


@needs_triton
def test_gemv_x_pairs_needs_fp16_x_planar_words_and_no_zero_points():
    """`x_pairs` applies only where the pairs are x's own values: fp16 x, planar words (K and the group multiples of
    64), symmetric weights; elsewhere the GEMV keeps its per-step pairs. The shipped GEMV bucket sets it (checked at
    the launch, without running)."""
    from qcompile.plugins.int4_gemm import gemv, kernel

    seen = []

    class Stop(Exception):
        """Raised at the launch (after its arguments are recorded), so no kernel runs."""

    def record(grid, kw):
        seen.append(kw["PAIRS"])
        raise Stop

    cfg = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "waves": 0, "x_pairs": True}
    for dtype, k, group, zero, want in ((torch.float16, 128, 64, False, True), (torch.bfloat16, 128, 64, False, False),
                                        (torch.float16, 96, 32, False, False), (torch.float16, 128, 64, True, False),
                                        (torch.float16, 128, 64, False, "shipped")):
        if want == "shipped":  # as engines launch it: the shipped GEMV bucket takes x's pairs
            cfg, want = kernel.CONFIGS[0][1], True
        case = make_case(k=k, n=32, group=group, zero=zero)
        with pytest.raises(Stop):
            gemv.launch_gemv(torch.zeros(1, k, dtype=dtype), case["w_packed"], case["scale"], case["w_zero"],
                             group, cfg, num_sms=1, wrap=launch_spy(record))
        assert seen[-1] is want


def check_gemv_finished_in_the_kernel(out_dtype, with_bias, device, shapes, exact):
    """The GEMV with the cast and bias in the kernel (`launch_gemv(..., out_dtype=)`: the last split of each tile
    writes the output), split K and not, for each (M, K, N, group): as the fp32 GEMV followed by the op's epilogue
    (`assert_finished_like`), and close to float64."""
    from qcompile.plugins.int4_gemm import gemv, kernel

    sms = 1 if device == "cpu" else 132
    for m, k, n, group in shapes:
        case = make_case(k=k, n=n, group=group, seed=m + n)
        bias = case["bias"].to(out_dtype).to(device) if with_bias else None
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(out_dtype)
        on = [t.to(device) for t in (x, case["w_packed"], case["scale"])] + [None]
        # K whole; split (on one SM: 4 splits at K = 384, N = 80 in 3 tiles of 32); on the GPU the shipped tile too
        cfgs = [{"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "waves": waves} for waves in (0, 32)]
        for cfg in cfgs + ([kernel.CONFIGS[0][1]] if device == "cuda" else []):
            y = gemv.launch_gemv(*on, group, cfg, bias=bias, out_dtype=out_dtype, num_sms=sms)
            assert_finished_like(y, gemv.launch_gemv(*on, group, cfg, num_sms=sms), bias, out_dtype, exact)
            assert_close_to(y.float(), oracle(x, {**case, "bias": None if bias is None else bias.float().cpu()}),
                            1e-2)


@triton_interp
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gemv_finished_in_the_kernel_interpreter(out_dtype, with_bias):
    """(`check_gemv_finished_in_the_kernel`) fp16 bit for bit, bf16 within one rounding: the interpreter truncates
    float32 -> bf16 (the GPU rounds to nearest even)."""
    check_gemv_finished_in_the_kernel(out_dtype, with_bias, "cpu", [(1, 384, 80, 64), (2, 384, 80, 64)],
                                      exact=out_dtype == torch.float16)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_cuda_gemv_finished_in_the_kernel(out_dtype, with_bias):
    """(`check_gemv_finished_in_the_kernel`) on the GPU, where the splits of a tile run at once and only the count
    says which one is last: the decode layers' Q/K/V and down shapes (16 and 32 splits of the test tile, 64 of the
    shipped one), and three rows."""
    check_gemv_finished_in_the_kernel(out_dtype, with_bias, "cuda", [(1, 4096, 6144, 128), (1, 14336, 4096, 128),
                                                                    (3, 1024, 1000, 128)], exact=False)


HALF2_CASES = pytest.mark.parametrize(
    "dtype, magnitude", [(torch.float16, 1.0), (torch.float16, 1e4), (torch.bfloat16, 1e-6), (torch.bfloat16, 1e6)],
    ids=["fp16", "fp16-big", "bf16-tiny", "bf16-huge"])


def check_gemv_half2(group, zero, dtype, magnitude, k, rel, device="cpu"):
    """16-bit x takes the GEMV's packed-half2 path (fp16 pairs, x / 16 for the odd nibbles, power-of-two scaling
    per step): x at 1e-6 and 1e6 (outside fp16's range before the scaling) and a 100x outlier channel still give
    the float64 result, split K and not, plain and pipelined loop."""
    from qcompile.plugins.int4_gemm import gemv

    n = 80
    case = make_case(k=k, n=n, group=group, zero=zero, seed=7)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(7)) * magnitude
    x[:, 5] *= 100 if magnitude <= 1 else 1
    x = x.to(dtype)
    args = [t.to(device) if t is not None else None for t in (x, case["w_packed"], case["scale"], case["w_zero"])]
    for waves, pipeline in GEMV_LOOPS:
        cfg = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "waves": waves, "pipeline": pipeline}
        acc = gemv.launch_gemv(*args, case["g"], cfg, num_sms=1)
        assert acc.dtype == torch.float32 and acc.shape == (2, n) and torch.isfinite(acc).all()
        assert_close_to(acc, oracle(x, {**case, "bias": None}), rel)


@triton_interp
@pytest.mark.parametrize("group", [32, 128], ids=["g32", "g128"])
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@HALF2_CASES
def test_gemv_half2_path_interpreter(group, zero, dtype, magnitude):
    """The plain-Triton stand-in of the PTX: fp32 products of the same fp16 pairs, so float64-close."""
    check_gemv_half2(group, zero, dtype, magnitude, k=384, rel=1e-5)



# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group", [32, 128], ids=["g32", "g128"])
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@HALF2_CASES
def test_cuda_gemv_half2_path(group, zero, dtype, magnitude):
    """The inline PTX on the GPU: products rounded to fp16 (about 4e-4 relative on a 4096-long dot)."""
    check_gemv_half2(group, zero, dtype, magnitude, k=4096, rel=2e-3, device="cuda")


@pytest.mark.gpu
@cuda
def test_cuda_gemv_x_pairs_matches_float64():
    """(`check_gemv_x_pairs`) the scaled_pair PTX on the GPU, at the decode layers' K and on the shipped GEMV tile."""
    from qcompile.plugins.int4_gemm import kernel

    check_gemv_x_pairs("cuda", 4096, 1024, [128], [kernel.CONFIGS[0][1]], 132)
    check_gemv_x_pairs("cuda", 14336, 512, [128], [kernel.CONFIGS[0][1]], 132)


@pytest.mark.gpu
@cuda
def test_cuda_gemv_mma_matches_float64():
    """(`check_gemv_mma`) the mma.sync PTX: the decode layers' K, 64- and 128-K groups and per channel, K split
    (waves) or whole, 2 and 4 warps a program, unmasked (EVEN) and masked, a tile's two rows 8 columns apart or
    adjacent ("paired": int64 word loads)."""
    check_gemv_mma(4096, 1024, [128, "channel"], MMA_CFG, 132)
    check_gemv_mma(14336, 512, [128], dict(MMA_CFG, mma={"warps": 4, "waves": 16}), 132)
    check_gemv_mma(1024, 256, [128], dict(MMA_CFG, mma={"warps": 2, "waves": 0}), 132)
    check_gemv_mma(4096, 1024, [128], dict(MMA_CFG, mma={"warps": 4, "waves": 16, "paired": True}), 132)
    # masked: the last program's second warp past N, the last split 448 K of 512 (31 blocks in 4 splits)
    for paired in (False, True):
        check_gemv_mma(1984, 192, [64], dict(MMA_CFG, mma={"warps": 2, "waves": 8, "paired": paired}), 132)
