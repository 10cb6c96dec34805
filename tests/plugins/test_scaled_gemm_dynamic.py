"""The scaled-GEMM plugin with per-token dynamic activations (`qcompile::DynamicScaledGemm`,
`torch.ops.qcompile.scaled_gemm_dynamic`): the per-token quantizer and the reference vs float64 numpy, the op
vs the ONNX function body in ONNX Runtime, and (GPU session) the CUDA paths vs the reference."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import assert_close_to, ort_session
from qcompile.plugins.formats import MIN_SCALE, dynamic_row_scales, quantize_activation
from qcompile.plugins.scaled_gemm import dynamic_schema, register
from qcompile.plugins.scaled_gemm.reference import scaled_gemm_dynamic_reference

register()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def make_case(fmt, *, n=24, k=32, lead=(7,), per_channel=True, seed=0):
    """x with outlier channels and one all-zero row, a quantized weight, scales, bias."""
    g = torch.Generator().manual_seed(seed)
    dtype, qmax = FORMATS[fmt]
    x = torch.randn(*lead, k, generator=g) * torch.linspace(0.05, 8.0, k)
    x.reshape(-1, k)[0] = 0.0  # an all-zero token: its scale is MIN_SCALE and it quantizes to 0
    w = torch.randn(n, k, generator=g)
    w_scale = (w.abs().amax(dim=1) if per_channel else w.abs().amax()) / qmax
    wq = w / (w_scale.reshape(-1, 1) if per_channel else w_scale)
    w_q = wq.round().clamp(-127, 127).to(dtype) if fmt == "int8" else wq.to(dtype)
    return x, w_q, w_scale.float(), torch.randn(n, generator=g)


def numpy_quantize_rows(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-token quantizer: scale = max(amax(|row|) / qmax, tiny) in float32; x / scale in float32
    (ONNX QuantizeLinear), round half to even + saturate (int8) or saturate + cast (fp8); returned in float64."""
    qmax = FORMATS[fmt][1]
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    scale = np.maximum(np.abs(x2.astype(np.float64)).max(axis=1) / qmax, MIN_SCALE).astype(np.float32)[:, None]
    y = x2 / scale
    q = np.clip(np.rint(y), -128, 127) if fmt == "int8" else np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q.astype(np.float64), scale.astype(np.float64)


def numpy_oracle(x, w_q, w_scale, bias):
    fmt = "int8" if w_q.dtype == torch.int8 else "fp8"
    q, s = numpy_quantize_rows(x.float().numpy(), fmt)
    w = w_q.numpy() if fmt == "int8" else w_q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    out = (q @ w.astype(np.float64).T) * (s * w_scale.numpy().astype(np.float64).reshape(-1))
    out = out + bias.numpy().astype(np.float64)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_token_quantizer_matches_float64_reference(fmt):
    x = make_case(fmt, lead=(3, 9), k=64, seed=1)[0]
    s = dynamic_row_scales(x.reshape(-1, 64), fmt)
    q = quantize_activation(x.reshape(-1, 64), s[:, None], FORMATS[fmt][0]).float().numpy()
    want_q, want_s = numpy_quantize_rows(x.numpy(), fmt)
    np.testing.assert_array_equal(s.numpy().astype(np.float64), want_s[:, 0])
    np.testing.assert_array_equal(q.astype(np.float64), want_q)
    assert s[0].item() == pytest.approx(MIN_SCALE) and not q[0].any()  # the all-zero token
    assert np.abs(q).max(axis=1)[1:].min() == FORMATS[fmt][1]  # every other row uses the full range


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
def test_reference_and_cpu_op_match_numpy(fmt, per_channel, lead):
    x, w_q, w_scale, bias = make_case(fmt, lead=lead, per_channel=per_channel, seed=len(lead))
    want = numpy_oracle(x, w_q, w_scale, bias)
    assert_close_to(scaled_gemm_dynamic_reference(x, w_q, w_scale, bias), want, rel=1e-6)
    y = torch.ops.qcompile.scaled_gemm_dynamic(x, w_q, w_scale, bias)
    assert y.dtype == torch.float32 and y.shape == (*lead, 24)
    assert_close_to(y, want, rel=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_function_body_in_onnxruntime_matches_the_op(fmt):
    x, w_q, w_scale, bias = make_case(fmt, lead=(2, 6), seed=4)
    if fmt == "fp8":
        raw = w_q.view(torch.uint8).numpy()
        wq_t = helper.make_tensor("w_q", TensorProto.FLOAT8E4M3FN, list(raw.shape), raw.tobytes(), raw=True)
        zp = helper.make_tensor("x_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0])
    else:
        wq_t, zp = numpy_helper.from_array(w_q.numpy(), "w_q"), numpy_helper.from_array(np.array(0, np.int8), "x_zero_point")
    inits = [zp, wq_t, numpy_helper.from_array(w_scale.numpy(), "w_scale"), numpy_helper.from_array(bias.numpy(), "bias")]
    graph = helper.make_graph([dynamic_schema.make_node("g0", list(dynamic_schema.INPUTS), ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    dynamic_schema.add_to_model(model)
    got = ort_session(model).run(None, {"x": x.numpy()})[0]
    assert_close_to(torch.from_numpy(got), numpy_oracle(x, w_q, w_scale, bias), rel=1e-5)


def test_bad_arguments_are_named():
    x, w_q, w_scale, bias = make_case("int8")
    with pytest.raises(ValueError, match="K=16"):
        torch.ops.qcompile.scaled_gemm_dynamic(x[:, :16], w_q, w_scale, bias)
    with pytest.raises(ValueError, match="w_q must be int8 or float8"):
        torch.ops.qcompile.scaled_gemm_dynamic(x, w_q.float(), w_scale, bias)


# ---------------------------------------------------------------- CUDA (GPU session; untested until then)

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 16, 17, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
def test_cuda_matches_reference(fmt, m, dtype, per_channel):
    x, w_q, w_scale, bias = make_case(fmt, n=256, k=512, lead=(m,), per_channel=per_channel, seed=m)
    x = x.to(dtype)
    ref = scaled_gemm_dynamic_reference(x, w_q, w_scale, bias)
    y = torch.ops.qcompile.scaled_gemm_dynamic(x.cuda(), w_q.cuda(), w_scale.cuda(), bias.cuda())
    assert y.dtype == dtype and y.shape == ref.shape and y.is_cuda
    rel = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    if fmt == "int8":
        assert_close_to(y, ref.double().numpy(), rel=rel)
        return
    # CUDA divides by the scalar qmax as a multiply by its reciprocal: a row scale can differ from the CPU's
    # by one ulp, which flips the FP8 rounding of a few elements near a rounding boundary (measured on the
    # H200: up to 67 of 512k elements). Those rows differ by an FP8 step; everything else within rounding.
    got, want = y.double().cpu(), ref.double()
    assert ((got - want).norm() / want.norm()).item() < 5e-3
    close = torch.isclose(got, want, rtol=max(rel, 1e-3), atol=max(rel, 1e-3) * want.abs().max().item())
    assert close.double().mean().item() > 0.995


@pytest.mark.gpu
@cuda
def test_cuda_fp8_bf16_takes_rowwise_scaled_mm():
    """bf16 output: one `_scaled_mm` with scale_a [M, 1] and scale_b [1, N] (rowwise), no separate epilogue."""
    x, w_q, w_scale, bias = make_case("fp8", n=256, k=512, lead=(64,), seed=9)
    calls = []
    real = torch._scaled_mm

    def spy(a, b, scale_a, scale_b, **kw):
        calls.append((tuple(scale_a.shape), tuple(scale_b.shape), kw.get("out_dtype")))
        return real(a, b, scale_a, scale_b, **kw)

    torch._scaled_mm = spy
    try:
        torch.ops.qcompile.scaled_gemm_dynamic(x.bfloat16().cuda(), w_q.cuda(), w_scale.cuda(), bias.cuda())
    finally:
        torch._scaled_mm = real
    assert calls == [((64, 1), (1, 256), torch.bfloat16)]
