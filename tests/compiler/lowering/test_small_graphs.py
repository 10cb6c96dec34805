"""Small hand-built graphs through the lowering, against ONNX Runtime (optimizations off) and
onnx.reference.ReferenceEvaluator on fresh random data; program API and error behaviour."""
import zlib

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qc_testutil import ort_session
from qcompile.errors import LoweringError
from qcompile.lowering import OnnxProgram, lower_onnx

HEADER = '<ir_version: 10, opset_import: ["" : 21]>'

GRAPHS = {
    "elementwise": """g (float[2,3,4] x, float[4] y) => (float[2,3,4] z) {
        a = Add(x, y)
        b = Mul(a, x)
        c = Div(b, y)
        d = Sigmoid(c)
        e = Gelu <approximate = "tanh"> (d)
        lo = Constant <value = float {-0.25}> ()
        hi = Constant <value = float {0.75}> ()
        f = Clip(e, lo, hi)
        gt = Greater(x, y)
        ab = Abs(x)
        ng = Neg(ab)
        h = Where(gt, e, ng)
        ah = Abs(h)
        half = Constant <value = float {0.5}> ()
        ahp = Add(ah, half)
        sq = Sqrt(ahp)
        th = Tanh(f)
        z = Sub(sq, th)
    }""",
    "reductions": """g (float[2,3,5] x) => (float[2,1,5] a, float[3] b, float[2,3,1] c, int64[2,5] d, float[2,3,5] e) {
        one = Constant <value = int64[1] {1}> ()
        a = ReduceMean(x, one)
        ax = Constant <value = int64[2] {0, 2}> ()
        b = ReduceSum <keepdims = 0> (x, ax)
        last = Constant <value = int64[1] {-1}> ()
        c = ReduceMax(x, last)
        d = ArgMax <axis = 1, keepdims = 0> (x)
        e = Softmax <axis = -1> (x)
    }""",
    "shape_math": """g (float[N,S,8] x) => (float[N,S,2,4] y, float[N,S,4] s, float[N,8,S] t) {
        shp = Shape(x)
        idx = Constant <value = int64[2] {0, 1}> ()
        n = Gather <axis = 0> (shp, idx)
        tail = Constant <value = int64[2] {2, 4}> ()
        newshape = Concat <axis = 0> (n, tail)
        y = Reshape(x, newshape)
        st = Constant <value = int64[1] {6}> ()
        en = Constant <value = int64[1] {-9223372036854775807}> ()
        ax = Constant <value = int64[1] {2}> ()
        stp = Constant <value = int64[1] {-2}> ()
        s = Slice(x, st, en, ax, stp)
        t = Transpose <perm = [0, 2, 1]> (x)
    }""",
    "gemm_conv": """g (float[2,6] a, float[1,4,7,7] img) => (float[2,5] y, float[1,4,4,4] c, float[1,4,3,3] p) {
        y = Gemm <alpha = 0.5, beta = 2.0, transB = 1> (a, w, bias)
        c = Conv <group = 2, strides = [2, 2], pads = [1, 1, 2, 2]> (img, k)
        p = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (img)
    }""",
}

INITS = {"w": (5, 6), "bias": (5,), "k": (4, 2, 3, 3)}


def _model(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + text)
    rng = np.random.default_rng(0)
    used = {i for n in model.graph.node for i in n.input}
    for name, shape in INITS.items():
        if name in used:
            model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model, rng, dims=None):
    dims = dims or {"N": 3, "S": 5}
    feeds = {}
    for v in model.graph.input:
        shape = [d.dim_value or dims[d.dim_param] for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_small_graph_matches_ort_and_reference(name):
    model = _model(GRAPHS[name])
    feeds = _feeds(model, np.random.default_rng(zlib.crc32(name.encode())))
    program = lower_onnx(model)
    got = program(*[torch.from_numpy(feeds[n]) for n in program.input_names])
    assert isinstance(got, tuple) and len(got) == len(program.output_names)
    want_ort = ort_session(model).run(None, feeds)
    want_ref = ReferenceEvaluator(model).run(None, feeds)
    for g, wo, wr in zip(got, want_ort, want_ref):
        assert g.shape == wo.shape and g.numpy().dtype == wo.dtype
        np.testing.assert_allclose(g.numpy(), wo, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.numpy(), wr, rtol=1e-5, atol=1e-5)


def _qdq_model(zero_type, axis, block, opset=21):
    """x -> Q -> DQ on a [4, 8] input with per-tensor, per-axis or blocked scales."""
    scale_shape = [] if axis is None else [4] if axis == 0 and not block else [4, 8 // block]
    rng = np.random.default_rng(0)
    scale = (rng.random(scale_shape) * 0.1 + 0.01).astype(np.float32)
    n = int(np.prod(scale_shape))
    zp_values = [0] * n if zero_type == TensorProto.FLOAT8E4M3FN else rng.integers(0, 3, n).tolist()
    zp = helper.make_tensor("zp", zero_type, scale_shape, zp_values)
    attrs = ({"axis": axis} if axis is not None else {}) | ({"block_size": block} if block else {})
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(scale, "s"), zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("zero_type, axis, block", [
    (TensorProto.INT8, None, 0), (TensorProto.UINT8, 0, 0), (TensorProto.INT8, 1, 4), (TensorProto.INT4, 1, 4),
    (TensorProto.UINT4, 1, 2), (TensorProto.INT4, 0, 0), (TensorProto.FLOAT8E4M3FN, None, 0),
    (TensorProto.FLOAT8E4M3FN, 0, 0)])
def test_qdq_matches_reference_and_ort(zero_type, axis, block):
    model = _qdq_model(zero_type, axis, block)
    onnx.checker.check_model(model, full_check=True)
    x = (np.random.default_rng(11).standard_normal((4, 8)) * 0.8).astype(np.float32)
    x[0, 0], x[1, 1] = 1e3, -1e3  # saturate
    got = lower_onnx(model)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, ort_session(model).run(None, {"x": x})[0], rtol=0, atol=1e-6)


def test_quantize_rounds_half_to_even_and_saturates():
    model = _qdq_model(TensorProto.INT8, None, 0)
    scale = float(numpy_helper.to_array(model.graph.initializer[0]))
    model.graph.node.pop()  # keep only Q: output the int8 tensor
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("q", TensorProto.INT8, [4, 8]))
    zp = int(numpy_helper.to_array(model.graph.initializer[1]))
    x = np.full((4, 8), 0.5, np.float32) * scale
    x[0, :6] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1e6]) * scale
    got = lower_onnx(model)(torch.from_numpy(x))[0].numpy()
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    assert got[0, 5] == 127 and got[1, 0] == zp  # saturated; 0.5 -> 0 (+ zero point)


def test_compute_dtype_runs_float_math_in_that_dtype():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    scale = np.full([16], 1e-6, np.float32)  # far below fp16's normal range: must stay float32
    wq = np.clip(np.round(w / 0.05), -127, 127).astype(np.int8)
    model = onnx.parser.parse_model(HEADER + """g (float[N,8] x) => (float[N,16] y, float[N,16] z) {
        h = MatMul(x, w)
        c = Cast <to = 1> (h)
        y = Relu(c)
        wd = DequantizeLinear <axis = 1> (wq, s)
        z = MatMul(x, wd)
    }""")
    model.graph.initializer.extend([numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
                                    numpy_helper.from_array(wq, "wq")])
    x = rng.standard_normal((3, 8)).astype(np.float32)
    program = lower_onnx(model, compute_dtype=torch.float16)
    outputs, captured = program.run({"x": torch.from_numpy(x)}, capture=["h", "c", "wd"])
    assert captured["h"].dtype == captured["c"].dtype == captured["wd"].dtype == torch.float16
    assert all(t.dtype == torch.float32 for t in outputs.values())  # declared output dtype
    want = ort_session(model).run(None, {"x": x})
    np.testing.assert_allclose(outputs["y"].numpy(), want[0], rtol=2e-3, atol=2e-2)
    # scales stay float32 (1e-6 is subnormal in fp16): the dequantized weights are not flushed to zero
    np.testing.assert_allclose(outputs["z"].numpy(), want[1], rtol=5e-3, atol=1e-7)


def test_capture_and_unknown_capture_name():
    model = _model(GRAPHS["elementwise"])
    feeds = {k: torch.from_numpy(v) for k, v in _feeds(model, np.random.default_rng(2)).items()}
    program = lower_onnx(model)
    outputs, captured = program.run(feeds, capture=["b", "x"])
    torch.testing.assert_close(captured["b"], (feeds["x"] + feeds["y"]) * feeds["x"])
    assert captured["x"] is not None and set(outputs) == {"z"}
    with pytest.raises(LoweringError, match="no_such_tensor"):
        program.run(feeds, capture=["no_such_tensor"])


def test_unsorted_graph_is_sorted():
    model = _model(GRAPHS["elementwise"])
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    feeds = _feeds(model, np.random.default_rng(3))
    got = lower_onnx(model)(*[torch.from_numpy(feeds[n]) for n in ("x", "y")])[0]
    np.testing.assert_allclose(got.numpy(), ReferenceEvaluator(_model(GRAPHS["elementwise"])).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-6)


def test_lower_from_path_and_buffers_move(tmp_path):
    model = _model(GRAPHS["gemm_conv"])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    program = lower_onnx(path)
    assert isinstance(program, OnnxProgram) and program.input_names == ["a", "img"]
    assert program.output_names == ["y", "c", "p"]
    assert any(b.dtype == torch.float32 and b.shape == (5, 6) for b in program.buffers())
    program.to(torch.float64)  # .to reaches the initializer buffers (device moves work the same way)
    assert all(b.dtype == torch.float64 for b in program.buffers() if b.is_floating_point())


def test_unsupported_op_names_node_op_domain_and_opset():
    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], name="my_tfidf", mode="TF", min_gram_length=1,
                            max_gram_length=1, max_skip_count=0, ngram_counts=[0], ngram_indexes=[0], pool_int64s=[3])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with pytest.raises(LoweringError) as info:
        lower_onnx(model)
    message = str(info.value)
    for needle in ("my_tfidf", "TfIdfVectorizer", "ai.onnx", "21", "register_converter"):
        assert needle in message


def test_custom_domain_op_without_converter_is_an_error():
    node = helper.make_node("Frobnicate", ["x"], ["y"], name="frob", domain="acme")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("acme", 3)],
                              ir_version=10)
    with pytest.raises(LoweringError, match=r"frob.*Frobnicate.*acme.*opset 3"):
        lower_onnx(model)


@pytest.mark.parametrize("data_type", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.BFLOAT16,
                                       TensorProto.FLOAT])
def test_initializers_from_raw_bytes_become_writable_tensors(monkeypatch, data_type):
    """numpy_helper views an initializer's raw_data read-only; torch.from_numpy of that warns (to the user, during
    every FP8 build) and would share an immutable buffer. Every array handed to torch must be writable, and the
    values are the bytes' values."""
    from qcompile.engine.load import to_torch
    from qcompile.lowering.interpreter import tensor_from_onnx

    seen = []
    real = torch.from_numpy

    def checked(array):
        seen.append(array.flags.writeable)
        return real(array)

    monkeypatch.setattr(torch, "from_numpy", checked)
    raw = bytes(np.random.default_rng(5).integers(0, 0x78, 16, dtype=np.uint8))  # finite in every type
    width = {TensorProto.BFLOAT16: 2, TensorProto.FLOAT: 4}.get(data_type, 1)
    tensor = helper.make_tensor("w", data_type, [16 // width], vals=raw, raw=True)
    assert not numpy_helper.to_array(tensor).flags.writeable  # the case this guards
    got = [tensor_from_onnx(tensor)]
    if data_type != TensorProto.FLOAT8E5M2:  # engine inputs: an input given as a read-only array
        got.append(to_torch(numpy_helper.to_array(tensor)))
    assert seen and all(seen)
    for t in got:
        assert t.contiguous().view(torch.uint8).numpy().tobytes() == raw
