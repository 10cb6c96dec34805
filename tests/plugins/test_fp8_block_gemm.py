"""Tests of the FP8 block-scaled GEMM plugin: block quantizers and the GEMM vs float64 numpy, the ONNX node in
ONNX Runtime, the Triton kernel under the CPU interpreter, and the CUDA paths (gpu)."""
from __future__ import annotations

import importlib.util
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import assert_close_to, export_on_fake_cuda, fake_cuda_export, ort_session
from qcompile.plugins.fp8_block_gemm import (fp8_block_gemm_reference, onnx_schema, quantize_activation_blocks,
                                             quantize_weight_blocks, register)

op = register()
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_interp = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TINY = np.finfo(np.float32).tiny


def np_blocks(a: np.ndarray, rows: int):
    """Independent float64 quantizer: (q as float64 fp8 values, scales float32) for `rows` x 128 blocks."""
    r, c = a.shape
    b = a.astype(np.float64).reshape(r // rows, rows, c // 128, 128)
    s = np.maximum(np.abs(b).max(axis=(1, 3)) / 448.0, TINY).astype(np.float32)
    y = (b.astype(np.float32) / s[:, None, :, None]).astype(np.float32)  # ONNX: float32 division
    q = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return q.reshape(r, c), s


def oracle(x2d: np.ndarray, wq, ws, bias) -> np.ndarray:
    """float64 y = sum_kb sx * sw * (xq . wq) + b from the numpy-quantized x and the given weight."""
    xq, sx = np_blocks(x2d, 1)
    wd = wq.float().numpy().astype(np.float64) * np.repeat(np.repeat(ws.numpy().astype(np.float64), 128, 0), 128, 1)
    y = (xq * np.repeat(sx.astype(np.float64), 128, 1)) @ wd.T
    return y + bias.numpy().astype(np.float64) if bias is not None else y


def make_weight(n=256, k=384, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-3, 1, k // 128).repeat_interleave(128)  # block ranges differ
    return w, torch.randn(n, generator=gen)


def test_weight_quantizer_matches_float64():
    w, _ = make_weight()
    w[:128, :128] = 0.0  # an all-zero block: scale floored at the float32 tiny, values 0
    q, s = quantize_weight_blocks(w)
    q_ref, s_ref = np_blocks(w.numpy(), 128)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s[0, 0] == TINY
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(q.float().numpy(), q_ref)


def test_activation_quantizer_matches_float64():
    x = torch.randn(5, 384) * torch.tensor([1e-4, 1.0, 300.0]).repeat_interleave(128)
    q, s = quantize_activation_blocks(x)
    q_ref, s_ref = np_blocks(x.numpy(), 1)
    assert s.shape == (5, 3)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(q.float().numpy(), q_ref)
    assert q.float().abs().amax(dim=1).max() == 448.0  # each block's amax maps to the FP8 max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_and_op_match_float64(dtype, bias):
    w, b = make_weight()
    wq, ws = quantize_weight_blocks(w)
    b = b if bias else None
    x = torch.randn(2, 3, 384).to(dtype)
    ref = oracle(x.float().reshape(-1, 384).numpy(), wq, ws, b).reshape(2, 3, 256)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for y in (fp8_block_gemm_reference(x, wq, ws, b), op(x, wq, ws, b)):
        assert y.dtype == dtype and y.shape == (2, 3, 256)
        assert_close_to(y, ref, rel)
    # the block-scaled FP8 GEMM is a close approximation of the float GEMM (about 3-4% relative L2)
    exact = x.float() @ w.t() + (b if bias else 0)
    assert (op(x.float(), wq, ws, b) - exact).norm() / exact.norm() < 0.06


@pytest.mark.parametrize("bad, message", [
    (dict(w_q=torch.zeros(256, 384)), "w_q must be float8_e4m3fn"),
    (dict(w_scale=torch.ones(2, 2)), "w_scale must be float32"),
    (dict(x=torch.zeros(3, 256)), "x has K=256"),
])
def test_bad_arguments_name_the_tensor(bad, message):
    wq, ws = quantize_weight_blocks(make_weight()[0])
    with pytest.raises(ValueError, match=message):
        fp8_block_gemm_reference(**(dict(x=torch.zeros(3, 384), w_q=wq, w_scale=ws, bias=None) | bad))


def test_onnx_node_runs_in_ort_like_the_contract():
    w, b = make_weight()
    wq, ws = quantize_weight_blocks(w)
    inits = [numpy_helper.from_array(wq.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), "w_q"),
             numpy_helper.from_array(ws.numpy(), "w_scale"), numpy_helper.from_array(b.numpy(), "bias")]
    node = onnx_schema.make_node("gemm", ["x", "w_q", "w_scale", "bias"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 384])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx_schema.add_to_model(model)
    x = torch.randn(2, 4, 384) * 3
    got = ort_session(model).run(None, {"x": x.numpy()})[0]
    ref = oracle(x.reshape(-1, 384).numpy(), wq, ws, b).reshape(2, 4, 256)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("k, capability, want", [
    (2048, (9, 0), True), (4096, (9, 0), True), (512, (9, 0), True),  # sm90, K/128 % 4 == 0: cuBLASLt
    (256, (9, 0), False), (384, (9, 0), False),  # K/128 = 2, 3: cuBLASLt gave wrong results on the H200
    (2048, (8, 9), False), (2048, (10, 0), False),  # no sm90 block-scaled cuBLASLt: the Triton tile kernel
])
def test_cuda_path_choice(k, capability, want):
    from qcompile.plugins.fp8_block_gemm.op import uses_cublas

    assert uses_cublas(k, capability) is want


@triton_interp
@pytest.mark.parametrize("m", [1, 70])
def test_triton_kernel_under_interpreter(m):
    from qcompile.plugins.fp8_block_gemm.kernel import fp8_block_gemm_triton

    w, _ = make_weight(seed=m)
    wq, ws = quantize_weight_blocks(w)
    x = torch.randn(m, 384)
    xq, sx = quantize_activation_blocks(x)
    y = fp8_block_gemm_triton(xq, sx, wq, ws, fp32_dot=True)
    ref = oracle(x.numpy(), wq, ws, None)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    bias = torch.randn(wq.shape[0])
    for cfg in (dict(BLOCK_M=16, GROUP_M=1, num_warps=4, num_stages=2), dict(BLOCK_M=32, GROUP_M=2, num_warps=4,
                                                                          num_stages=2)):
        y = fp8_block_gemm_triton(xq, sx, wq, ws, bias, out_dtype=torch.float16, fp32_dot=True, config=cfg)
        ref = oracle(x.numpy(), wq, ws, bias)
        assert y.dtype == torch.float16  # bias and cast in the kernel's epilogue
        np.testing.assert_allclose(y.float().numpy(), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@triton_interp
@pytest.mark.parametrize("m", [1, 5, 16])
def test_row_dot_kernel_under_interpreter(m):
    """The row-dot kernel (up to 16 rows), float32 and float16 out, bias or not, 32- and 64-row programs (a
    divisor of the 128-row scale block): the oracle's values."""
    from qcompile.plugins.fp8_block_gemm.kernel import fp8_row_dot_triton

    w, _ = make_weight(seed=m)
    wq, ws = quantize_weight_blocks(w)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m))
    xq, sx = quantize_activation_blocks(x)
    bias = torch.randn(wq.shape[0])
    for cfg, b, dtype in ((None, None, torch.float32), (dict(BLOCK_N=64, num_warps=4, num_stages=2), bias,
                                                          torch.float16)):
        y = fp8_row_dot_triton(xq, sx, wq, ws, b, out_dtype=dtype, fp32_dot=True, config=cfg)
        ref = oracle(x.numpy(), wq, ws, b)
        assert y.dtype == dtype and y.shape == (m, wq.shape[0])
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        np.testing.assert_allclose(y.float().numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())
    with pytest.raises(ValueError, match="BLOCK_N 256 must divide"):
        fp8_row_dot_triton(xq, sx, wq, ws, config=dict(BLOCK_N=256, num_warps=4, num_stages=2))


def check_quantize_kernel(device, exact_values=True):
    """Our one-pass Triton quantizer of the cuBLASLt path: the float64 oracle's values and scales, the scales
    K-block-major, zero rows padded up to the row alignment. (The Triton interpreter's float -> fp8 cast drops
    the carry when a mantissa rounds up, e.g. 124 -> 64: there most values must match.)"""
    from qcompile.plugins.fp8_block_gemm.kernel import quantize_blocks_triton

    x = torch.randn(7, 384) * torch.tensor([1e-4, 1.0, 300.0]).repeat_interleave(128)
    x[2, 128:256] = 0.0  # an all-zero block: the floor scale, zeros
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        xq, sx = quantize_blocks_triton(xd.to(device), 4)
        q_ref, s_ref = np_blocks(xd.float().numpy(), 1)
        assert xq.shape == (8, 384) and sx.shape == (8, 3) and sx.stride() == (1, 8)
        np.testing.assert_array_equal(sx[:7].cpu().numpy(), s_ref)
        got = xq[:7].float().cpu().numpy()
        if exact_values:
            np.testing.assert_array_equal(got, q_ref)
        else:
            assert np.mean(got == q_ref) > 0.9
        assert not xq[7].float().any() and torch.all(sx[7] == TINY)


@triton_interp
def test_quantize_kernel_under_interpreter():
    check_quantize_kernel("cpu", exact_values=False)


@pytest.mark.gpu
@cuda
def test_cuda_quantize_kernel_matches_float64():
    check_quantize_kernel("cuda")


def _cuda_case(m, k=2048):
    w, b = make_weight(n=1024, k=k, seed=m)
    wq, ws = quantize_weight_blocks(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1000 + m))
    return x, wq, ws, b, oracle(x.numpy(), wq, ws, b)


def _rel_l2(y, ref):
    return float(np.linalg.norm(y.float().cpu().numpy() - ref) / np.linalg.norm(ref))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m, k", [(1, 2048), (5, 2048), (1024, 2048), (40, 384), (17, 256)])
def test_cuda_op_matches_float64(m, k):
    """sm90: the Triton kernel up to 16 rows, cuBLASLt block-wise `_scaled_mm` above; other GPUs: the Triton
    kernel. bf16 output rounding only. K/128 = 3 and 2: scale strides that are not multiples of 4."""
    x, wq, ws, b, ref = _cuda_case(m, k)
    if m == 1024:  # a bf16 bias: the cuBLASLt path adds it in bf16 (one rounding of the float sum)
        b = b.to(torch.bfloat16).float()
    y = op(x.cuda().to(torch.bfloat16), wq.cuda(), ws.cuda(), (b.to(torch.bfloat16) if m == 1024 else b).cuda())
    ref_bf16_x = oracle(x.to(torch.bfloat16).float().numpy(), wq, ws, b)
    assert _rel_l2(y, ref_bf16_x) < 1e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_op_adds_the_bias_in_every_dtype(dtype):
    """Above 16 rows on sm90 the bf16 / fp16 GEMM adds the bias in its epilogue (rounded to x.dtype first, as a
    Linear of that dtype holds it), float32 x adds it after: each against float64 with that bias."""
    x, wq, ws, b, _ = _cuda_case(64, 2048)
    b = b * 100  # as large as the products: a bias lost or added twice fails the bound
    if dtype != torch.float32:
        b = b.to(dtype).float()
    y = op(x.cuda().to(dtype), wq.cuda(), ws.cuda(), b.cuda())
    assert y.dtype == dtype
    assert _rel_l2(y, oracle(x.to(dtype).float().numpy(), wq, ws, b)) < 1e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("m", [1, 3, 16])
def test_cuda_cublas_path_at_few_rows_matches_float64(m):
    """sm90's cuBLASLt path at 1-16 rows (x padded to 4 rows), as the op takes it with `ROW_DOT_WITH_CUBLAS` off."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuBLASLt block-wise scaling runs on sm90")
    from qcompile.plugins.fp8_block_gemm.op import scaled_mm_blockwise

    x, wq, ws, b, _ = _cuda_case(m)
    b = b.to(torch.bfloat16).float()
    y = scaled_mm_blockwise(x.cuda().to(torch.bfloat16), wq.cuda(), ws.cuda(), b.to(torch.bfloat16).cuda())
    assert y.shape == (m, 1024)
    assert _rel_l2(y, oracle(x.to(torch.bfloat16).float().numpy(), wq, ws, b)) < 1e-2


@pytest.mark.gpu
@cuda
def test_cuda_triton_kernel_matches_float64():
    """The Triton kernels on any GPU (native FP8 dots), the tile kernel and the row-dot kernel (<= 16 rows),
    against the same oracle."""
    from qcompile.plugins.fp8_block_gemm.kernel import fp8_block_gemm_triton, fp8_row_dot_triton

    for m, gemm in ((300, fp8_block_gemm_triton), (16, fp8_row_dot_triton), (3, fp8_row_dot_triton)):
        x, wq, ws, b, _ = _cuda_case(m)
        xq, sx = quantize_activation_blocks(x.cuda())
        y = gemm(xq, sx, wq.cuda(), ws.cuda(), b.cuda())
        assert _rel_l2(y, oracle(x.numpy(), wq, ws, b)) < 1e-3, (m, gemm.__name__)


@pytest.mark.gpu
@cuda
def test_cuda_op_compiles_with_a_dynamic_row_count():
    """torch.export with a dynamic M and AOTInductor, as an engine runs the op: the package must run both
    paths (Triton up to 16 rows, on sm90 cuBLASLt `_scaled_mm` above, chosen by a torch.cond) and match float64."""
    x, wq, ws, b, _ = _cuda_case(8)
    wq, ws, b = wq.cuda(), ws.cuda(), b.cuda()

    class Layer(torch.nn.Module):
        def forward(self, x):
            return op(x, wq, ws, b)

    ep = torch.export.export(Layer(), (x.cuda().to(torch.bfloat16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("m", min=1, max=4096)}})
    run = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep))
    for m in (1, 5, 16, 17, 300):
        xm, *_ = _cuda_case(m)
        y = run(xm.cuda().to(torch.bfloat16))
        assert _rel_l2(y, oracle(xm.to(torch.bfloat16).float().numpy(), wq.cpu(), ws.cpu(), b.cpu())) < 1e-2


@fake_cuda_export
def test_gpu_launches_export_on_fake_cuda_tensors(monkeypatch):
    """The CUDA body as an engine's export traces it (Triton up to 16 rows, cuBLASLt above, in a torch.cond; the
    Triton launches included), without a GPU."""
    x, wq, ws, b, _ = _cuda_case(8)
    assert export_on_fake_cuda(monkeypatch, op, (wq, ws, b), x.to(torch.bfloat16)) == \
        [torch.ops.qcompile.fp8_block_gemm.default]


@fake_cuda_export
@pytest.mark.parametrize("row_dot_with_cublas", [True, False])
def test_small_m_takes_the_row_kernel_or_cublas_as_the_switch_says(monkeypatch, row_dot_with_cublas):
    """On sm90 with K/128 a multiple of 4, one row goes to the Triton row kernel, or to cuBLASLt when
    `op.ROW_DOT_WITH_CUBLAS` is off (the engine A/B variant fp8-block-cublas-small-m)."""
    from qcompile.plugins.fp8_block_gemm import kernel as fp8_kernel
    from qcompile.plugins.fp8_block_gemm import op as op_module

    calls = []

    def recording(name, fn):
        def run(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return run
    monkeypatch.setattr(op_module, "scaled_mm_blockwise", recording("cublas", op_module.scaled_mm_blockwise))
    monkeypatch.setattr(fp8_kernel, "fp8_row_dot_triton", recording("row", fp8_kernel.fp8_row_dot_triton))
    monkeypatch.setattr(op_module, "ROW_DOT_WITH_CUBLAS", row_dot_with_cublas)
    x, wq, ws, b, _ = _cuda_case(1)
    export_on_fake_cuda(monkeypatch, op, (wq, ws, b), x.to(torch.bfloat16), dynamic_rows=False)
    assert calls and set(calls) == {"row" if row_dot_with_cublas else "cublas"}
