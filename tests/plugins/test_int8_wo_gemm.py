"""Tests of the INT8 weight-only GEMM plugin (W8A16): reference and op vs float64 numpy, the ONNX node in ONNX
Runtime, the Triton kernel under the CPU interpreter, and the CUDA path (gpu)."""
from __future__ import annotations

import importlib.util
import itertools
import os

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import (assert_close_to, engine_dims, export_and_retrace_on_fake_cuda, export_on_fake_cuda,
                         fake_cuda_export, launch_spy, ort_session)
from qcompile.plugins.int8_wo_gemm import int8_wo_gemm_reference, onnx_schema, register

op = register()
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_interp = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_case(k=256, n=96, bias=True, seed=0):
    """(w_q int8 [N, K] as the op takes it, w_scale [N], bias [N] or None)."""
    gen = torch.Generator().manual_seed(seed)
    w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n, generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    return w_q, w_scale, b


def oracle(x, w_q, w_scale, bias) -> np.ndarray:
    """float64 numpy: x @ (q * s)^T + b, q [N, K]."""
    w = w_q.numpy().astype(np.float64) * w_scale.numpy().astype(np.float64)[:, None]
    y = x.float().numpy().astype(np.float64) @ w.T
    return y + bias.numpy().astype(np.float64) if bias is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_and_op_match_float64(dtype, bias):
    w_q, w_scale, b = make_case(bias=bias)
    x = torch.randn(2, 5, 256).to(DTYPES[dtype])
    ref = oracle(x, w_q, w_scale, b)
    assert_close_to(int8_wo_gemm_reference(x, w_q, w_scale, b), ref, REL[DTYPES[dtype]])
    y = op(x, w_q, w_scale, b)
    assert y.dtype == x.dtype and y.shape == (2, 5, 96)
    assert_close_to(y, ref, REL[DTYPES[dtype]])


@pytest.mark.parametrize("bad, message", [
    (dict(w_q=torch.zeros(256, 96, dtype=torch.int16)), "w_q must be int8"),
    (dict(w_scale=torch.ones(95)), "w_scale must be float"),
    (dict(x=torch.zeros(3, 128)), "x has K=128"),
    (dict(bias=torch.zeros(7)), "bias must be"),
])
def test_bad_arguments_name_the_tensor(bad, message):
    w_q, w_scale, b = make_case()
    args = dict(x=torch.zeros(3, 256), w_q=w_q, w_scale=w_scale, bias=b) | bad
    with pytest.raises(ValueError, match=message):
        int8_wo_gemm_reference(**args)


def test_onnx_node_runs_in_ort_like_the_contract():
    w_q, w_scale, b = make_case(k=64, n=32)
    node = onnx_schema.make_node("gemm", ["x", "w_q", "w_scale", "bias"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 32])],
                              [numpy_helper.from_array(w_q.t().contiguous().numpy(), "w_q"),  # ONNX: [K, N]
                               numpy_helper.from_array(w_scale.numpy(), "w_scale"),
                               numpy_helper.from_array(b.numpy(), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx_schema.add_to_model(model)
    x = torch.randn(7, 64)
    got = ort_session(model).run(None, {"x": x.numpy()})[0]
    assert_close_to(torch.from_numpy(got), oracle(x, w_q, w_scale, b), 1e-5)


@triton_interp
@pytest.mark.parametrize("m", [1, 5, 16, 17, 40, 257])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])  # the interpreter's bf16 tl.dot is broken
@pytest.mark.parametrize("bias", [True, False])
def test_triton_kernel_under_interpreter(m, dtype, bias):
    """The paths of the CUDA code (GEMV at M = 1, the row dot kernel up to 16, also with its steps as alternating
    dots, tiles / dequantize + linear above), run on CPU tensors."""
    from qcompile.plugins.gemm_dispatch import split_for_waves
    from qcompile.plugins.int8_wo_gemm.kernel import int8_wo_gemm_triton, launch_dot

    w_q, w_scale, b = make_case(k=384, n=80, seed=m, bias=bias)
    x = torch.randn(m, 384).to(DTYPES[dtype])
    ref = oracle(x, w_q, w_scale, b)
    assert_close_to(int8_wo_gemm_triton(x, w_q, w_scale, b, num_sms=2), ref, REL[DTYPES[dtype]])
    assert split_for_waves(384, 5, 64, 8, 2)[0] == 2  # 5 tiles of 16 rows, 8 waves of 2 SMs: K in 2 below
    if m <= 16:  # the dot kernel with its epilogue, and with K split (fp32 atomics, then the epilogue's kernels or
        # the last split finishing the tile: "finish"); x as the MMA's first operand too (plain)
        for (waves, block_k), plain, finish in itertools.product(((0, 128), (8, 64)), (False, True), (False, True)):
            cfg = dict(BLOCK_N=16, BLOCK_K=block_k, num_warps=4, num_stages=2, waves=waves, plain=plain,
                       finish=finish)
            if finish:  # each step as dots of 16 or 32 K into two alternating accumulators ("part_k")
                cfg["part_k"] = block_k // 4
            y = launch_dot(x, w_q, w_scale, b, cfg, num_sms=2)
            assert y.dtype == x.dtype and y.shape == (m, 80)
            assert_close_to(y, ref, REL[DTYPES[dtype]])
    for waves in (0, 4):  # the tiled large-M path, without and with a K split (fp32 atomics)
        tiles = dict(kernel="tiles", BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, waves=waves)
        assert_close_to(int8_wo_gemm_triton(x, w_q, w_scale, b, num_sms=2, large_m=tiles), ref, REL[DTYPES[dtype]])
    if m > 16:  # the row dot kernel on row tiles, K split and not, finished in the kernel and not; then the
        # dequantize + F.linear bucket
        for waves, finish in itertools.product((0, 8), (False, True)):
            dot = dict(kernel="dot", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2, waves=waves,
                       finish=finish)
            assert_close_to(int8_wo_gemm_triton(x, w_q, w_scale, b, num_sms=2, large_m=dot), ref, REL[DTYPES[dtype]])
        dequant = int8_wo_gemm_triton(x, w_q, w_scale, b, num_sms=2, large_m={"kernel": "dequant"})
        assert_close_to(dequant, ref, REL[DTYPES[dtype]])


def check_dequant_kernel(dtype, n, k, device):
    """The large-M bucket's dequantization: every int8 code times its row's scale, rounded once to `dtype`, bit for
    bit the float64 product rounded (exact in float32: an int8 times a float32 scale); N and K not whole tiles."""
    from qcompile.plugins.int8_wo_gemm.kernel import launch_dequant

    w_q, w_scale, _ = make_case(k=k, n=n, seed=n, bias=False)
    w_q.view(-1)[:256] = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    want = torch.from_numpy(w_q.numpy().astype(np.float64) * w_scale.numpy().astype(np.float64)[:, None])
    got = launch_dequant(w_q.to(device), w_scale.to(device), dtype, dict(BLOCK_N=16, BLOCK_K=128, num_warps=4))
    assert got.dtype == dtype and got.shape == (n, k)
    assert torch.equal(got.cpu(), want.to(dtype))


@triton_interp
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])  # the interpreter truncates float32 to bf16
@pytest.mark.parametrize("n, k", [(80, 512), (83, 700)])
def test_dequant_kernel_rounds_each_weight_once_like_the_reference(dtype, n, k):
    check_dequant_kernel(DTYPES[dtype], n, k, "cpu")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_dequant_kernel_rounds_each_weight_once_like_the_reference(dtype):
    check_dequant_kernel(DTYPES[dtype], 83, 700, "cuda")


@triton_interp
@pytest.mark.parametrize("m, path", [(17, "_row_dot_kernel"), (128, "_row_dot_kernel"), (129, "_tile_kernel"),
                                     (256, "_tile_kernel"), (257, "_dequant_kernel")])
def test_large_m_buckets_go_from_the_row_dot_kernel_to_tiles_to_dequantize_and_cublas(m, path):
    from qcompile.plugins.int8_wo_gemm.kernel import int8_wo_gemm_triton

    w_q, w_scale, b = make_case(k=128, n=32, seed=m)
    x = torch.randn(m, 128).to(torch.float16)
    seen = []

    def spy(kernel):
        seen.append(kernel.__name__)
        return kernel

    y = int8_wo_gemm_triton(x, w_q, w_scale, b, wrap=spy, num_sms=2)
    assert seen == [path]
    assert_close_to(y, oracle(x, w_q, w_scale, b), REL[torch.float16])


@triton_interp
@pytest.mark.parametrize("n, k, even", [(80, 1024, True), (82, 1024, False), (80, 1000, False)])
@pytest.mark.parametrize("plain", [False, True])
def test_dot_kernel_drops_masks_only_on_whole_tiles(n, k, even, plain):
    """The row dot kernel leaves its weight and K masks out (EVEN) only when N is whole tiles and every K split
    whole steps; either way, K split or not, either operand order, a step as one dot or four, it matches float64."""
    from qcompile.plugins.int8_wo_gemm.kernel import launch_dot

    w_q, w_scale, b = make_case(k=k, n=n, seed=k + n)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(n)).to(torch.float16)
    seen = []
    spy = launch_spy(lambda grid, kw: seen.append((grid[1], kw["EVEN"], kw["PLAIN"])))
    for waves, part_k in ((0, 64), (4, 64), (0, 16)):  # part_k 16: two chains of two 16-K dots a step
        cfg = dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2, waves=waves, plain=plain, part_k=part_k)
        assert_close_to(launch_dot(x, w_q, w_scale, b, cfg, wrap=spy, num_sms=4), oracle(x, w_q, w_scale, b),
                        REL[torch.float16])
    assert [(e, p) for _, e, p in seen] == [(even, plain)] * 3 and seen[1][0] > 1, seen
    with pytest.raises(ValueError, match="part_k"):  # 3 parts of 16 would leave 16 K of each step out
        launch_dot(x, w_q, w_scale, b, dict(cfg, part_k=16, BLOCK_K=48), num_sms=4)


@triton_interp
@pytest.mark.parametrize("dtype, ptx, expected", [(torch.float16, False, False), (torch.float32, True, False)])
def test_dot_x_ldmatrix_only_where_ptx_runs_on_16bit_x(monkeypatch, dtype, ptx, expected):
    """"x_ldmatrix" reaches the row dot kernel only where inline PTX runs (not under the CPU interpreter) and x is
    16-bit (float32 x takes the IEEE dot); the result matches float64 either way."""
    from qcompile.plugins.int8_wo_gemm import kernel

    monkeypatch.setattr(kernel, "ptx_available", lambda: ptx)
    w_q, w_scale, b = make_case(k=256, n=48, seed=3)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    seen = []
    cfg = dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2, waves=0, plain=True, x_ldmatrix=True)
    y = kernel.launch_dot(x, w_q, w_scale, b, cfg, wrap=launch_spy(lambda grid, kw: seen.append(kw["X_LDMATRIX"])),
                          num_sms=4)
    assert seen == [expected]
    assert_close_to(y, oracle(x, w_q, w_scale, b), REL[dtype])


@triton_interp
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n, k, prefetch, pipeline, bias", [(80, 384, False, 0, True), (82, 392, True, 0, True),
                                                            (80, 384, True, 0, False), (82, 392, False, 3, True)])
def test_gemv_kernel_under_interpreter(dtype, n, k, prefetch, pipeline, bias):
    """(`check_gemv`) each loop: plain, the next step's words loaded during this step, `tl.range` pipelining."""
    check_gemv("cpu", DTYPES[dtype], n, k, dict(BLOCK_N=4, BLOCK_KW=32, num_warps=2, PREFETCH=prefetch,
                                                pipeline=pipeline), bias)


def every_byte_case(k: int, n: int, bias: bool):
    """`make_case` (k >= 256) with every int8 value at each of a word's four bytes (rows 0-3)."""
    w_q, w_scale, b = make_case(k=k, n=n, seed=n + k, bias=bias)
    every = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    for row in range(4):
        w_q[row, :256] = every.roll(row)
    return w_q, w_scale, b


def assert_within_split_bound(y, x, w_q, w_scale, b, chunk: int, out_rel: float):
    """Each output of `y` within w_scale[n] * sum_k |q[n, k]| * s(chunk of k) / 2 of float64 (the rounding of x
    into `split_mma.split_planes`' planes of `chunk`, plus float32's rounding of x / s), plus 1e-6 of
    sum_k |x q| (the float32 accumulation) and `out_rel` of the result (the output dtype's rounding)."""
    from qcompile.plugins.int8_wo_gemm.split_mma import split_planes

    m, k = x.shape
    _, s = split_planes(x.to(y.device), chunk, 16)  # where Triton runs: the GPU, or the CPU interpreter
    half_step = s[:m].cpu().double().repeat_interleave(chunk, dim=1)[:, :k].numpy() * (0.5 + 2.0 ** -8)
    absw = np.abs(w_q.numpy().astype(np.float64)) * w_scale.numpy().astype(np.float64)[:, None]
    ref = oracle(x, w_q, w_scale, b)
    bound = half_step @ absw.T + 1e-6 * (np.abs(x.double().numpy()) @ absw.T) + np.abs(ref) * out_rel
    err = np.abs(y.double().cpu().numpy() - ref)
    assert (err <= bound).all(), float(np.max(err - bound))


def check_gemv(device: str, dtype, n: int, k: int, cfg: dict, bias: bool):
    """The M = 1 GEMV (int8 weight read as int32 words along K, byte-wise magic-number dequantization, scale and
    bias in the kernel) against float64, N not a multiple of the rows per program and K not a multiple of a step;
    every int8 value stands at each of a word's four bytes (rows 0-3). With "prmt" in `cfg` (a byte permute per
    weight, PTX: on the GPU), also bit for bit as without it (the same floats in the same order)."""
    from qcompile.plugins.int8_wo_gemm.gemv import launch_gemv

    w_q, w_scale, b = every_byte_case(k, n, bias)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    on = [t.to(device) if t is not None else None for t in (x, w_q, w_scale, b)]
    y = launch_gemv(*on, cfg)
    assert y.dtype == x.dtype
    assert_close_to(y, oracle(x, w_q, w_scale, b), REL[dtype] if dtype != torch.float32 else 1e-5)
    if cfg.get("prmt"):
        assert torch.equal(y, launch_gemv(*on, dict(cfg, prmt=False)))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
def test_cuda_gemv_prmt_matches_float64_and_the_shipped_bytes(dtype, prefetch):
    """(`check_gemv`) the byte-permute GEMV ("prmt") on the GPU, on the shipped tile and a small one."""
    from qcompile.plugins.int8_wo_gemm import gemv

    for n, k, cfg in ((4100, 4100, gemv.GEMV), (82, 392, dict(BLOCK_N=4, BLOCK_KW=32, num_warps=2))):
        check_gemv("cuda", dtype, n, k, dict(cfg, PREFETCH=prefetch, prmt=True), bias=True)


def check_dp4a_gemv(device: str, dtype, n: int, k: int, cfg: dict):
    """The GEMV with "dp4a" (x in int8 planes per 256 k, dp4a per word) within `split_mma`'s bound of float64: each
    output within w_scale[n] * sum_k |q[n, k]| * s(chunk of k) / 2 plus float32's and the output's rounding; x
    with outlier channels and an all-zero chunk, K not a multiple of a step, N not of the rows per program, every
    int8 value at each byte of a word (rows 0-3). float32 x ignores "dp4a" (bit for bit the GEMV without it)."""
    from qcompile.plugins.int8_wo_gemm.gemv import launch_gemv

    w_q, w_scale, b = every_byte_case(k, n, bias=True)
    x = x_with_outliers(1, k, dtype, seed=k)
    cfg = dict(cfg, dp4a=True)
    y = launch_gemv(*(t.to(device) for t in (x, w_q, w_scale, b)), cfg)
    assert y.dtype == dtype and y.shape == (1, n)
    assert_within_split_bound(y, x, w_q, w_scale, b, 256, 2.0 ** (-10 if dtype == torch.float16 else -8))
    x32 = x.float()
    on = [t.to(device) for t in (x32, w_q, w_scale, b)]
    assert torch.equal(launch_gemv(*on, cfg), launch_gemv(*on, dict(cfg, dp4a=False)))


@triton_interp
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("n, k, cfg", [(80, 1000, dict(BLOCK_N=8, BLOCK_KW=128, num_warps=4)),
                                       (83, 2056, dict(BLOCK_N=32, BLOCK_KW=64, num_warps=4, group=8)),
                                       (20, 776, dict(BLOCK_N=4, BLOCK_KW=128, num_warps=2, PREFETCH=True))])
def test_dp4a_gemv_under_interpreter(dtype, n, k, cfg):
    """(`check_dp4a_gemv`) the dp4a GEMV's integers from the bytes without PTX; groups of 4 and 8 words, one and two
    chunks a step, the prefetching loop."""
    check_dp4a_gemv("cpu", DTYPES[dtype], n, k, cfg)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_dp4a_gemv_within_the_split_rounding_bound(dtype):
    """(`check_dp4a_gemv`) with dp4a in PTX, on the tiles the tuner tries first, a layer 4100 wide and deep."""
    for cfg in (dict(BLOCK_N=32, BLOCK_KW=128, num_warps=4), dict(BLOCK_N=16, BLOCK_KW=256, num_warps=4)):
        check_dp4a_gemv("cuda", DTYPES[dtype], 4100, 4100, cfg)


@triton_interp
def test_one_row_with_k_not_a_multiple_of_4_takes_the_dot_kernel(monkeypatch):
    from qcompile.plugins.int8_wo_gemm import gemv, kernel

    def no_gemv(*args, **kwargs):
        raise AssertionError("the GEMV reads 4-byte words along K: K = 258 must not reach it")

    monkeypatch.setattr(gemv, "launch_gemv", no_gemv)
    w_q, w_scale, b = make_case(k=258, n=80)
    x = torch.randn(1, 258)
    assert_close_to(kernel.int8_wo_gemm_triton(x, w_q, w_scale, b, num_sms=2), oracle(x, w_q, w_scale, b), 1e-5)


def x_with_outliers(m, k, dtype, seed=0):
    """Random rows with a few channels 100x larger (as LLM activations have), one all-zero chunk of K."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randperm(k, generator=gen)[:4]] *= 100.0
    x[:, :128] = 0.0
    return x.to(dtype)


@triton_interp
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("m, k, chunk", [(1, 520, 128), (3, 384, 256), (16, 1000, 128)])
def test_split_planes_give_x_back_within_half_a_step(dtype, m, k, chunk):
    """x = s * (256 hi + lo) within s / 2 per element (+ float32's rounding of x / s, < 32639 * 2^-24),
    s = amax(chunk) / 32639, hi and lo int8, for every row and chunk (K not a multiple of the chunk, an all-zero
    chunk, outlier channels); rows past M are zeros."""
    from qcompile.plugins.int8_wo_gemm.split_mma import split_planes

    x = x_with_outliers(m, k, DTYPES[dtype], seed=m + k)
    planes, s = split_planes(x, chunk, 16)
    hi, lo = planes[:m].double(), planes[16:16 + m].double()
    xd = x.double()
    kc = -(-k // chunk)
    amax = torch.nn.functional.pad(xd.abs(), (0, kc * chunk - k)).reshape(m, kc, chunk).amax(dim=2)
    np.testing.assert_allclose(s[:m].double().numpy(), (amax / 32639.0).numpy(), rtol=1e-6)
    step = s[:m].double().repeat_interleave(chunk, dim=1)[:, :k]
    assert ((hi * 256 + lo).abs() <= 32639).all()
    err = (step * (hi * 256 + lo) - xd).abs()
    assert (err <= step * (0.5 + 2.0 ** -8)).all(), float((err / step.clamp_min(1e-30)).max())  # + x / s in fp32
    assert (err[:, :128] == 0).all()
    assert (planes[m:16] == 0).all() and (planes[16 + m:] == 0).all() and (s[m:] == 0).all()


@triton_interp
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("m, rows, bias, splits", [(1, 1, True, 1), (3, 16, False, 1), (16, 16, True, 1),
                                                   (0, 16, True, 1), (3, 16, True, 3), (1, 1, False, 8)])
def test_split_mma_within_the_split_rounding_bound(dtype, m, rows, bias, splits):
    """Each output within w_scale[n] * sum_k |q[n, k]| * s(k) / 2 (the split's rounding of x) of float64, plus
    the float32 accumulation's and the output dtype's rounding; K not a multiple of the K step. Split K too:
    3 splits of 3 steps for 8 (the last one runs past K), and one split per step."""
    from qcompile.plugins.int8_wo_gemm.split_mma import launch

    cfg = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=2, splits=splits)
    w_q, w_scale, b = make_case(k=1000, n=80, seed=m, bias=bias)
    x = x_with_outliers(m, 1000, DTYPES[dtype], seed=m)
    y = launch(x, w_q, w_scale, b, cfg, rows)
    assert y.shape == (m, 80) and y.dtype == x.dtype
    if m == 0:
        return
    assert_within_split_bound(y, x, w_q, w_scale, b, 128, 2.0 ** -10 if dtype == "fp16" else 1e-7)


@triton_interp
def test_wide_layers_with_16_bit_x_take_the_split_mma_path(monkeypatch):
    """`pick_config` by the programs a tile gives (the first of CONFIGS with MIN_WAVES waves); the op routes up to
    16 rows of fp16 x there (one row only on the widest tiles: `runs_one_row`), float32 x and narrow layers to
    the other kernels."""
    from qcompile.plugins.int8_wo_gemm import kernel, split_mma

    assert split_mma.pick_config(28672, 4096, 132) is split_mma.CONFIGS[0]  # 224 programs of 128 rows
    assert split_mma.pick_config(14336, 4096, 132) is split_mma.CONFIGS[1]  # 112 of 128 rows, 224 of 64
    assert split_mma.pick_config(4096, 4096, 132) is None  # 64 programs of 64 rows; 4 parts of 4 K steps
    # 64 programs of 64 rows, 4 parts of 14 K steps (of 256) give 256 programs
    assert split_mma.pick_config(4096, 14336, 132) == dict(split_mma.CONFIGS[1], splits=4)
    assert split_mma.pick_config(4096, 8191, 132) is None  # 31 steps: a part would get 7
    assert split_mma.runs_one_row(split_mma.CONFIGS[0]) and not split_mma.runs_one_row(split_mma.CONFIGS[1])
    assert not split_mma.runs_one_row(dict(split_mma.CONFIGS[0], splits=2))
    calls = []
    real = split_mma.launch
    monkeypatch.setattr(split_mma, "launch", lambda *a, **kw: calls.append((kw["cfg"]["BLOCK_N"], kw["rows"]))
                        or real(*a, **kw))
    # 256 rows: 2 programs of 128 = 2 waves of one SM; 96 rows: 1 of 128, 2 of 64
    for n, expected in ((256, [(128, 1), (128, 16), (128, 16)]), (96, [(64, 16), (64, 16)])):
        calls.clear()
        w_q, w_scale, b = make_case(k=512, n=n)
        for m in (1, 7, 16, 17):
            x = torch.randn(m, 512).to(torch.float16)
            y = kernel.int8_wo_gemm_triton(x, w_q, w_scale, b, num_sms=1)
            assert_close_to(y, oracle(x, w_q, w_scale, b), REL[torch.float16])
        assert calls == expected, n
    kernel.int8_wo_gemm_triton(torch.randn(4, 512), w_q, w_scale, b, num_sms=1)
    kernel.int8_wo_gemm_triton(torch.randn(4, 512).to(torch.float16), w_q, w_scale, b, num_sms=2)
    assert calls == expected


@triton_interp
def test_narrow_layers_with_a_long_k_split_it_above_one_row(monkeypatch):
    """A layer too narrow for MIN_WAVES waves of tiles but with K long enough: split K from 2 rows (the GEMV keeps
    M = 1), the sums float64-close."""
    from qcompile.plugins.int8_wo_gemm import kernel, split_mma

    calls = []
    real = split_mma.launch
    monkeypatch.setattr(split_mma, "launch", lambda *a, **kw: calls.append(kw["cfg"].get("splits")) or real(*a, **kw))
    k = 256 * split_mma.MIN_SPLIT_STEPS * 2  # 2 parts of MIN_SPLIT_STEPS steps: 4 programs of 64 rows
    w_q, w_scale, b = make_case(k=k, n=96)
    for m in (1, 2, 16):
        x = torch.randn(m, k).to(torch.float16)
        y = kernel.int8_wo_gemm_triton(x, w_q, w_scale, b, num_sms=2)  # 2 tiles of 64 rows: 0.67 waves
        assert_close_to(y, oracle(x, w_q, w_scale, b), REL[torch.float16])
    assert calls == [2, 2]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 5, 16, 200, 300])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_op_matches_float64(m, dtype):
    """The op at each row-count bucket on a narrow layer (the GEMV, `DOT` with K split, the larger-M paths)."""
    w_q, w_scale, b = make_case(k=4096, n=1024, seed=m)
    x = torch.randn(m, 4096).to(DTYPES[dtype])
    y = op(x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda())
    assert_close_to(y, oracle(x, w_q, w_scale, b), REL[DTYPES[dtype]])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n", [14336, 28672])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_op_on_wide_layers_matches_float64(n, m, dtype):
    """Layers wide enough for the split INT8 tensor-core path (each of its two tiles), x with outlier channels."""
    from qcompile.plugins.int8_wo_gemm.split_mma import pick_config

    assert pick_config(n, 1536, torch.cuda.get_device_properties(0).multi_processor_count) is not None
    w_q, w_scale, b = make_case(k=1536, n=n, seed=m)
    x = x_with_outliers(m, 1536, DTYPES[dtype], seed=m)
    y = op(x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda())
    assert_close_to(y, oracle(x, w_q, w_scale, b), REL[DTYPES[dtype]])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_split_mma_split_k_matches_float64(splits, m):
    """Split K on the GPU (real atomics: each N tile finished by its last program), calls repeated so a counter
    or workspace left over from a call would show; N = 4096 with 128-row tiles, as the tuner tries it."""
    from qcompile.plugins.int8_wo_gemm.split_mma import launch

    w_q, w_scale, b = make_case(k=4096, n=4096, seed=m)
    x = x_with_outliers(m, 4096, torch.bfloat16, seed=m)
    cfg = dict(BLOCK_N=128, BLOCK_K=256, num_warps=4, num_stages=3, splits=splits)
    for _ in range(3):
        y = launch(x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda(), cfg, rows=m)
        assert_close_to(y, oracle(x, w_q, w_scale, b), REL[torch.bfloat16])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("part_k", [16, 32, 64])
@pytest.mark.parametrize("m", [5, 16])
def test_cuda_dot_in_alternating_parts_matches_float64(part_k, m):
    """`DOT`'s tile with each K step as dots of part_k K into two alternating accumulators, bf16 x with outlier
    channels, N = 4095 (the last tile masked), K = 4000 (the last step masked)."""
    from qcompile.plugins.int8_wo_gemm.kernel import DOT, launch_dot

    w_q, w_scale, b = make_case(k=4000, n=4095, seed=part_k + m)
    x = x_with_outliers(m, 4000, torch.bfloat16, seed=m)
    y = launch_dot(x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda(), dict(DOT, part_k=part_k),
                   num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
    assert y.dtype == torch.bfloat16
    assert_close_to(y, oracle(x, w_q, w_scale, b), REL[torch.bfloat16])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plain, waves", [(True, 0), (False, 0), (True, 4)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_cuda_dot_with_x_through_ldmatrix_matches_float64(dtype, plain, waves, m):
    """"x_ldmatrix" (the weight converted in inline PTX, x's MMA fragments 16-bit): every int8 code in the weight
    (the PTX's bit tricks per byte), x with outlier channels, N = 4095 (the last tile masked), K = 4000 (the last
    step masked), x first or second, K split with the tiles finished in the kernel."""
    from qcompile.plugins.int8_wo_gemm.kernel import DOT, launch_dot

    w_q, w_scale, b = make_case(k=4000, n=4095, seed=m)
    w_q[:2, :256] = torch.arange(-128, 128, dtype=torch.int8)  # every code, at K offsets 0 .. 255
    x = x_with_outliers(m, 4000, dtype, seed=m)
    cfg = dict(DOT, plain=plain, waves=waves, x_ldmatrix=True, finish=waves > 0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for _ in range(2):
        y = launch_dot(x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda(), cfg, num_sms=sms)
        assert y.dtype == dtype
        assert_close_to(y, oracle(x, w_q, w_scale, b), REL[dtype])
    # one-hot rows of x, unit scales, no bias: y is the weight's column at each row's K, exactly
    ks = (torch.arange(m) * 263) % 4000
    one_hot = torch.zeros(m, 4000, dtype=dtype)
    one_hot[torch.arange(m), ks] = 1.0
    y = launch_dot(one_hot.cuda(), w_q.cuda(), torch.ones(4095).cuda(), None, cfg, num_sms=sms)
    assert torch.equal(y.float().cpu(), w_q[:, ks].t().float())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("waves", [2, 4])
@pytest.mark.parametrize("m", [5, 16])
def test_cuda_dot_finished_in_the_kernel_matches_float64(waves, m):
    """The row dot kernel with "finish" and K split in 2 / 4 (real atomics: each tile written by its last split),
    bf16 x with outlier channels, N = 4095 (the last tile masked), calls repeated so a count left over would show."""
    from qcompile.plugins.gemm_dispatch import split_for_waves
    from qcompile.plugins.int8_wo_gemm.kernel import DOT, launch_dot

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = dict(DOT, waves=waves, finish=True)
    assert split_for_waves(4096, -(-4095 // cfg["BLOCK_N"]), cfg["BLOCK_K"], waves, sms)[0] > 1
    w_q, w_scale, b = make_case(k=4096, n=4095, seed=m)
    x = x_with_outliers(m, 4096, torch.bfloat16, seed=m)
    for _ in range(3):
        y = launch_dot(x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda(), cfg, num_sms=sms)
        assert y.dtype == torch.bfloat16
        assert_close_to(y, oracle(x, w_q, w_scale, b), REL[torch.bfloat16])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("warps, blocks", [(2, 1), (8, 4)])  # each case compiles its own kernels (~15 s on an H100)
@pytest.mark.parametrize("n, k", [(4096, 4096), (40, 64 * 7), (96, 1024)])
@pytest.mark.parametrize("m", [1, 12])
def test_cuda_mma_rows_matches_float64(m, n, k, warps, blocks):
    """The fp16 tensor-core kernel (`mma_rows`) against float64, x with outlier channels: N in whole 16-row tiles or
    not, K blocks a multiple of the warps' steps or not (masked blocks), one row (ONE_ROW) or the 16-row launch
    (two MMA groups) with rows of the second group live or not; x 8-byte aligned (int64 pairs) and 2-byte aligned
    (fp16 loads) in one call each; with and without a bias."""
    from qcompile.plugins.int8_wo_gemm import mma_rows

    w_q, w_scale, b = make_case(k=k, n=n, bias=m % 2 == 1, seed=m + warps)
    cfg = dict(warps=warps, blocks=blocks)
    x = x_with_outliers(m, k, torch.float16, seed=m)
    ref = oracle(x, w_q, w_scale, b)
    w_dev = w_q.cuda()
    args = (w_scale.cuda(), None if b is None else b.cuda())
    rows = 1 if m == 1 else 16
    assert_close_to(mma_rows.launch(x.cuda(), w_dev, *args, cfg=cfg, rows=rows), ref,
                    REL[torch.float16])
    x_odd = torch.empty(m, k + 1, dtype=torch.float16, device="cuda")[:, 1:].copy_(x)  # 2-byte aligned rows
    assert x_odd.data_ptr() % 8 != 0
    assert_close_to(mma_rows.launch(x_odd, w_dev, *args, cfg=cfg, rows=rows), ref,
                    REL[torch.float16])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 5, 16, 17])
def test_cuda_op_with_mma_rows_matches_float64(monkeypatch, m):
    """The op with `MMA_ROWS` set: 1-16 rows of fp16 x take the fp16 tensor-core kernel (17 does not), each
    float64-close."""
    from qcompile.plugins.int8_wo_gemm import kernel, mma_rows

    calls = []
    real = mma_rows.launch
    monkeypatch.setattr(mma_rows, "launch", lambda *a, **kw: calls.append(kw["rows"]) or real(*a, **kw))
    monkeypatch.setattr(kernel, "MMA_ROWS", dict(warps=4))
    w_q, w_scale, b = make_case(k=4096, n=1024, seed=m)
    x = torch.randn(m, 4096).to(torch.float16)
    y = kernel.int8_wo_gemm_triton(x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda())
    assert_close_to(y, oracle(x, w_q, w_scale, b), REL[torch.float16])
    assert calls == ([] if m > 16 else [1 if m == 1 else 16])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n", [512, 14336])
def test_cuda_op_compiles_with_a_dynamic_row_count(n):
    """torch.export with a dynamic M (the M paths in a torch.cond) and AOTInductor, as an engine runs it; a narrow
    layer (GEMV, dot kernel) and a wide one (split INT8 MMA)."""
    w_q, w_scale, b = (t.cuda() for t in make_case(k=1024, n=n))

    class Layer(torch.nn.Module):
        def forward(self, x):
            return op(x, w_q, w_scale, b)

    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)  # AOTInductor runs every branch at 64 rows
    ep = torch.export.export(Layer(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("m", min=1, max=4096)}})
    run = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep))
    for m in (1, 5, 16, 17, 600):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        assert_close_to(run(x), oracle(x.cpu(), w_q.cpu(), w_scale.cpu(), b.cpu()), REL[torch.bfloat16])


@fake_cuda_export
@pytest.mark.parametrize("n, finish", [(512, False), (512, True), (14336, False)])
def test_gpu_launches_export_on_fake_cuda_tensors(monkeypatch, n, finish):
    """The CUDA body as an engine's export traces it (the M paths in torch.cond, Triton launches included), without
    a GPU: a narrow layer (GEMV, row dot with K split in 2, unfinished and "finish") and a wide one (split INT8
    MMA)."""
    from qcompile.plugins.int8_wo_gemm import kernel

    monkeypatch.setattr(kernel, "DOT", dict(kernel.DOT, finish=finish))
    assert export_on_fake_cuda(monkeypatch, op, make_case(k=1024, n=n), torch.randn(8, 1024).to(torch.bfloat16)) == \
        [torch.ops.qcompile.int8_weight_only_gemm.default]


@fake_cuda_export
def test_dp4a_gemv_launches_export_on_fake_cuda_tensors(monkeypatch):
    """With "dp4a" in the GEMV's tiles the one-row path traces as an engine's export traces it (a launch with
    DP4A and the dp4a PTX among the traced ones)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from qcompile.plugins.int8_wo_gemm import gemv

    for name in ("GEMV", "GEMV_NARROW"):
        monkeypatch.setattr(gemv, name, dict(getattr(gemv, name), dp4a=True))
    before = set(kernel_side_table.constant_args)
    assert export_on_fake_cuda(monkeypatch, op, make_case(k=1024, n=512), torch.randn(8, 1024).to(torch.bfloat16)) \
        == [torch.ops.qcompile.int8_weight_only_gemm.default]
    launched = [a for i, a in kernel_side_table.constant_args.items() if i not in before]
    assert any(a.get("DP4A") and a.get("ASM") and a.get("GROUP") == 4 for a in launched), launched


@fake_cuda_export
@pytest.mark.parametrize("n", [512, 14336])
def test_mma_rows_launches_export_on_fake_cuda_tensors(monkeypatch, n):
    """With `MMA_ROWS` set, the fp16 tensor-core kernel's launches trace as an engine's export traces them, in place
    of the GEMV and split MMA kernels, on a narrow and a wide layer."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from qcompile.plugins.int8_wo_gemm import kernel

    monkeypatch.setattr(kernel, "MMA_ROWS", dict(warps=4))
    before = set(kernel_side_table.id_to_kernel)
    assert export_on_fake_cuda(monkeypatch, op, make_case(k=1024, n=n), torch.randn(8, 1024).to(torch.float16)) == \
        [torch.ops.qcompile.int8_weight_only_gemm.default]
    traced = [getattr(k, "fn", k).__name__ for i, k in kernel_side_table.id_to_kernel.items() if i not in before]
    assert "_w8_mma_rows_kernel" in traced and "_row_gemv_kernel" not in traced and "_mma_kernel" not in traced


def test_mma_rows_applies_to_fp16_x_k_in_64_blocks_and_an_8_byte_aligned_weight():
    """Where the fp16 tensor-core kernel can run: fp16 x (its MMA takes fp16 B), K a multiple of 64, the weight's
    int64 loads aligned."""
    pytest.importorskip("triton")
    from qcompile.plugins.int8_wo_gemm import mma_rows

    w = torch.zeros(64, 129, dtype=torch.int8)
    assert mma_rows.applies(torch.zeros(1, 128, dtype=torch.float16), w[:, :128].contiguous())
    assert not mma_rows.applies(torch.zeros(1, 128, dtype=torch.bfloat16), w[:, :128].contiguous())
    assert not mma_rows.applies(torch.zeros(1, 96, dtype=torch.float16), w[:, :96].contiguous())
    assert not mma_rows.applies(torch.zeros(1, 128, dtype=torch.float16), w.flatten()[1:1 + 64 * 128].view(64, 128))


@fake_cuda_export
def test_layers_with_different_launch_configs_export_and_decompose_as_an_engine_does(monkeypatch):
    """An engine's export, then the re-trace AOTInductor does (`run_decompositions`), of two W8A16 layers whose
    small-M launch configurations differ (a wide layer and a narrow one with a long K, as in llama3-8b-layers), under
    the engine build's Dynamo settings. With automatic dynamic shapes an option that differed between the layers'
    launches (`num_stages`) was traced symbolic the second time, and the re-trace failed ("'SymNodeVariable' object
    has no attribute 'value'", the H200, thirty-fourth session)."""
    from qcompile.plugins.int8_wo_gemm import split_mma

    shapes = [(4096, 28672), (14336, 4096)]
    wide, narrow = (split_mma.pick_config(n, k, 132) for k, n in shapes)
    assert wide["num_stages"] != narrow["num_stages"] and "splits" in narrow

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, (k, n) in enumerate(shapes):
                self.register_buffer(f"w{i}", torch.empty(n, k, dtype=torch.int8, device="cuda"))
                self.register_buffer(f"s{i}", torch.rand(n, device="cuda"))
                self.register_buffer(f"b{i}", torch.randn(n, device="cuda"))

        def forward(self, x):
            h = op(x, self.w0, self.s0, self.b0)
            return op(h[..., :shapes[1][0]], self.w1, self.s1, self.b1)

    x = torch.randn(2, 4, shapes[0][0], dtype=torch.bfloat16)
    ep = export_and_retrace_on_fake_cuda(monkeypatch, TwoLayers, x, engine_dims())
    gemms = [n for n in ep.graph.nodes if n.target == torch.ops.qcompile.int8_weight_only_gemm.default]
    assert len(gemms) == 2


@pytest.mark.gpu
@cuda
def test_cuda_engine_of_layers_with_different_launch_configs(tmp_path):
    """`build_engine` (export + AOTInductor, the engine's Dynamo settings) of a wide layer (the split INT8 MMA tile on
    3 stages) feeding a narrow one with a long K (K split in parts, 4 stages), dynamic batch and sequence, run at
    several row counts against float64: the pair that failed to build in llama3-8b-layers' W8A16 engine."""
    from qcompile.engine.build import build_engine
    from qcompile.engine.load import load
    from qcompile.engine.manifest import IOSpec
    from qcompile.plugins.int8_wo_gemm import split_mma

    (k0, n0), (k1, n1) = (1024, 28672), (8192, 4096)
    assert split_mma.pick_config(n0, k0, 132)["num_stages"] != split_mma.pick_config(n1, k1, 132)["num_stages"]
    first, second = make_case(k=k0, n=n0, seed=1), make_case(k=k1, n=n1, seed=2)

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, case in (("a", first), ("b", second)):
                for part, t in zip(("w", "s", "bias"), case):
                    self.register_buffer(f"{part}_{name}", t.cuda())

        def forward(self, x):
            h = op(x, self.w_a, self.s_a, self.bias_a)[..., :k1]
            return op(h, self.w_b, self.s_b, self.bias_b)

    ranges = {"batch": (1, 16), "seq": (1, 256)}
    path = tmp_path / "two.engine"
    build_engine(TwoLayers(), inputs=[IOSpec("x", "bfloat16", ["batch", "seq", k0], ranges)],
                 outputs=[IOSpec("y", "bfloat16", ["batch", "seq", n1])],
                 example_inputs=(torch.randn(2, 8, k0, device="cuda", dtype=torch.bfloat16) * 0.1,), manifest={},
                 output_path=path, device="cuda")
    engine = load(path)
    for batch, seq in ((1, 1), (1, 16), (4, 33)):
        x = torch.randn(batch, seq, k0, dtype=torch.bfloat16) * 0.1
        h = torch.from_numpy(oracle(x.reshape(-1, k0), *first)[:, :k1]).to(torch.bfloat16)  # the engine's h: bf16
        y = engine.run_torch({"x": x.cuda()})["y"]
        assert y.shape == (batch, seq, n1)
        assert_close_to(y.reshape(-1, n1), oracle(h, *second), REL[torch.bfloat16])
