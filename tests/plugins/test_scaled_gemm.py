"""Tests of the scaled-GEMM plugin: reference vs numpy float64, op vs ONNX Runtime, export, AOTI, CUDA."""
from __future__ import annotations

import re
import zipfile

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qc_testutil import assert_close_to

from qcompile.plugins.scaled_gemm import onnx_schema, register, scaled_gemm_reference

register()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FORMATS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def make_case(fmt, *, n=24, k=32, x_shape=(7, 32), per_channel=True, with_bias=True, seed=0, device="cpu"):
    """Fresh random (x, w_q, w_scale, x_scale, bias) with scales that exercise saturation a little."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape[:-1], k, generator=g) * 2.0
    w = torch.randn(n, k, generator=g)
    qmax = 127.0 if fmt == "int8" else 448.0
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    w_scale = (amax / qmax).float()
    wq = w / (w_scale.reshape(-1, 1) if per_channel else w_scale)
    w_q = wq.round().clamp(-127, 127).to(torch.int8) if fmt == "int8" else wq.to(torch.float8_e4m3fn)
    x_scale = torch.tensor(x.abs().max().item() * 0.8 / qmax)  # ~20% of the range saturates a little
    bias = torch.randn(n, generator=g) if with_bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(w_q), to(w_scale), to(x_scale), to(bias)


def numpy_oracle(x, w_q, w_scale, x_scale, bias):
    """Independent float64 numpy computation of the contract."""
    xs = np.float32(x_scale.item())
    y = x.float().numpy().astype(np.float32) / xs
    if w_q.dtype == torch.int8:
        xq = np.clip(np.rint(y), -128, 127).astype(np.float64)
        w = w_q.numpy().astype(np.float64)
    else:
        xq = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        w = w_q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    out = (xq @ w.T) * (np.float64(xs) * w_scale.numpy().astype(np.float64).reshape(-1))
    if bias is not None:
        out = out + bias.numpy().astype(np.float64)
    return out


# ---------------------------------------------------------------- reference vs numpy

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape", [(7, 32), (2, 5, 32)], ids=["2d", "3d"])
def test_reference_matches_numpy(fmt, per_channel, with_bias, x_shape):
    args = make_case(fmt, x_shape=x_shape, per_channel=per_channel, with_bias=with_bias, seed=len(x_shape) + len(fmt))
    y = scaled_gemm_reference(*args)
    assert y.dtype == torch.float32 and y.shape == (*x_shape[:-1], 24)
    assert_close_to(y, numpy_oracle(*args), rel=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_input(fmt, dtype):
    x, w_q, w_scale, x_scale, bias = make_case(fmt, seed=3)
    x = x.to(dtype)
    y = torch.ops.qcompile.scaled_gemm(x, w_q, w_scale, x_scale, bias)
    assert y.dtype == dtype
    assert_close_to(y, numpy_oracle(x, w_q, w_scale, x_scale, bias), rel=1e-2)


def test_reference_quantization_rules():
    from qcompile.plugins.scaled_gemm import quantize_activation

    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 300.0, -300.0, 1000.0])
    q = quantize_activation(x, torch.tensor(1.0), torch.int8)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128, 127]  # half to even, saturate
    f = quantize_activation(x, torch.tensor(1.0), torch.float8_e4m3fn).float()
    assert f[-1].item() == 448.0 and f[-2].item() == -288.0


def test_weight_only_path():
    x, w_q, w_scale, _, bias = make_case("int8", seed=5)
    y = torch.ops.qcompile.scaled_gemm(x, w_q, w_scale, None, bias)
    ref = x.double() @ (w_q.double() * w_scale.double().reshape(-1, 1)).T + bias.double()
    assert_close_to(y, ref.numpy(), rel=1e-6)


def test_bad_arguments_are_named():
    x, w_q, w_scale, x_scale, bias = make_case("int8")
    with pytest.raises(ValueError, match="w_q must be int8 or float8"):
        torch.ops.qcompile.scaled_gemm(x, w_q.float(), w_scale, x_scale, bias)
    with pytest.raises(ValueError, match="K=16"):
        torch.ops.qcompile.scaled_gemm(x[:, :16], w_q, w_scale, x_scale, bias)
    with pytest.raises(ValueError, match="w_scale must be"):
        torch.ops.qcompile.scaled_gemm(x, w_q, w_scale[:3], x_scale, bias)


# ---------------------------------------------------------------- op vs ONNX Runtime (function body)

def _onnx_model(w_q, w_scale, x_scale, bias, k):
    fp8 = w_q.dtype == torch.float8_e4m3fn
    if fp8:
        wq_np = w_q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        zp = helper.make_tensor("x_zero_point", TensorProto.FLOAT8E4M3FN, [], [0.0])
        wq_t = helper.make_tensor("w_q", TensorProto.FLOAT8E4M3FN, list(wq_np.shape), wq_np.view(np.uint8).tobytes(), raw=True)
    else:
        zp = numpy_helper.from_array(np.array(0, dtype=np.int8), "x_zero_point")
        wq_t = numpy_helper.from_array(w_q.numpy(), "w_q")
    n = w_q.shape[0]
    inits = [
        numpy_helper.from_array(np.array(x_scale.item(), dtype=np.float32), "x_scale"),
        zp,
        wq_t,
        numpy_helper.from_array(w_scale.numpy().astype(np.float32), "w_scale"),
        numpy_helper.from_array((bias if bias is not None else torch.zeros(n)).numpy().astype(np.float32), "bias"),
    ]
    node = onnx_schema.make_node("gemm0", list(onnx_schema.INPUTS), ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_schema.FUNCTION_OPSET)], ir_version=10)
    onnx_schema.add_to_model(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_op_matches_onnx_function_body(fmt, per_channel, with_bias):
    ort = pytest.importorskip("onnxruntime")
    x, w_q, w_scale, x_scale, bias = make_case(fmt, per_channel=per_channel, with_bias=with_bias, seed=11)
    model = _onnx_model(w_q, w_scale, x_scale, bias, k=x.shape[-1])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (expected,) = sess.run(None, {"x": x.numpy()})
    y = torch.ops.qcompile.scaled_gemm(x, w_q, w_scale, x_scale, bias)
    assert_close_to(y, expected.astype(np.float64), rel=1e-5)


# ---------------------------------------------------------------- export and AOTInductor (CPU)

class TwoLayer(torch.nn.Module):
    """x -> int8 scaled GEMM -> fp8 scaled GEMM (both plugin formats in one program)."""

    def __init__(self, device="cpu", k=32, n=32):
        super().__init__()
        a = make_case("int8", n=n, k=k, seed=21, device=device)
        b = make_case("fp8", n=16, k=n, per_channel=False, seed=22, device=device)
        for prefix, (_, w_q, w_scale, x_scale, bias) in (("a", a), ("b", b)):
            self.register_buffer(f"{prefix}_w", w_q)
            self.register_buffer(f"{prefix}_ws", w_scale)
            self.register_buffer(f"{prefix}_xs", x_scale)
            self.register_buffer(f"{prefix}_b", bias)

    def forward(self, x):
        h = torch.ops.qcompile.scaled_gemm(x, self.a_w, self.a_ws, self.a_xs, self.a_b)
        return torch.ops.qcompile.scaled_gemm(h, self.b_w, self.b_ws, self.b_xs, None)


def _export(mod, x):
    batch = torch.export.Dim("batch", min=1, max=2048)
    return torch.export.export(mod, (x,), dynamic_shapes={"x": {0: batch}})


def test_export_keeps_one_node_per_gemm():
    mod = TwoLayer()
    x = torch.randn(5, 32)
    ep = _export(mod, x)
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.qcompile.scaled_gemm.default] * 2
    x2 = torch.randn(9, 32)
    torch.testing.assert_close(ep.module()(x2), mod(x2))


@pytest.mark.slow
def test_aoti_cpu_package_runs_and_matches(tmp_path):
    mod = TwoLayer()
    ep = _export(mod, torch.randn(4, 32))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "sg.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for m in (3, 40):
        x = torch.randn(m, 32)
        torch.testing.assert_close(compiled(x), mod(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- CUDA (real int8 / fp8 GEMMs)

class Quantize(torch.nn.Module):
    def __init__(self, scale, dtype):
        super().__init__()
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, x):
        from qcompile.plugins.scaled_gemm import quantize_activation

        return quantize_activation(x * 1.0, self.scale, self.dtype).view(torch.uint8)


@pytest.mark.gpu
@pytest.mark.slow
@cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_activation_quantization_is_exact(fmt, tmp_path):
    """Compiled as the engine compiles it (fused by Inductor), the activation quantization rounds exactly
    like the float64-free CPU reference: `x / scale` must be IEEE division, not Triton's approximate one."""
    from qcompile.engine.build import exact_numerics_configs
    from qcompile.plugins.scaled_gemm import quantize_activation

    scale = torch.tensor(0.0109, device="cuda")
    mod = Quantize(scale, FORMATS[fmt])
    x = torch.randn(4096, 256, device="cuda") * 3
    ep = torch.export.export(mod, (x,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "q.pt2"),
                                                    inductor_configs=exact_numerics_configs())
    got = torch._inductor.aoti_load_package(path)(x)
    ref = quantize_activation(x.cpu(), scale.cpu(), FORMATS[fmt]).view(torch.uint8)
    mismatches = (got.cpu() != ref).sum().item()
    assert mismatches == 0, f"{mismatches} of {ref.numel()} quantized values differ from the reference"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_cuda_matches_reference(fmt, m, dtype, per_channel, with_bias):
    args = make_case(fmt, n=256, k=512, x_shape=(m, 512), per_channel=per_channel, with_bias=with_bias, seed=m)
    x, w_q, w_scale, x_scale, bias = args
    x = x.to(dtype)
    ref = scaled_gemm_reference(x, w_q, w_scale, x_scale, bias)
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    y = torch.ops.qcompile.scaled_gemm(cu(x), cu(w_q), cu(w_scale), cu(x_scale), cu(bias))
    assert y.dtype == dtype and y.shape == ref.shape and y.is_cuda
    rel = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    if fmt == "fp8":  # Hopper FP8 tensor cores accumulate with less than fp32 precision (~3e-4 seen)
        rel = max(rel, 1e-3)
    assert_close_to(y, ref.double().numpy(), rel=rel)


@pytest.mark.gpu
@cuda
def test_cuda_3d_input():
    x, w_q, w_scale, x_scale, bias = make_case("int8", n=64, k=128, x_shape=(3, 5, 128), seed=2)
    ref = scaled_gemm_reference(x.bfloat16(), w_q, w_scale, x_scale, bias)
    y = torch.ops.qcompile.scaled_gemm(x.bfloat16().cuda(), w_q.cuda(), w_scale.cuda(), x_scale.cuda(), bias.cuda())
    assert y.shape == (3, 5, 64)
    assert_close_to(y, ref.double().numpy(), rel=1e-2)


@pytest.mark.gpu
@pytest.mark.slow
@cuda
def test_cuda_aoti_package_uses_real_low_precision_gemms(tmp_path):
    mod = TwoLayer(device="cuda", k=64, n=64).cuda()
    x = torch.randn(4, 64, device="cuda")
    ep = _export(mod, x)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "sg.pt2"))
    with zipfile.ZipFile(path) as z:
        code = "".join(z.read(n).decode(errors="ignore") for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert "_int_mm" in code and "_scaled_mm" in code  # real int8 / fp8 GEMMs, no dequantize-then-float GEMM
    calls = set(re.findall(r"\baoti_torch_\w+", code))  # the extern (fallback) ops the wrapper calls
    float_gemms = {c for c in calls if re.search(r"(?<![a-z])(mm|addmm|bmm|baddbmm)(_out)?$", c)
                   and "int_mm" not in c and "scaled_mm" not in c}
    assert not float_gemms, f"float GEMMs in the engine: {float_gemms}"
    compiled = torch._inductor.aoti_load_package(path)
    for m in (3, 300):
        xi = torch.randn(m, 64, device="cuda")
        torch.testing.assert_close(compiled(xi), mod(xi), rtol=1e-4, atol=1e-4)


def test_int8_gpu_path_exports_with_dynamic_rows():
    """The CUDA int8 body (pad rows to M > 16, `_int_mm`, scale epilogue) traces with a dynamic M and matches
    the reference; `torch._int_mm` also runs on CPU, so the body is checked here without a GPU."""
    from qcompile.plugins.scaled_gemm import op as op_module

    x, w_q, w_scale, x_scale, bias = make_case("int8", n=64, k=32, x_shape=(5, 32), seed=4)

    class Int8Body(torch.nn.Module):
        def forward(self, x):
            return op_module._int8_gemm(x, w_q, w_scale, x_scale, bias, x.dtype)

    rows = torch.export.Dim("rows", min=2, max=2048)
    ep = torch.export.export(Int8Body(), (x,), dynamic_shapes=({0: rows},))
    for m in (3, 16, 17, 40):
        xm = torch.randn(m, 32, generator=torch.Generator().manual_seed(m))
        assert_close_to(ep.module()(xm), numpy_oracle(xm, w_q, w_scale, x_scale, bias), rel=1e-6)
