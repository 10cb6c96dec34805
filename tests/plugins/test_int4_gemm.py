"""Tests of the groupwise INT4 GEMM plugin: formats, reference vs float64 numpy, op, ONNX/ORT, export, the tile
kernels (the GEMV's tests are in test_int4_gemv.py)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from int4_testutil import assert_finished_like, cuda, make_case, needs_triton, oracle, triton_interp
from onnx import TensorProto, helper, numpy_helper
from qc_testutil import (assert_close_to, expect_launch_keyword, expect_tma, export_on_fake_cuda, exported_op_arg,
                         fake_cuda_export, ort_session, up_to_64_rows)

from qcompile.plugins.int4_gemm import int4_gemm_reference, onnx_schema
from qcompile.plugins.int4_gemm.format import from_engine, onnx_bytes_to_engine, pack_int4, to_engine, unpack_int4

GROUPS = [32, 64, 128, "channel"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def op_args(case, x):
    return x, case["w_packed"], case["scale"], case["w_zero"], case["bias"], case["g"]


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("shape", [(8, 4), (5, 7), (1,), (3, 1, 5)])
@pytest.mark.parametrize("signed", [True, False])
def test_onnx_packing_matches_onnx_and_round_trips(shape, signed):
    rng = np.random.default_rng(sum(shape))
    lo, hi = (-8, 8) if signed else (0, 16)
    v = rng.integers(lo, hi, size=shape).astype(np.int8)
    v.reshape(-1)[:2] = [lo, hi - 1][: v.size] if v.size >= 2 else v.reshape(-1)[:2]  # both extremes
    dt = TensorProto.INT4 if signed else TensorProto.UINT4
    proto = helper.make_tensor("w", dt, list(shape), v.reshape(-1).tolist())
    # onnx stores 4-bit data packed in int32_data (one byte per element) unless raw; compare with raw_data
    ml = ml_dtypes.int4 if signed else ml_dtypes.uint4
    raw = numpy_helper.from_array(v.astype(ml), "w").raw_data
    assert pack_int4(v).tobytes() == raw
    np.testing.assert_array_equal(unpack_int4(np.frombuffer(raw, np.uint8), shape, signed), v)
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.int8), v)
    # first element in the low nibble
    assert pack_int4(np.array([1, 2], np.int8))[0] == 0x21 and pack_int4(np.array([-1, 0], np.int8))[0] == 0x0F


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="int4 values"):
        pack_int4(np.array([16]))


def test_engine_layout_is_bit_exact():
    # sequential order (a group that is not a multiple of 64): a column q[0..7] = 0..7 packs to 0x76543210; all
    # -1 packs to 0xFFFFFFFF (-1 as int32)
    q = torch.tensor([[j, -1, -8 if j == 7 else 0] for j in range(8)], dtype=torch.int8)
    words = to_engine(q, 8)
    assert words.dtype == torch.int32 and words.shape == (1, 3)
    assert words[0, 0].item() == 0x76543210 and words[0, 1].item() == -1
    assert words[0, 2].item() == np.int32(np.uint32(0x80000000)).item()
    rng = np.random.default_rng(0)
    k, n = 64, 24
    v = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    expect = np.zeros((k // 8, n), np.uint64)
    for kk in range(k):
        expect[kk // 8] |= (v[kk].astype(np.int64) & 0xF).astype(np.uint64) << np.uint64(4 * (kk % 8))
    got = to_engine(torch.from_numpy(v), 32)
    np.testing.assert_array_equal(got.numpy().view(np.uint32), expect.astype(np.uint32))
    np.testing.assert_array_equal(from_engine(got, 32).numpy(), v)
    assert torch.equal(onnx_bytes_to_engine(pack_int4(v), k, n, 32, signed=True), got)
    u = (v.astype(np.int16) + 8).astype(np.int8)  # uint4 values: stored as u - 8
    assert torch.equal(onnx_bytes_to_engine(pack_int4(u), k, n, 32, signed=False), got)


@pytest.mark.parametrize("k,group", [(128, 64), (192, 64), (256, 128), (128, 128)])
def test_planar_engine_layout_is_bit_exact(k, group):
    """Planar order (K and group multiples of 64): in each 64 K, word c holds in nibbles j and j + 4 (j < 4)
    the weights at k = 16 j + 2 c and k + 1 (spelled out here from the format's description)."""
    rng = np.random.default_rng(k + group)
    n = 8
    v = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    expect = np.zeros((k // 8, n), np.uint64)
    for block in range(k // 64):
        for c in range(8):
            for j in range(4):
                for t in range(2):
                    kk = 64 * block + 16 * j + 2 * c + t
                    nibble = (v[kk].astype(np.int64) & 0xF).astype(np.uint64)
                    expect[8 * block + c] |= nibble << np.uint64(4 * (j + 4 * t))
    got = to_engine(torch.from_numpy(v), group)
    np.testing.assert_array_equal(got.numpy().view(np.uint32), expect.astype(np.uint32))
    np.testing.assert_array_equal(from_engine(got, group).numpy(), v)
    assert torch.equal(onnx_bytes_to_engine(pack_int4(v), k, n, group, signed=True), got)
    assert not torch.equal(got, to_engine(torch.from_numpy(v), 32))  # the orders differ


# ---------------------------------------------------------------- reference vs float64 oracle

@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("m", [1, 3, 17])
def test_reference_matches_oracle(group, zero, dtype, m):
    case = make_case(group=group, zero=zero, seed=m)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(100 + m)).to(DTYPES[dtype])
    y = int4_gemm_reference(*op_args(case, x))
    assert y.dtype == DTYPES[dtype] and y.shape == (m, 48)
    assert_close_to(y, oracle(x, case), REL[DTYPES[dtype]])


def test_reference_zero_point_matters():
    case = make_case(zero=True)
    x = torch.randn(3, 256)
    y0 = int4_gemm_reference(x, case["w_packed"], case["scale"], None, None, 32)
    assert not torch.allclose(y0, int4_gemm_reference(x, case["w_packed"], case["scale"], case["w_zero"], None, 32))


def test_op_on_cpu_3d_input_and_errors():
    case = make_case(group=64, zero=True)
    x = torch.randn(2, 5, 256)
    y = torch.ops.qcompile.int4_groupwise_gemm(*op_args(case, x))
    assert y.shape == (2, 5, 48)
    assert_close_to(y, oracle(x, case), 1e-5)
    with pytest.raises(Exception, match="group_size"):
        torch.ops.qcompile.int4_groupwise_gemm(x, case["w_packed"], case["scale"], None, None, 48)
    with pytest.raises(Exception, match="w_packed"):
        torch.ops.qcompile.int4_groupwise_gemm(x, case["w_packed"].to(torch.int64), case["scale"], None, None, 64)


# ---------------------------------------------------------------- ONNX node: ORT (function body) vs our lowering

def _onnx_model(case, signed: bool, with_zero: bool, with_bias: bool, k: int, n: int):
    dt = TensorProto.INT4 if signed else TensorProto.UINT4
    q = case["q"].numpy().reshape(-1).tolist()
    inits = [helper.make_tensor("w_q", dt, [k, n], q), numpy_helper.from_array(case["scale"].numpy(), "w_scale")]
    inputs = ["x", "w_q", "w_scale", "", ""]
    if with_zero:
        inits.append(helper.make_tensor("w_zp", dt, list(case["zero"].shape), case["zero"].numpy().reshape(-1).tolist()))
        inputs[3] = "w_zp"
    if with_bias:
        inits.append(numpy_helper.from_array(case["bias"].numpy(), "bias"))
        inputs[4] = "bias"
    node = onnx_schema.make_node("int4_gemm", inputs, ["h"], block_size=case["g"])
    relu = helper.make_node("Relu", ["h"], ["y"])
    graph = helper.make_graph(
        [node, relu], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_schema.FUNCTION_OPSET)], ir_version=10)
    onnx_schema.add_to_model(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("kind", ["int4", "int4+zp", "uint4", "uint4+zp"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("group", [32, "channel"])
def test_lowering_matches_onnx_runtime(kind, with_bias, group):
    from qcompile.lowering import lower_onnx

    signed, with_zero = kind.startswith("int4"), kind.endswith("zp")
    k, n = 128, 40
    case = make_case(k=k, n=n, group=group, zero=not signed, seed=7)
    if signed and with_zero:  # signed zero points: any int4 value
        case["zero"] = torch.randint(-8, 8, case["scale"].shape, generator=torch.Generator().manual_seed(1),
                                     dtype=torch.int8)
    if not with_zero:
        case["zero"] = None
    model = _onnx_model(case, signed, with_zero, with_bias, k, n)
    prog = lower_onnx(model)
    sess = ort_session(model)
    for shape in [(1, 1), (2, 7)]:
        x = np.random.default_rng(sum(shape)).standard_normal((*shape, k)).astype(np.float32)
        (want,) = sess.run(None, {"x": x})
        (got,) = prog(torch.from_numpy(x))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        if not with_bias:
            case["bias"] = None
        np.testing.assert_allclose(got.numpy(), np.maximum(oracle(torch.from_numpy(x), case), 0), rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("flag", [False, True])
def test_lowering_hands_fp8_large_m_to_the_op(flag):
    """`lower_onnx(fp8_large_m=...)` reaches the op call that engines export (`qcompile build --fp8-large-m`)."""
    from qcompile.lowering import lower_onnx

    case = make_case(k=128, n=40, group=32, seed=7)
    prog = lower_onnx(_onnx_model(case, True, False, True, 128, 40), fp8_large_m=flag)
    got = exported_op_arg(prog, torch.randn(2, 3, 128), torch.ops.qcompile.int4_groupwise_gemm, "fp8_large_m")
    assert got is flag


def test_node_helpers_validate():
    with pytest.raises(ValueError):
        onnx_schema.make_node("n", ["x", "w"], ["y"], block_size=32)
    node = onnx_schema.make_node("n", ["x", "w", "s"], ["y"], block_size=64)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"block_size": 64, "plugin_version": b"1", "plugin_namespace": b"qcompile"}
    assert node.domain == "qcompile" and node.op_type == "Int4GroupwiseGemm"


# ---------------------------------------------------------------- export

class Int4Linear(torch.nn.Module):
    def __init__(self, device="cpu", k=256, n=48, group=64, zero=True, seed=3):
        super().__init__()
        self.case = make_case(k=k, n=n, group=group, zero=zero, seed=seed)
        for name in ("w_packed", "scale", "w_zero", "bias"):
            self.register_buffer(name, None if self.case[name] is None else self.case[name].to(device))
        self.g = self.case["g"]

    def forward(self, x):
        return torch.ops.qcompile.int4_groupwise_gemm(x, self.w_packed, self.scale, self.w_zero, self.bias, self.g)


def _export(mod, x):
    torch._dynamo.reset()  # as compiler/engine/build.py does before its export
    rows = torch.export.Dim("rows", min=1, max=4096)
    return torch.export.export(mod, (x,), dynamic_shapes={"x": {0: rows}})


def test_export_with_dynamic_rows_keeps_the_op():
    mod = Int4Linear()
    ep = _export(mod, torch.randn(5, 256))
    calls = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.qcompile.int4_groupwise_gemm.default]
    for m in (1, 3, 17, 40):
        x = torch.randn(m, 256)
        assert_close_to(ep.module()(x), oracle(x, mod.case), 1e-5)


@needs_triton
def test_gpu_body_dispatch_traces_with_dynamic_rows(monkeypatch):
    """The CUDA body's M dispatch (a chain of torch.cond on a symbolic M, no guard) exported with a dynamic
    M, the kernel launches replaced by torch stand-ins, so it runs on CPU. Each bucket adds its own marker to
    the output, so the test sees which bucket ran for each M."""
    from qcompile.plugins.int4_gemm import gemv, kernel
    from qcompile.plugins.int4_gemm.reference import dequantize_weight

    def gemv_stand_in(x2d, w_packed, w_scale, w_zero, g, cfg, **_):
        return x2d.float() @ dequantize_weight(w_packed, w_scale, w_zero, g)

    def mm(x2d, w_packed, w_scale, w_zero, g, cfg, out_dtype=torch.float32, **_):
        return (x2d.float() @ dequantize_weight(w_packed, w_scale, w_zero, g)).to(out_dtype)

    def dequant(w_packed, w_scale, w_zero, g, dtype, **_):
        return dequantize_weight(w_packed, w_scale, w_zero, g, dtype)

    buckets = [cfg for _, cfg in kernel.CONFIGS]
    assert all(a != b for i, a in enumerate(buckets) for b in buckets[i + 1:])  # a marker per bucket
    run_bucket = kernel.run_bucket

    def marked_bucket(cfg, *args, **kwargs):  # run_bucket calls itself for fallbacks: mark the buckets only
        # by equality: inside nested torch.cond branches dynamo does not keep the dicts' identity
        marker = next((1000.0 * (i + 1) for i, c in enumerate(buckets) if c == cfg), 0.0)
        return run_bucket(cfg, *args, **kwargs) + marker

    monkeypatch.setattr(gemv, "launch_gemv", gemv_stand_in)
    monkeypatch.setattr(kernel, "launch_mm", mm)
    monkeypatch.setattr(kernel, "launch_dequant", dequant)
    monkeypatch.setattr(kernel, "run_bucket", marked_bucket)
    mod = Int4Linear()

    class Body(torch.nn.Module):
        def forward(self, x):
            return kernel.int4_gemm_triton(x, mod.w_packed, mod.scale, mod.w_zero, mod.bias, mod.g)

    rows = torch.export.Dim("rows", min=1, max=4096)
    ep = torch.export.export(Body(), (torch.randn(5, 256),), dynamic_shapes=({0: rows},))
    reached = set()
    for m in (1, 2, 16, 17, 64, 65, 128, 129, 300):
        x = torch.randn(m, 256)
        bucket = next(i for i, (limit, _) in enumerate(kernel.CONFIGS) if limit is None or m <= limit)
        reached.add(bucket)
        assert_close_to(ep.module()(x) - 1000.0 * (bucket + 1), oracle(x, mod.case), 1e-5)
    assert len(reached) == len(kernel.CONFIGS)  # every bucket was reached


@fake_cuda_export
@pytest.mark.parametrize("configs", ["shipped", "pointer-tiles", "all-finished", "unfinished"])
def test_gpu_launches_export_on_fake_cuda_tensors(monkeypatch, configs):
    """The CUDA body as an engine's export traces it, without a GPU (`export_on_fake_cuda`): every bucket's launch
    code must trace inside torch.cond (reading x's storage_offset there broke the H200 export of the TMA tiles),
    and with a concrete M outside it (where the host descriptors cannot be captured). A wide layer, so the
    shipped TMA tiles take the 16- and 64-row buckets in their torch.cond branches, and a concrete M keeps the
    pointer loads (`kernel.pointer_tiles`: none anywhere). As shipped the 16- and 64-row one-dot buckets trace with
    the cast and bias in their kernels, the 128-row one and the GEMV without; "all-finished" and "unfinished"
    (`kernel.finished`, engine variants) all or none."""
    from qcompile.plugins.int4_gemm import gemv, kernel, one_dot

    tma = configs != "pointer-tiles"
    if not tma:
        monkeypatch.setattr(kernel, "CONFIGS", kernel.pointer_tiles())
    if configs in ("all-finished", "unfinished"):
        monkeypatch.setattr(kernel, "CONFIGS", kernel.finished(kernel.CONFIGS, finish=configs == "all-finished"))
    expect_launch_keyword(monkeypatch, gemv, "launch_gemv", "out_dtype", configs == "all-finished")
    expect_launch_keyword(monkeypatch, one_dot, "launch", "finish",
                          {"all-finished": True, "unfinished": False}.get(configs, up_to_64_rows))
    case = make_case(k=512, n=16384, group=128, zero=True)
    for dynamic_rows in (True, False):  # a concrete M: one bucket, no torch.cond, so no Dynamo (pointer loads)
        expect_tma(monkeypatch, lambda cfg: tma and "tma" in cfg and dynamic_rows)
        assert export_on_fake_cuda(monkeypatch, torch.ops.qcompile.int4_groupwise_gemm, op_args(case, None)[1:],
                                   torch.randn(4, 512).to(torch.bfloat16), dynamic_rows) == \
            [torch.ops.qcompile.int4_groupwise_gemm.default]


@fake_cuda_export
def test_engine_shaped_x_reaches_the_buckets_as_rows_of_plain_stride(monkeypatch):
    """x [batch, seq, K] with both dims dynamic and seq from 1, as an engine's: the rows handed to the M buckets
    have the stride K as a plain int (a reshape's was Min(K, K * seq), which AOTInductor wrote into the TMA
    descriptors of its C++ wrapper verbatim: the build failed), and the wide layer's 16- and 64-row buckets still
    take the TMA tiles."""
    from qcompile.plugins import gemm_dispatch

    strides = []
    chain = gemm_dispatch._cond_chain

    def recording_chain(m, buckets, operands):
        if not torch.compiler.is_dynamo_compiling():  # the outer call; the rest of the chain runs in its branches
            strides.append(operands[0].stride())
        return chain(m, buckets, operands)

    monkeypatch.setattr(gemm_dispatch, "_cond_chain", recording_chain)
    expect_tma(monkeypatch, lambda cfg: "tma" in cfg)
    case = make_case(k=512, n=16384, group=128, zero=True)
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=1, max=512)}
    targets = export_on_fake_cuda(monkeypatch, torch.ops.qcompile.int4_groupwise_gemm, op_args(case, None)[1:],
                                  torch.randn(2, 8, 512).to(torch.bfloat16), dims=dims)
    assert targets == [torch.ops.qcompile.int4_groupwise_gemm.default]
    assert strides and all(s == (512, 1) and all(type(v) is int for v in s) for s in strides), strides


@pytest.mark.slow
def test_aoti_cpu_package_runs(tmp_path):
    mod = Int4Linear()
    ep = _export(mod, torch.randn(4, 256))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "i4.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for m in (1, 33):
        x = torch.randn(m, 256)
        assert_close_to(compiled(x), oracle(x, mod.case), 1e-5)


# ---------------------------------------------------------------- Triton kernels under the CPU interpreter

INTERP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # the interpreter's bf16 tl.dot is broken


SMALL = {"kernel": "mm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2,
         "GROUP_M": 1}


@triton_interp
@pytest.mark.parametrize("group", [32, 128, "channel"])
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_tile_kernel_interpreter(group, zero, dtype, m):
    """The tiled kernel, split-K (atomics) and not, scale on the partial products and on the weights."""
    from qcompile.plugins.int4_gemm import kernel

    k, n = 384, 80  # 3 K steps (a partial last split), a partial N tile
    case = make_case(k=k, n=n, group=group, zero=zero, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(INTERP_DTYPES[dtype])
    ref = oracle(x, {**case, "bias": None})
    for kind, unpack, waves, scale_acc in (("mm", False, 0, True), ("mm", False, 4, False), ("mm", True, 4, True),
                                           ("mm_t", False, 0, True), ("mm_t", False, 4, False)):
        cfg = {**SMALL, "kernel": kind, "UNPACK": unpack, "waves": waves, "SCALE_ACC": scale_acc}
        acc = kernel.launch_mm(x, case["w_packed"], case["scale"], case["w_zero"], case["g"], cfg, num_sms=1)
        assert acc.shape == (m, n)
        assert_close_to(acc.float(), ref, 1e-5 if dtype == "fp32" else 2e-3)


DEQUANT_CASES = pytest.mark.parametrize(
    "group, tile", [(32, None), (128, None), (128, dict(BLOCK_KW=16, BLOCK_N=64, num_warps=4)),
                    (256, dict(BLOCK_KW=4, BLOCK_N=128, num_warps=2))],
    ids=["g32-rows", "g128-aligned", "g128-aligned-tall", "perchannel-aligned"])


def check_dequant_exact(zero, group, tile, dtypes, device="cpu"):
    """Every tile shape, group-aligned (one scale row per tile) or not (a scale row per K row): bit-exact vs
    the reference's float32 dequantization rounded to each dtype."""
    from qcompile.plugins.int4_gemm import kernel
    from qcompile.plugins.int4_gemm.reference import dequantize_weight

    case = make_case(k=256, n=200, group=group, zero=zero)
    want32 = dequantize_weight(case["w_packed"], case["scale"], case["w_zero"], group)
    args = [t.to(device) if t is not None else None for t in (case["w_packed"], case["scale"], case["w_zero"])]
    for dtype in dtypes:
        got = kernel.launch_dequant(*args, group, dtype, cfg=tile)
        assert got.dtype == dtype and torch.equal(got.cpu(), want32.to(dtype))


@triton_interp
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@DEQUANT_CASES
def test_dequant_kernel_interpreter_is_exact(zero, group, tile):
    check_dequant_exact(zero, group, tile, [torch.float32])  # the interpreter truncates float32 -> bf16


@triton_interp
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
def test_dequant_kernel_of_a_column_slice_interpreter(zero):
    """A column slice of the weight (words, scales and zero points as views of the wider tensors: the
    chunked dequantize + cuBLAS candidate of tools/bench_dequant.py) dequantizes to the slice of the whole."""
    from qcompile.plugins.int4_gemm import kernel
    from qcompile.plugins.int4_gemm.reference import dequantize_weight

    case = make_case(k=256, n=200, group=64, zero=zero)
    whole = dequantize_weight(case["w_packed"], case["scale"], case["w_zero"], 64)
    cols = slice(48, 176)
    parts = [t[:, cols] if t is not None else None for t in (case["w_packed"], case["scale"], case["w_zero"])]
    got = kernel.launch_dequant(*parts, 64, torch.float32)
    assert torch.equal(got, whole[:, cols])
    with pytest.raises(ValueError, match="one stride"):
        kernel.launch_dequant(parts[0], case["scale"][:, cols].contiguous(), None, 64, torch.float32)


@triton_interp
@pytest.mark.parametrize("m", [1, 17, 100])
@pytest.mark.parametrize("group", [64, 8], ids=["g64", "g8"])  # g8: not a multiple of 16, no GEMV / mm_t step
def test_triton_path_interpreter(m, group, monkeypatch):
    """The op's Triton path, one M per bucket below dequantize + cuBLAS: 17 and 100 rows with 64-K groups run
    the one-dot kernel (64- and 128-row tiles), 8-K groups its fallback."""
    from qcompile.plugins.int4_gemm import kernel, one_dot

    calls, real = [], one_dot.launch
    monkeypatch.setattr(one_dot, "launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    case = make_case(k=256, n=48, group=group, zero=True, seed=m)
    x = torch.randn(1, m, 256, dtype=torch.float16)  # M = m rows: m = 1 is the GEMV bucket
    y = kernel.int4_gemm_triton(*op_args(case, x))
    assert y.dtype == torch.float16 and y.shape == (1, m, 48)
    assert_close_to(y, oracle(x, case), 3e-3)
    assert len(calls) == (1 if m > 16 and group == 64 else 0)


@triton_interp
@pytest.mark.parametrize("configs", ["shipped", "finished"])
@pytest.mark.parametrize("rows, dtype", [(1, torch.float16), (1, torch.float32), (16, torch.float16)])
def test_triton_path_finished_in_the_kernel_interpreter(rows, dtype, configs, monkeypatch):
    """The op's 1- and 16-row buckets finishing in the kernel, called eagerly: as shipped (the one-dot buckets set
    "finish"; the GEMV sets nothing, so it finishes in eager calls and not in engines) and with "finish" set on
    every bucket (`kernel.finished`, an engine variant of `tools/bench_engines.py`). The GEMV / one-dot launch gets
    the bias and x's dtype, and the result is the unfinished buckets' (fp32 sums, then the cast and bias), bit for
    bit (fp16 and fp32: the interpreter rounds those as the GPU does), and float64's within rounding; W4A8 (FP8 x,
    its row scale after the GEMM) too."""
    from qcompile.plugins.int4_gemm import gemv, kernel, one_dot

    calls = []
    for module, name in ((gemv, "launch_gemv"), (one_dot, "launch")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **kw: calls.append(kw.get("bias") is not None) or
                            real(*a, **kw))
    case = make_case(k=1024, n=200, group=128, zero=True, seed=3)
    x = torch.randn(1, rows, 1024, dtype=dtype)
    split = dict(num_sms=4)  # 4 tiles of either kernel on 4 SMs: K split in 16 (GEMV) and in 4 (one-dot)
    finishing = kernel.finished(kernel.CONFIGS) if configs == "finished" else kernel.CONFIGS
    y = kernel.int4_gemm_triton(*op_args(case, x), configs=finishing, **split)
    assert calls == [True]  # one launch, given the bias
    unfinished = kernel.finished(kernel.CONFIGS, finish=False)
    torch.testing.assert_close(y, kernel.int4_gemm_triton(*op_args(case, x), configs=unfinished, **split),
                               rtol=0, atol=0)
    assert_close_to(y, oracle(x, case), 3e-3)
    xq, row_scale = x.reshape(rows, 1024).to(torch.float8_e4m3fn), torch.full((rows,), 0.5)
    w4a8 = op_args(case, xq)[1:]
    y8 = kernel.int4_gemm_triton(xq, *w4a8, x_row_scale=row_scale, out_dtype=dtype, configs=finishing, **split)
    torch.testing.assert_close(y8, kernel.int4_gemm_triton(xq, *w4a8, x_row_scale=row_scale, out_dtype=dtype,
                                                           configs=unfinished, **split), rtol=0, atol=0)
    assert_close_to(y8, oracle(xq.float() * 0.5, case), 3e-3)


ONE_DOT_SHAPES = pytest.mark.parametrize(
    "k, group", [(1024, 64), (1024, 128), (1024, "channel"), (320, 64), (320, "channel")],
    ids=["128steps-g64", "128steps-g128", "128steps-channel", "64steps-g64", "64steps-channel"])


def check_one_dot(k, group, zero, dtype, rel, device="cpu"):
    """The one-dot kernel on planar words: 128-K steps and 64-K steps, a partial N tile (n = 80) or whole tiles
    (n = 96: the unmasked loads when K is not split unevenly), a partial M tile, split K (atomics; 320 = 2
    splits of 3 64-K steps, the last one past K; by `waves` and by the `resident` rule) and not, the scale on the
    product and on the weight tile (forced for 64-K groups in 128-K steps), loads through pointers and through
    TMA descriptors (n = 96, 64-wide tiles: zero fill past M, N and K; n = 80 is not a multiple of the words'
    32-wide TMA rows, so it keeps the pointers). Float64-close; with the cast and bias in the kernel (`finish`)
    as the fp32 result followed by the op's epilogue (`assert_finished_like`)."""
    from qcompile.plugins.gemm_dispatch import split_for_waves
    from qcompile.plugins.int4_gemm import one_dot

    for n, m in ((80, 3), (80, 17), (96, 5)):
        case = make_case(k=k, n=n, group=group, zero=zero, seed=k)
        weights = [t.to(device) if t is not None else None for t in (case["w_packed"], case["scale"], case["w_zero"])]
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        ref = oracle(x, {**case, "bias": None})
        bias = case["bias"].to(dtype).to(device)
        step = 128 if k % 128 == 0 else 64
        assert split_for_waves(k, -(-n // 32), step, 16, 1)[0] > 1  # waves = 16 splits K
        assert split_for_waves(k, -(-n // 32), step, 0, 1, 2)[0] == 2  # 3 tiles on 2 resident slots: split in two
        tma = {"min_n": 0, "interpret": True, "BLOCK_N": 64}  # the TMA loads on any N, in the CPU interpreter
        for waves, resident, scale_w, tma in ((0, 0, False, None), (16, 0, False, None), (16, 0, True, None),
                                              (0, 0, True, None), (0, 2, False, None), (0, 0, "unsplit", None),
                                              (16, 0, "unsplit", None), (16, 0, False, tma), (0, 0, True, tma)):
            cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "waves": waves, "resident": resident,
                   "SCALE_W": scale_w, "tma": tma}
            assert one_dot.use_tma(cfg, x.to(device), n, on_cpu=device == "cpu") == (tma is not None and n == 96)
            y = one_dot.launch(x.to(device), *weights, case["g"], cfg, asm=device != "cpu", out_dtype=torch.float32,
                               num_sms=1)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert_close_to(y, ref, rel)
            if scale_w is False:  # the cast and bias in the kernel (`finish`), K split and not
                y_out = one_dot.launch(x.to(device), *weights, case["g"], cfg, asm=device != "cpu", out_dtype=dtype,
                                       bias=bias, finish=True, num_sms=1)
                assert_finished_like(y_out, y, bias, dtype, exact=device == "cpu")


@triton_interp
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@ONE_DOT_SHAPES
def test_one_dot_kernel_interpreter(k, group, zero):
    check_one_dot(k, group, zero, torch.float16, 2e-3)  # fp16: the interpreter's bf16 dot is broken


@needs_triton
def test_one_dot_rejects_a_sequential_layout():
    from qcompile.plugins.int4_gemm import one_dot

    case = make_case(k=256, n=48, group=32)
    x = torch.randn(2, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match="group 32"):
        one_dot.launch(x, case["w_packed"], case["scale"], None, 32, CONFIG_ONE_DOT, asm=False)


@needs_triton
def test_one_dot_scale_on_weight_only_when_k_is_not_split():
    """SCALE_W = "unsplit" (the 64-row bucket) puts the scale on the weight tile for one K split only; a group
    shorter than the step forces it; a typo in a configuration is an error, not silently False."""
    from qcompile.plugins.int4_gemm import one_dot

    assert one_dot.scale_on_weight("unsplit", 1, 128, 128) is True
    assert one_dot.scale_on_weight("unsplit", 2, 128, 128) is False
    assert one_dot.scale_on_weight(False, 1, 64, 128) is True  # 64-K groups in 128-K steps
    assert one_dot.scale_on_weight(True, 4, 128, 128) is True
    with pytest.raises(ValueError, match="SCALE_W"):
        one_dot.scale_on_weight("unsplt", 1, 128, 128)


@needs_triton
def test_one_dot_takes_tma_only_where_it_paid_and_can_load(monkeypatch):
    """TMA from the bucket's min_n on, for x rows that are 16-byte aligned and contiguous along K (else the
    pointer loads); never for CPU tensors unless a test asks (the interpreter); while torch traces, only under
    Dynamo (which captures the host descriptors)."""
    from qcompile.plugins.int4_gemm import one_dot

    cfg = {"tma": {"min_n": 8192}}
    x = torch.zeros(4, 4096, dtype=torch.bfloat16, device="meta")
    assert one_dot.use_tma(cfg, x, 8192, on_cpu=False)
    assert not one_dot.use_tma(cfg, x, 4096, on_cpu=False)  # narrower than min_n
    deep = {"tma": {"min_n": 0, "min_k": 8192}}  # K from x's row length
    assert one_dot.use_tma(deep, torch.zeros(4, 8192, dtype=torch.bfloat16, device="meta"), 64, on_cpu=False)
    assert not one_dot.use_tma(deep, x, 64, on_cpu=False)  # shallower than min_k
    assert not one_dot.use_tma({}, x, 8192, on_cpu=False)  # the bucket has no TMA tile
    assert not one_dot.use_tma(cfg, x, 8190, on_cpu=False)  # weight rows of 8190 words: not 16-byte multiples
    assert not one_dot.use_tma(cfg, x, 8200, on_cpu=False)  # nor rows of whole 32-word (128-byte) boxes
    assert not one_dot.use_tma(cfg, torch.zeros(4, 4100, dtype=torch.bfloat16, device="meta")[:, 1:4097], 8192,
                               on_cpu=False)  # a view starting 2 bytes in
    assert not one_dot.use_tma(cfg, x.t().contiguous().t(), 8192, on_cpu=False)  # K not contiguous
    assert not one_dot.use_tma(cfg, x, 8192, on_cpu=True)
    assert one_dot.use_tma({"tma": {"min_n": 0, "interpret": True}}, x, 64, on_cpu=True)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # traced: only by Dynamo (torch.cond's tracing), which captures host descriptors
        fake = torch.empty(4, 4096, dtype=torch.bfloat16, device="cuda")
        assert not one_dot.use_tma(cfg, fake, 8192, on_cpu=False)
        with monkeypatch.context() as dynamo:
            dynamo.setattr(torch.compiler, "is_dynamo_compiling", lambda: True)
            assert one_dot.use_tma(cfg, fake, 8192, on_cpu=False)
    from qcompile.plugins.int4_gemm import kernel  # the TMA tiles are on one-dot buckets, and only there
    assert {limit: c["tma"] for limit, c in kernel.CONFIGS if "tma" in c} == kernel.TMA_TILES
    assert all(c["kernel"] == "one_dot" for limit, c in kernel.CONFIGS if limit in kernel.TMA_TILES)
    assert not any("tma" in c for _, c in kernel.pointer_tiles())


@needs_triton
def test_tma_descriptor_rows_are_one_swizzle_wide():
    """Every TMA descriptor of the shipped TMA tiles has rows of exactly 128 bytes. AOTInductor's wrapper
    (torch 2.11 to 2.14) encodes a host descriptor's whole block as one box with the 128-byte swizzle, and the
    driver refuses that swizzle on wider rows; Triton's own launcher copies a wider block in 128-byte columns,
    so only an engine would fail."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from qcompile.plugins.int4_gemm import kernel, one_dot

    case = make_case(k=1024, n=256, group=128, zero=False, seed=0)
    for limit, cfg in kernel.CONFIGS:
        if "tma" not in cfg:
            continue
        launched = []

        class Recorded:  # `wrap(kernel)[grid](*args, **constexprs)`: keeps the arguments, runs nothing
            def __getitem__(self, grid):
                return lambda *args, **constexprs: launched.extend(args)
        cfg = dict(cfg, tma=dict(cfg["tma"], min_n=0, interpret=True))
        one_dot.launch(torch.zeros(limit, 1024, dtype=torch.bfloat16), case["w_packed"], case["scale"], None, 128,
                       cfg, asm=False, wrap=lambda kernel: Recorded())
        descriptors = [a for a in launched if isinstance(a, TensorDescriptor)]
        assert len(descriptors) == 2, f"bucket {limit}: expected the x and weight descriptors"
        for d in descriptors:
            assert d.block_shape[-1] * d.base.element_size() == 128, (limit, d.block_shape, d.base.dtype)


CONFIG_ONE_DOT = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "waves": 0}


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 100, 128, 300])
def test_cuda_matches_reference(group, zero, dtype, m):
    case = make_case(k=512, n=320, group=group, zero=zero, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(DTYPES[dtype])
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in op_args(case, x)]
    y = torch.ops.qcompile.int4_groupwise_gemm(*args)
    assert y.dtype == DTYPES[dtype] and y.device.type == "cuda"
    assert_close_to(y, oracle(x, case), {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[DTYPES[dtype]])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("group", [64, 128, "channel"])
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("m", [5, 16, 40, 64])
def test_cuda_wide_layers_take_the_tma_tiles(group, zero, m):
    """N = 16384, at least the TMA tiles' min_n: the op (`kernel.TMA_TILES` on its buckets) loads through TMA
    descriptors (their zero fill past M and past a split's end, zero points, per-channel scales), bf16 against
    float64."""
    from qcompile.plugins.gemm_dispatch import bucket_for
    from qcompile.plugins.int4_gemm import kernel, one_dot

    case = make_case(k=1024, n=16384, group=group, zero=zero, seed=m)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    assert one_dot.use_tma(bucket_for(kernel.CONFIGS, m), x.cuda(), 16384, on_cpu=False)
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in op_args(case, x)]
    assert_close_to(torch.ops.qcompile.int4_groupwise_gemm(*args), oracle(x, case), REL[torch.bfloat16])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@ONE_DOT_SHAPES
def test_cuda_one_dot_kernel(k, group, zero, dtype):
    """The LOP3 PTX and wgmma on the H200 (SCALE_W rounds q * s to x's dtype: bf16's 2^-9)."""
    check_one_dot(k, group, zero, dtype, 3e-3 if dtype == torch.float16 else 1.5e-2, device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("zero", [False, True], ids=["sym", "zp"])
@DEQUANT_CASES
def test_cuda_dequant_kernel_is_exact(zero, group, tile):
    check_dequant_exact(zero, group, tile, [torch.float32, torch.bfloat16, torch.float16], "cuda")


@pytest.mark.gpu
@pytest.mark.slow
@cuda
def test_cuda_aoti_package_with_batch_and_sequence_dims_on_a_tma_layer(tmp_path):
    """x [batch, seq, K] with both dims dynamic and seq from 1, as every engine's x, on a layer wide enough for the
    TMA tiles (N = 8192): the package compiles (the rows' stride was Min(K, K * seq), which AOTInductor wrote
    verbatim into C++: "'Min' was not declared") and every bucket matches the float64 oracle."""
    mod = Int4Linear(device="cuda", k=512, n=8192, group=128).cuda()
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=512)
    torch._dynamo.reset()
    ep = torch.export.export(mod, (torch.randn(2, 8, 512, device="cuda", dtype=torch.bfloat16),),
                             dynamic_shapes={"x": {0: batch, 1: seq}})
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "i4_bs.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for b, s in ((1, 1), (2, 5), (4, 4), (3, 20), (2, 150)):  # rows 1, 10, 16, 60, 300: every bucket
        x = torch.randn(b, s, 512, device="cuda", dtype=torch.bfloat16)
        got = compiled(x)
        assert got.shape == (b, s, 8192)
        assert_close_to(got.reshape(b * s, -1), oracle(x.reshape(b * s, -1).cpu(), mod.case), REL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.slow
@cuda
@pytest.mark.parametrize("dtype, n, finish", [(torch.float32, 256, None), (torch.float16, 256, None),
                                              (torch.bfloat16, 16384, None), (torch.bfloat16, 16384, True),
                                              (torch.bfloat16, 16384, False)],
                         ids=["fp32", "fp16", "bf16-wide", "bf16-wide-finished", "bf16-wide-unfinished"])
def test_cuda_aoti_package_dynamic_rows(tmp_path, monkeypatch, dtype, n, finish):
    """fp16 x: the GEMV's packed-half2 PTX compiled into the package; N = 16384: the TMA tiles (`kernel.TMA_TILES`
    on the 16- and 64-row buckets), whose host-made descriptors AOTInductor's wrapper makes per call (captured by
    Dynamo in the M buckets' torch.cond; test_gpu_launches_export_on_fake_cuda_tensors checks they are taken).
    The 16- and 64-row buckets write the cast and bias in their kernels as shipped; `finish` (`kernel.finished`):
    the GEMV and every one-dot bucket do (True) or none does (False)."""
    from qcompile.plugins.int4_gemm import kernel

    if finish is not None:
        monkeypatch.setattr(kernel, "CONFIGS", kernel.finished(kernel.CONFIGS, finish=finish))
    mod = Int4Linear(device="cuda", k=512, n=n, group=128).cuda()
    ep = _export(mod, torch.randn(4, 512, device="cuda", dtype=dtype))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "i4.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for m in (1, 7, 16, 17, 100, 300):  # every bucket: GEMV, 16 / 64 / 128-row one-dot tiles, dequantize + cuBLAS
        x = torch.randn(m, 512, device="cuda", dtype=dtype)
        assert_close_to(compiled(x), oracle(x.cpu(), mod.case), REL[dtype] if dtype != torch.float32 else 1e-4)
