"""The FP8 path of the 4-bit weight GEMMs above 128 rows (`plugins/fp8_large_m.py`, opt-in `fp8_large_m`): the
dequantize kernels' FP8 weights against float64 / plain-torch oracles (interpreter; the interpreter's FP8 conversion
does not round to nearest even, so there the kernels write their values before rounding, in float32), the rowwise
GEMM against a float64 emulation of its numerics, the M dispatch, and the ops on CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fp4_testutil import layout_case as fp4_layout_case
from fp4_testutil import planar_case as fp4_planar_case
from fp4_testutil import weight64 as fp4_weight64
from int4_testutil import cuda, make_case, oracle, triton_interp
from qc_testutil import export_on_fake_cuda, fake_cuda_export

from qcompile.plugins import fp8_large_m
from qcompile.plugins.gemm_dispatch import bucket_for, from_rows
from qcompile.plugins.int4_gemm.format import columns_in_words_order, is_planar, planar_order
from qcompile.plugins.int4_gemm.reference import dequantize_weight

FP8 = torch.float8_e4m3fn
INT4_CASES = pytest.mark.parametrize("k, group", [(256, 32), (256, 64), (512, 128), (328, "channel"), (256, "channel")],
                                     ids=["g32", "g64-planar", "g128-planar", "channel-328-tail", "channel-planar"])


def cpu_scaled_mm_works() -> bool:
    try:
        a = torch.ones(16, 16).to(FP8)
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


cpu_scaled_mm = pytest.mark.skipif(not cpu_scaled_mm_works(), reason="this torch has no CPU torch._scaled_mm")


def fp8_of(w_kn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 [N, K], S [N]) of a float weight [K, N] by the module's definition, its bound the columns' max |W|."""
    s = fp8_large_m.column_scales(w_kn.abs().amax(0))
    return (w_kn.float().t() * (1.0 / s)[:, None]).to(FP8), s


def emulated64(xq, x_row_scale, w8, s, bias) -> np.ndarray:
    """float64 `(xq * x_row_scale) @ (w8 * s).T + bias`: what the FP8 GEMM computes before its bf16 rounding."""
    y = (xq.double() * x_row_scale.double().reshape(-1, 1)) @ (w8.double() * s.double()[:, None]).T
    return (y if bias is None else y + bias.double()).numpy()


def rel_l2(got, ref) -> float:
    got = np.asarray(got.double().cpu().numpy() if isinstance(got, torch.Tensor) else got, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------- plain torch (CI)

def test_from_rows_hands_every_larger_m_to_the_new_value():
    buckets = [(1, "gemv"), (16, "a"), (64, "b"), (128, "c"), (None, "dequant")]
    assert from_rows(buckets, 129, "fp8") == [(1, "gemv"), (16, "a"), (64, "b"), (128, "c"), (None, "fp8")]
    assert from_rows(buckets, 1025, "fp8") == buckets[:4] + [(1024, "dequant"), (None, "fp8")]
    assert from_rows(buckets, 40, "fp8") == [(1, "gemv"), (16, "a"), (39, "b"), (None, "fp8")]
    got = from_rows(buckets, 129, "fp8")
    assert [bucket_for(got, m) for m in (1, 2, 128, 129, 5000)] == ["gemv", "a", "c", "fp8", "fp8"]


def test_column_scales_bound_the_weight_and_floor_zero_columns():
    bound = torch.tensor([448.0, 1.0, 0.0])
    s = fp8_large_m.column_scales(bound)
    assert torch.equal(s[:2], torch.tensor([1.0, 1.0 / 448.0])) and s[2] > 0 and torch.isfinite(1.0 / s).all()


@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
def test_int4_column_bound_is_the_largest_weight_the_scales_allow(zero):
    """The bound is >= every |W[:, n]| and reached by the extreme code of the group with the largest bound."""
    from qcompile.plugins.int4_gemm.reference import fp8_column_bound

    case = make_case(k=256, n=40, group=32, zero=zero, seed=3)
    w = dequantize_weight(case["w_packed"], case["scale"], case["w_zero"], 32)
    bound = fp8_column_bound(case["scale"], case["w_zero"])
    assert (w.abs().amax(0) <= bound).all()
    z = 0.0 if case["w_zero"] is None else case["w_zero"].double()
    extreme = torch.maximum((-8.0 - z).abs() if zero else torch.tensor(8.0), (7.0 - z).abs() if zero
                            else torch.tensor(7.0)) * case["scale"].double()
    torch.testing.assert_close(bound.double(), extreme.amax(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_computes_the_rowwise_fp8_gemm(bias, dtype):
    """`fp8_large_m.linear` (off CUDA: `emulated_scaled_mm`) against a float64 emulation of the FP8 GEMM, and that
    emulation's distance from the exact product: x rounded per row and W per column to E4M3 cost a few % (the
    price of the opt-in path)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(150, 256, generator=g).to(dtype)
    w = torch.randn(256, 96, generator=g) * torch.rand(1, 96, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    w8, s = fp8_of(w)
    y = fp8_large_m.linear(x, w8, s, b, dtype)
    xq, row = fp8_large_m.quantize_rows(x)
    ref = emulated64(xq, row, w8, s, b)
    assert y.dtype == dtype and y.shape == (150, 96)
    assert rel_l2(y, ref) < 4e-3  # bf16 output rounding
    exact = x.double().numpy() @ w.double().numpy() + (0.0 if b is None else b.double().numpy())
    assert 5e-3 < rel_l2(y, exact) < 6e-2


def test_linear_takes_fp8_x_with_its_row_scales():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(130, 128, generator=g)
    w = torch.randn(128, 32, generator=g)
    xq, row = fp8_large_m.quantize_rows(x)
    w8, s = fp8_of(w)
    y = fp8_large_m.linear(xq, w8, s, None, torch.bfloat16, x_row_scale=row * 2.0)
    assert rel_l2(y, emulated64(xq, row * 2.0, w8, s, None)) < 4e-3


@cpu_scaled_mm
@pytest.mark.parametrize("bias", [False, True])
def test_rowwise_scaled_mm_takes_the_scales_as_cublaslt_wants(bias):
    """The cuBLASLt call (here torch's CPU `_scaled_mm`: the same argument contract) against float64: per-row scales
    given as [M] or [M, 1], per-column ones as [N]; and the CPU emulation agrees with it."""
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(140, 64, generator=g), torch.randn(64, 48, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    xq, row = fp8_large_m.quantize_rows(x)
    w8, s = fp8_of(w)
    for row_scale in (row, row[:, None]):
        y = fp8_large_m.rowwise_scaled_mm(xq, row_scale, w8, s, b)
        assert y.dtype == torch.bfloat16 and rel_l2(y, emulated64(xq, row, w8, s, b)) < 4e-3
        assert rel_l2(fp8_large_m.emulated_scaled_mm(xq, row_scale, w8, s, b), y.double().numpy()) < 4e-3


@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@INT4_CASES
def test_int4_fp8_weight_reference_values(zero, k, group):
    """The CPU path's FP8 weight: (q - zp) * (s * (1 / S[n])) from the ONNX-form values, rounded to E4M3, K in the
    words' order."""
    from qcompile.plugins.int4_gemm.reference import fp8_weight_reference

    case = make_case(k=k, n=72, group=group, zero=zero, seed=k)
    w8, s = fp8_weight_reference(case["w_packed"], case["scale"], case["w_zero"], case["g"])
    assert w8.dtype == FP8 and torch.equal(w8.view(torch.uint8), int4_oracle_fp32(case, s).to(FP8).view(torch.uint8))


def int4_oracle_fp32(case, s) -> torch.Tensor:
    """[N, K] float32 (q - zp) * (scale * (1 / S)) from the ONNX-form values of an INT4 case, K in the engine words'
    order (planar words: `format.planar_order`)."""
    g = case["g"]
    q = case["q"].float() - (0.0 if case["zero"] is None else case["zero"].float().repeat_interleave(g, 0))
    natural = (q * (case["scale"].float() * (1.0 / s)).repeat_interleave(g, 0)).t()
    return natural[:, planar_order(natural.shape[1])] if is_planar(natural.shape[1], g) else natural


@pytest.mark.parametrize("kind", ["w4a16", "w4a16-zp", "w4a8"])
def test_int4_op_on_cpu_emulates_the_fp8_path_above_128_rows(kind):
    """The op with fp8_large_m off CUDA, eager and exported with a dynamic row count (a CPU engine): exact up to 128
    rows, the FP8 path's numerics from 129 (float64 emulation, bf16 output rounding), a few % from exact."""
    from qcompile.plugins.int4_gemm.reference import fp8_weight_reference, quantize_activation_fp8

    case = make_case(k=256, n=64, group=64, zero=kind == "w4a16-zp", seed=5)
    w4a8 = kind == "w4a8"
    op = torch.ops.qcompile.int4_groupwise_gemm
    args = (case["w_packed"], case["scale"], case["w_zero"], case["bias"], 64, None, w4a8)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return op(x, *args, True)
    rows = torch.export.Dim("rows", min=1, max=4096)
    exported = torch.export.export(Layer(), (torch.randn(4, 256),), dynamic_shapes={"x": {0: rows}}).module()
    w8, s = fp8_weight_reference(*args[:3], 64)
    for m in (5, 128, 129, 300):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        for y in (op(x, *args, True), exported(x)):
            if m <= 128:
                assert torch.equal(y, op(x, *args, False))
                continue
            xq, row = quantize_activation_fp8(x, None, True) if w4a8 else fp8_large_m.quantize_rows(x)
            assert rel_l2(y, emulated64(columns_in_words_order(xq, 64), row, w8, s, case["bias"])) < 4e-3
            assert 5e-3 < rel_l2(y, op(x, *args, False).double().numpy()) < 6e-2


@pytest.mark.parametrize("fmt, w4a4", [("nvfp4", False), ("mxfp4", False), ("nvfp4", True)],
                         ids=["nvfp4", "mxfp4", "w4a4"])
def test_fp4_op_on_cpu_emulates_the_fp8_path_above_128_rows(fmt, w4a4):
    from qcompile.plugins.fp4_gemm import format as F
    from qcompile.plugins.fp4_gemm.reference import fp8_weight_reference

    case = fp4_planar_case(fmt, k=256, n=48, seed=6)
    x_global = torch.tensor(0.01) if w4a4 else None
    bias = torch.randn(48, generator=torch.Generator().manual_seed(6))
    args = (case["w_packed"], case["w_scale"], case["w_global"], x_global, bias, case["block"])
    w8, s = fp8_weight_reference(*args[:3], case["block"])
    for m in (128, 200):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        y = torch.ops.qcompile.fp4_gemm(x, *args, True)
        exact = torch.ops.qcompile.fp4_gemm(x, *args, False)
        if m <= 128:
            assert torch.equal(y, exact)
            continue
        x_hat = F.nvfp4_fake_quantize(x.float(), x_global).to(x.dtype) if w4a4 else x
        xq, row = fp8_large_m.quantize_rows(x_hat)
        assert rel_l2(y, emulated64(xq, row, w8, s, bias)) < 4e-3
        assert 5e-3 < rel_l2(y, exact.double().numpy()) < 6e-2


@fake_cuda_export
@pytest.mark.parametrize("plugin", ["int4", "nvfp4", "int4-w4a8"])
def test_fp8_path_exports_on_fake_cuda_tensors(monkeypatch, plugin):
    """The ops with fp8_large_m as an engine exports them (dynamic M, torch.cond buckets) on fake CUDA tensors of
    an H200: the FP8 bucket's launch code (dequantize kernel, x's quantization, `torch._scaled_mm`) traces, and it is
    traced (a GEMM that raises makes the export fail: raising is what torch.cond's tracing lets out of a branch)."""
    if plugin.startswith("int4"):
        case = make_case(k=512, n=256, group=128, zero=True)
        op = torch.ops.qcompile.int4_groupwise_gemm
        weights = (case["w_packed"], case["scale"], case["w_zero"], case["bias"], 128, None, plugin == "int4-w4a8",
                   True)
    else:
        case = fp4_planar_case("nvfp4", k=512, n=256)
        op = torch.ops.qcompile.fp4_gemm
        weights = (case["w_packed"], case["w_scale"], case["w_global"], None, None, case["block"], True)
    x = torch.randn(4, 512).to(torch.bfloat16)
    assert export_on_fake_cuda(monkeypatch, op, weights, x) == [op.default]

    def gemm(*args):
        raise AssertionError("the FP8 GEMM was traced")
    monkeypatch.setattr(fp8_large_m, "rowwise_scaled_mm", gemm)
    with pytest.raises(Exception, match="the FP8 GEMM was traced"):
        export_on_fake_cuda(monkeypatch, op, weights, x)


# ---------------------------------------------------------------- Triton interpreter

@triton_interp
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@INT4_CASES
def test_int4_fp8_weight_values_are_exact_interpreter(zero, k, group):
    """Every 64 K (planar or sequential words, a group per block or several) comes out transposed, [N, K] in the
    words' K order, with values (q - zp) * (s * (1 / S[n])) bit for bit as plain torch computes them from the
    ONNX-form values; N not a multiple of the tile."""
    from qcompile.plugins.int4_gemm.dequant_fp8 import fp8_weight
    from qcompile.plugins.int4_gemm.reference import fp8_column_bound

    case = make_case(k=k, n=72, group=group, zero=zero, seed=k)
    got, s = fp8_weight(case["w_packed"], case["scale"], case["w_zero"], case["g"], dtype=torch.float32)
    assert torch.equal(s, fp8_large_m.column_scales(fp8_column_bound(case["scale"], case["w_zero"])))
    assert got.shape == (72, k) and torch.equal(got, int4_oracle_fp32(case, s))
    assert got.abs().max() <= 448.0 * (1 + 2 ** -20)


@triton_interp
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", ["bytes", "planar", "pairs"])
def test_fp4_fp8_weight_values_interpreter(fmt, layout):
    """W * (1 / S[n]) from each engine layout against float64 (NVFP4's global scale: one fp32 rounding)."""
    from qcompile.plugins.fp4_gemm.kernel import fp8_weight
    from qcompile.plugins.fp4_gemm.reference import fp8_column_bound as column_bound

    case = fp4_layout_case(fmt, layout, k=256, n=40, seed=11)
    got, s = fp8_weight(case["w_packed"], case["w_scale"], case["w_global"], case["block"], dtype=torch.float32)
    w64 = fp4_weight64(case)
    assert torch.equal(s, fp8_large_m.column_scales(column_bound(case["w_scale"], case["w_global"])))
    bound = column_bound(case["w_scale"], case["w_global"]).double().numpy()
    assert (np.abs(w64).max(axis=1) <= bound * (1 + 2 ** -22)).all()  # the bound in float32: one rounding
    want = w64 * (1.0 / s).double().numpy()[:, None]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2 ** -22, atol=0)
    assert got.abs().max() <= 448.0 * (1 + 2 ** -20)


@triton_interp
@pytest.mark.parametrize("flag, m, fp8", [(True, 129, True), (True, 300, True), (True, 128, False),
                                          (False, 300, False)])
def test_int4_dispatch_takes_the_fp8_path_above_128_rows_when_asked(flag, m, fp8, monkeypatch):
    """`int4_gemm_triton(fp8_large_m=...)`: the FP8 bucket from 129 rows, only with the flag and where it can run
    (here `usable` is forced: CPU tensors); its result is the FP8 GEMM of the kernel's weight."""
    from qcompile.plugins.int4_gemm import kernel

    calls = []

    def spy(x2d, w8, s, bias, out_dtype, x_row_scale=None):
        calls.append((tuple(x2d.shape), w8.dtype, tuple(w8.shape)))
        return torch.zeros(x2d.shape[0], w8.shape[0], dtype=out_dtype)

    monkeypatch.setattr(fp8_large_m, "usable", lambda device, k, n: True)
    monkeypatch.setattr(fp8_large_m, "linear", spy)
    monkeypatch.setattr(kernel, "launch_dequant", lambda *a, **kw: torch.zeros(256, 48, dtype=a[4]))
    case = make_case(k=256, n=48, group=64, seed=m)
    x = torch.randn(m, 256, dtype=torch.float16)
    kernel.int4_gemm_triton(x, case["w_packed"], case["scale"], None, None, 64, fp8_large_m=flag)
    assert calls == ([((m, 256), FP8, (48, 256))] if fp8 else [])


@triton_interp
@pytest.mark.parametrize("flag, m, fp8", [(True, 129, True), (True, 128, False), (False, 300, False)])
def test_fp4_dispatch_takes_the_fp8_path_above_128_rows_when_asked(flag, m, fp8, monkeypatch):
    from qcompile.plugins.fp4_gemm import kernel

    calls = []
    monkeypatch.setattr(fp8_large_m, "usable", lambda device, k, n: True)
    monkeypatch.setattr(fp8_large_m, "linear", lambda x2d, w8, s, bias, dt: calls.append(w8.dtype) or
                        torch.zeros(x2d.shape[0], w8.shape[0], dtype=dt))
    case = fp4_planar_case("nvfp4", k=256, n=48, seed=m)
    x = torch.randn(m, 256, dtype=torch.float16)
    if not fp8:  # the other paths' kernels are tested elsewhere: here only which path runs
        monkeypatch.setattr(kernel, "launch_dequant", lambda *a, **kw: torch.zeros(48, 256, dtype=a[4]))
        monkeypatch.setattr(kernel.one_dot, "launch", lambda x2d, *a, **kw: torch.zeros(x2d.shape[0], 48))
    kernel.fp4_gemm_triton(x, case["w_packed"], case["w_scale"], case["w_global"], None, case["block"],
                           fp8_large_m=flag)
    assert calls == ([FP8] if fp8 else [])


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@INT4_CASES
def test_cuda_int4_fp8_weight_rounds_to_nearest_even(zero, k, group):
    """The kernel's FP8 weight is torch's round-to-nearest-even of its exact float32 values, and the CPU path's
    (`reference.fp8_weight_reference`) bit for bit."""
    from qcompile.plugins.int4_gemm.dequant_fp8 import fp8_weight
    from qcompile.plugins.int4_gemm.reference import fp8_weight_reference

    case = make_case(k=k, n=72, group=group, zero=zero, seed=k)
    dev = [t.cuda() if t is not None else None for t in (case["w_packed"], case["scale"], case["w_zero"])]
    w32, s = fp8_weight(*dev, case["g"], dtype=torch.float32)
    w8, s8 = fp8_weight(*dev, case["g"])
    assert w8.dtype == FP8 and torch.equal(s, s8)
    assert torch.equal(w8.view(torch.uint8), w32.to(FP8).view(torch.uint8))
    cpu8, cpu_s = fp8_weight_reference(case["w_packed"], case["scale"], case["w_zero"], case["g"])
    assert torch.equal(cpu_s, s.cpu()) and torch.equal(cpu8.view(torch.uint8), w8.cpu().view(torch.uint8))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [128, 129, 300])
def test_cuda_int4_op_fp8_large_m(zero, dtype, m):
    """The op with fp8_large_m: from 129 rows the FP8 GEMM's numerics (float64 emulation of them: within bf16
    output rounding), a few % from the exact product; at 128 rows the exact path."""
    from qcompile.plugins.int4_gemm.dequant_fp8 import fp8_weight

    case = make_case(k=512, n=320, group=128, zero=zero, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(dtype)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in
           (x, case["w_packed"], case["scale"], case["w_zero"], case["bias"], case["g"])]
    y = torch.ops.qcompile.int4_groupwise_gemm(*dev, None, False, True).cpu()
    exact = oracle(x, case)
    if m <= 128:
        assert rel_l2(y, exact) < 1e-2  # the exact path (bf16 rounding)
        return
    w8, s = fp8_weight(*dev[1:4], case["g"])
    xq, row = fp8_large_m.quantize_rows(dev[0])
    xq = columns_in_words_order(xq, case["g"])  # planar words: W8's K order
    assert rel_l2(y, emulated64(xq.cpu(), row.cpu(), w8.cpu(), s.cpu(), case["bias"])) < 5e-3
    assert rel_l2(y, exact) < 6e-2


@pytest.mark.gpu
@cuda
def test_cuda_w4a8_op_fp8_large_m_keeps_its_activation_scales():
    """W4A8 (dynamic per-row FP8 x): the FP8 path multiplies the op's own FP8 x, not a second quantization."""
    from qcompile.plugins.int4_gemm.dequant_fp8 import fp8_weight
    from qcompile.plugins.int4_gemm.reference import quantize_activation_fp8

    case = make_case(k=512, n=256, group=128, seed=1)
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).cuda()
    dev = [case[key].cuda() for key in ("w_packed", "scale")]
    y = torch.ops.qcompile.int4_groupwise_gemm(x, *dev, None, case["bias"].cuda(), 128, None, True, True).cpu()
    xq, row = quantize_activation_fp8(x, None, True)
    w8, s = fp8_weight(*dev, None, 128)
    xq = columns_in_words_order(xq, 128)
    assert rel_l2(y, emulated64(xq.cpu(), row.cpu(), w8.cpu(), s.cpu(), case["bias"])) < 5e-3


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("layout", ["bytes", "planar", "pairs"])
def test_cuda_fp4_op_fp8_large_m(fmt, layout):
    from qcompile.plugins.fp4_gemm.kernel import fp8_weight

    case = fp4_layout_case(fmt, layout, k=512, n=256, seed=2)
    x = torch.randn(260, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).cuda()
    bias = torch.randn(256).cuda()
    dev = [t.cuda() if t is not None else None for t in (case["w_packed"], case["w_scale"], case["w_global"])]
    y = torch.ops.qcompile.fp4_gemm(x, *dev, None, bias, case["block"], True).cpu()
    w8, s = fp8_weight(*dev, case["block"])
    xq, row = fp8_large_m.quantize_rows(x)
    assert rel_l2(y, emulated64(xq.cpu(), row.cpu(), w8.cpu(), s.cpu(), bias.cpu())) < 5e-3
    exact = x.double().cpu().numpy() @ fp4_weight64(case).T + bias.double().cpu().numpy()
    assert rel_l2(y, exact) < 6e-2


@pytest.mark.gpu
@pytest.mark.slow
@cuda
def test_cuda_aoti_package_with_fp8_large_m(tmp_path):
    """The flag compiled into an AOTInductor package with a dynamic row count: exact below 129 rows, the FP8
    GEMM's numerics from there."""
    case = make_case(k=512, n=256, group=128, seed=4)
    w = [case[key].cuda() for key in ("w_packed", "scale")]
    bias = case["bias"].cuda()

    class Linear(torch.nn.Module):
        def forward(self, x):
            return torch.ops.qcompile.int4_groupwise_gemm(x, *w, None, bias, 128, None, False, True)

    rows = torch.export.Dim("rows", min=1, max=4096)
    ep = torch.export.export(Linear(), (torch.randn(4, 512, device="cuda", dtype=torch.bfloat16),),
                             dynamic_shapes=({0: rows},))
    package = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "fp8.pt2")))
    for m in (1, 100, 129, 1000):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        err = rel_l2(package(x.cuda()).cpu(), oracle(x, case))
        assert err < (1e-2 if m <= 128 else 6e-2) and (m <= 128 or err > 1e-2)
