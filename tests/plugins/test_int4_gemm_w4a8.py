"""W4A8 face of the groupwise INT4 GEMM plugin: FP8 E4M3 activation quantization (static per tensor, dynamic
per row) vs float64 numpy with ml_dtypes, the op vs a float64 oracle, the ONNX node (function-body overloads in
ONNX Runtime) vs our lowering, export."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qc_testutil import assert_close_to, expect_tma, export_on_fake_cuda, fake_cuda_export, ort_session

from qcompile.algorithms.int4 import quantize_rtn
from qcompile.plugins.formats import MIN_SCALE, dynamic_row_scales, quantize_activation
from qcompile.plugins.int4_gemm import onnx_schema, register
from qcompile.plugins.int4_gemm.format import onnx_to_engine
from qcompile.plugins.int4_gemm.reference import quantize_activation_fp8

register()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
F8 = ml_dtypes.float8_e4m3fn
TINY = np.float32(np.finfo(np.float32).tiny)


def np_fp8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear to E4M3FN in numpy: float32 division, saturate to ±448, ml_dtypes' RNE cast."""
    return np.clip(x.astype(np.float32) / scale.astype(np.float32), -448, 448).astype(F8)


def np_row_scales(x2d: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x2d.astype(np.float32)).max(axis=-1) / np.float32(448), TINY).astype(np.float32)


def make_case(k=256, n=40, group=64, zero=False, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_rtn(torch.randn(k, n, generator=gen), group, symmetric=not zero)
    w_packed, w_zero = onnx_to_engine(qw.q, qw.zero, signed=not zero, group_size=group)
    b = torch.randn(n, generator=gen) if bias else None
    return {"q": qw.q, "scale": qw.scale, "zero": qw.zero, "bias": b, "g": group, "w_packed": w_packed,
            "w_zero": w_zero, "signed": not zero}


def oracle(x: torch.Tensor, case, x_scale: float | None, dynamic: bool) -> np.ndarray:
    """float64: FP8 Q/DQ of x (numpy + ml_dtypes), then x @ ((q - zp) * scale) + bias."""
    x2d = x.float().numpy().reshape(-1, x.shape[-1])
    s = np_row_scales(x2d)[:, None] if dynamic else np.float32(x_scale)
    xd = np_fp8(x2d, s).astype(np.float64) * s
    g = case["g"]
    zp = 0.0 if case["zero"] is None else np.repeat(case["zero"].numpy().astype(np.float64), g, axis=0)
    w = (case["q"].numpy().astype(np.float64) - zp) * np.repeat(case["scale"].numpy().astype(np.float64), g, axis=0)
    y = xd @ w + (0.0 if case["bias"] is None else case["bias"].numpy().astype(np.float64))
    return y.reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------- FP8 activation quantization

def test_fp8_quantize_matches_numpy_bit_exact():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 96)) * np.exp(rng.uniform(-6, 6, (64, 1)))).astype(np.float32)
    x[0, :4] = [0.0, 1e-30, 500.0, -1e4]  # zero, deep underflow, saturation both ways
    for scale in (np.float32(0.37), np.float32(1.0)):
        got = quantize_activation(torch.from_numpy(x), torch.tensor(scale), torch.float8_e4m3fn)
        np.testing.assert_array_equal(got.view(torch.uint8).numpy(), np_fp8(x, scale).view(np.uint8))
    # round to nearest even at the exact midpoints of E4M3 neighbours (1.0 | 1.125 | 1.25; 256 | 288 | 320)
    ties = torch.tensor([1.0625, 1.1875, 272.0, 304.0, -1.0625])
    got = quantize_activation(ties, torch.tensor(1.0), torch.float8_e4m3fn).float().tolist()
    assert got == [1.0, 1.25, 256.0, 320.0, -1.0]


def test_dynamic_row_scales_and_per_row_quantization():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 5, 64)) * rng.uniform(0.01, 100, (3, 5, 1))).astype(np.float32)
    x[1, 2] = 0.0  # an all-zero row: floored scale, quantizes to 0
    xq, rows = quantize_activation_fp8(torch.from_numpy(x), None, True)
    x2d = x.reshape(-1, 64)
    want_s = np_row_scales(x2d)
    np.testing.assert_array_equal(rows.numpy(), want_s)
    assert rows.dtype == torch.float32 and rows[7] == MIN_SCALE
    np.testing.assert_array_equal(xq.view(torch.uint8).numpy(), np_fp8(x2d, want_s[:, None]).view(np.uint8))
    assert float(xq.float().abs().amax(dim=1).min()) == 0.0 and float(xq.float().abs().amax()) == 448.0
    np.testing.assert_array_equal(dynamic_row_scales(torch.from_numpy(x2d)).numpy(), want_s)


def test_static_quantization_repeats_the_scale_per_row():
    x = torch.randn(2, 3, 32)
    xq, rows = quantize_activation_fp8(x, torch.tensor([0.05]), False)
    assert xq.shape == (6, 32) and xq.dtype == torch.float8_e4m3fn
    assert rows.shape == (6,) and torch.all(rows == torch.tensor(0.05))


# ---------------------------------------------------------------- op (CPU path: the reference)

@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_op_w4a8_matches_float64_oracle(mode, zero, dtype):
    case = make_case(zero=zero, seed=3)
    x = (torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    dynamic = mode == "dynamic"
    x_scale = None if dynamic else torch.tensor(float(x.float().abs().max()) / 448)
    y = torch.ops.qcompile.int4_groupwise_gemm(x, case["w_packed"], case["scale"], case["w_zero"], case["bias"],
                                               case["g"], x_scale, dynamic)
    assert y.dtype == dtype and y.shape == (2, 5, 40)
    ref = oracle(x, case, None if dynamic else float(x_scale), dynamic)
    assert_close_to(y, ref, {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype])


def test_op_fp8_activations_differ_from_w4a16():
    """The activation really is quantized (the W4A8 result is not the W4A16 one)."""
    case = make_case(seed=5)
    x = torch.randn(4, 256)
    args = (x, case["w_packed"], case["scale"], case["w_zero"], case["bias"], case["g"])
    w4a16 = torch.ops.qcompile.int4_groupwise_gemm(*args)
    w4a8 = torch.ops.qcompile.int4_groupwise_gemm(*args, None, True)
    assert 0 < float((w4a16 - w4a8).abs().max()) < 0.1 * float(w4a16.abs().max())


def test_op_w4a8_argument_errors():
    case = make_case()
    args = (torch.randn(2, 256), case["w_packed"], case["scale"], None, None, case["g"])
    with pytest.raises(ValueError, match="x_scale must then be None"):
        torch.ops.qcompile.int4_groupwise_gemm(*args, torch.tensor(1.0), True)
    with pytest.raises(ValueError, match="x_scale must be a float scalar"):
        torch.ops.qcompile.int4_groupwise_gemm(*args, torch.ones(2), False)


def test_export_w4a8_with_dynamic_rows_keeps_the_op():
    case = make_case(seed=6)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", case["w_packed"])
            self.register_buffer("s", case["scale"])
            self.register_buffer("xs", torch.tensor(0.02))

        def forward(self, x):
            return torch.ops.qcompile.int4_groupwise_gemm(x, self.w, self.s, None, None, case["g"], self.xs, False)

    rows = torch.export.Dim("rows", min=1, max=4096)
    ep = torch.export.export(Lin(), (torch.randn(5, 256),), dynamic_shapes={"x": {0: rows}})
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"] == \
        [torch.ops.qcompile.int4_groupwise_gemm.default]
    for m in (1, 9):
        x = torch.randn(m, 256)
        assert_close_to(ep.module()(x), oracle(x, {**case, "bias": None, "zero": None}, 0.02, False), 1e-5)


# ---------------------------------------------------------------- ONNX node: ORT (function body) vs our lowering

def _model(case, act_quant: str, x_scale: float | None, k=256, n=40):
    dt = TensorProto.INT4 if case["signed"] else TensorProto.UINT4
    inits = [helper.make_tensor("w_q", dt, [k, n], case["q"].numpy().reshape(-1).tolist()),
             numpy_helper.from_array(case["scale"].numpy(), "w_scale")]
    inputs = ["x", "w_q", "w_scale", "", ""]
    if case["zero"] is not None:
        inits.append(helper.make_tensor("w_zp", dt, list(case["zero"].shape), case["zero"].numpy().reshape(-1).tolist()))
        inputs[3] = "w_zp"
    if case["bias"] is not None:
        inits.append(numpy_helper.from_array(case["bias"].numpy(), "bias"))
        inputs[4] = "bias"
    if x_scale is not None:
        inits.append(numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"))
        inputs.append("x_scale")
    node = onnx_schema.make_node("w4a8", inputs, ["y"], block_size=case["g"], act_quant=act_quant)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_schema.FUNCTION_OPSET)],
                              ir_version=10)
    onnx_schema.add_to_model(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("act_quant", ["fp8_static", "fp8_dynamic"])
@pytest.mark.parametrize("zero,bias", [(False, True), (True, False)], ids=["int4+bias", "uint4+zp"])
def test_plugin_node_runs_in_ort_and_agrees_with_lowering(act_quant, zero, bias):
    from qcompile.lowering import lower_onnx

    case = make_case(zero=zero, bias=bias, seed=8)
    static = act_quant == "fp8_static"
    model = _model(case, act_quant, 0.011 if static else None)
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs["plugin_version"] == b"2" and attrs["act_quant"] == act_quant.encode()
    assert model.graph.node[0].overload == act_quant
    assert {f.overload for f in model.functions} == {act_quant}
    sess, prog = ort_session(model), lower_onnx(model)
    for shape in [(1, 1), (2, 7)]:
        x = (np.random.default_rng(sum(shape)).standard_normal((*shape, 256)) * 2).astype(np.float32)
        (want,) = sess.run(None, {"x": x})
        (got,) = prog(torch.from_numpy(x))
        ref = oracle(torch.from_numpy(x), case, 0.011 if static else None, not static)
        tol = 1e-4 * np.abs(ref).max()
        np.testing.assert_allclose(want, ref, rtol=1e-4, atol=tol)  # the function body is the contract
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=tol)


def test_w4a16_node_is_still_version_1():
    node = onnx_schema.make_node("n", ["x", "w", "s"], ["y"], block_size=64)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"block_size": 64, "plugin_version": b"1", "plugin_namespace": b"qcompile"}
    assert node.overload == ""
    with pytest.raises(ValueError, match="x_scale"):
        onnx_schema.make_node("n", ["x", "w", "s", "", "", "xs"], ["y"], block_size=64)  # act_quant none
    with pytest.raises(ValueError, match="act_quant"):
        onnx_schema.make_node("n", ["x", "w", "s"], ["y"], block_size=64, act_quant="int8")


def test_lowering_errors_name_the_node():
    from qcompile.errors import LoweringError
    from qcompile.lowering import lower_onnx

    model = _model(make_case(seed=9), "fp8_static", 0.01)
    del model.graph.node[0].input[5]  # fp8_static without its x_scale
    with pytest.raises(LoweringError, match="'w4a8'.*needs the x_scale"):
        lower_onnx(model)(torch.randn(1, 2, 256))


# ---------------------------------------------------------------- CUDA (the FP8 tensor-core kernel)

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m, n", [(1, 256), (16, 256), (17, 256), (300, 256), (16, 16384), (64, 16384)])
def test_cuda_w4a8_matches_reference(mode, dtype, m, n):
    """N = 16384: the 16- and 64-row buckets load x (converted from FP8) and the weight through TMA."""
    case = make_case(k=512, n=n, group=128, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(dtype)
    dynamic = mode == "dynamic"
    x_scale = None if dynamic else torch.tensor(float(x.float().abs().max()) / 448)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in
            (x, case["w_packed"], case["scale"], case["w_zero"], case["bias"], case["g"], x_scale)]
    y = torch.ops.qcompile.int4_groupwise_gemm(*args, dynamic)
    assert y.dtype == dtype and y.device.type == "cuda"
    assert_close_to(y, oracle(x, case, None if dynamic else float(x_scale), dynamic), 2e-2)


@fake_cuda_export
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "per-token"])
@pytest.mark.parametrize("n", [256, 16384], ids=["narrow", "wide"])
def test_gpu_launches_export_on_fake_cuda_tensors(monkeypatch, dynamic, n):
    """The W4A8 CUDA body as an engine's export traces it (FP8 activation quantization, the M buckets in
    torch.cond, the Triton launches included), without a GPU; N = 16384: the 16- and 64-row buckets take the
    one-dot kernel's TMA tiles on x converted inside the branch."""
    expect_tma(monkeypatch, lambda cfg: "tma" in cfg and n >= cfg["tma"]["min_n"])
    case = make_case(k=512, n=n, group=128, seed=7)
    x_scale = None if dynamic else torch.tensor(0.02)
    weights = (case["w_packed"], case["scale"], case["w_zero"], case["bias"], case["g"], x_scale, dynamic)
    assert export_on_fake_cuda(monkeypatch, torch.ops.qcompile.int4_groupwise_gemm, weights,
                               torch.randn(8, 512).to(torch.bfloat16)) == \
        [torch.ops.qcompile.int4_groupwise_gemm.default]
