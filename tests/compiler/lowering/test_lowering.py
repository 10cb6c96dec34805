"""The lowering on real exported graphs, against ONNX Runtime (optimizations off) on fresh data."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qc_testutil import ort_session
from qcompile.errors import LoweringError
from qcompile.frontend import load_source
from qcompile.lowering import lower_onnx


@pytest.fixture(scope="module")
def llama():
    return load_source("tiny-llama")


@pytest.fixture(scope="module")
def cnn():
    return load_source("small-cnn")


def _run(program, feeds):
    return program(*[torch.from_numpy(feeds[n]) for n in program.input_names])


@pytest.mark.parametrize("name, sizes", [("llama", {"batch": 3, "seq": 37}), ("cnn", {"batch": 5})])
def test_builtin_graphs_match_onnxruntime(request, name, sizes):
    src = request.getfixturevalue(name)
    feeds = src.random_inputs(np.random.default_rng(3), sizes)
    got = _run(lower_onnx(src.model), feeds)
    want = ort_session(src.model).run(src.output_names, feeds)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-4)


def test_export_with_dynamic_dims_runs_at_other_sizes(llama):
    program = lower_onnx(llama.model)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=512)
    example = torch.from_numpy(llama.example_inputs["input_ids"])
    with torch.fx.traceback.preserve_node_meta():
        ep = torch.export.export(program, (example,), dynamic_shapes=(({0: batch, 1: seq},),))
    annotated = [n for n in ep.graph.nodes if n.meta.get("custom", {}).get("onnx_node")]
    assert annotated, "aten nodes carry their ONNX node name"
    feeds = llama.random_inputs(np.random.default_rng(5), {"batch": 2, "seq": 23})
    got = ep.module()(torch.from_numpy(feeds["input_ids"]))[0]
    want = ort_session(llama.model).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_compute_dtype_float16(llama):
    feeds = llama.random_inputs(np.random.default_rng(8), {"batch": 2, "seq": 16})
    got = _run(lower_onnx(llama.model, compute_dtype=torch.float16), feeds)[0]
    want = ort_session(llama.model).run(["logits"], feeds)[0]
    assert got.dtype == torch.float32  # outputs keep their declared dtype
    cos = np.dot(got.numpy().ravel(), want.ravel()) / (np.linalg.norm(got.numpy()) * np.linalg.norm(want))
    assert cos > 0.999
    assert np.abs(got.numpy() - want).max() < 0.05


def test_capture_intermediate_tensors(cnn):
    feeds = cnn.random_inputs(np.random.default_rng(1), {"batch": 2})
    conv = next(n for n in cnn.model.graph.node if n.op_type == "Conv")
    program = lower_onnx(cnn.model)
    outputs, captured = program.run({k: torch.from_numpy(v) for k, v in feeds.items()}, capture=[conv.output[0]])
    exposed = onnx.ModelProto()
    exposed.CopyFrom(cnn.model)
    exposed.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, None))
    want = ort_session(exposed).run([conv.output[0]], feeds)[0]
    np.testing.assert_allclose(captured[conv.output[0]].numpy(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(LoweringError, match="no_such_tensor"):
        program.run({k: torch.from_numpy(v) for k, v in feeds.items()}, capture=["no_such_tensor"])


def _qdq_model(fmt_type, axis, block, zero_type):
    """x -> Q -> DQ with per-axis or blocked scales on a [4, 8] input."""
    scale_shape = [4] if axis == 0 and not block else [4, 8 // block] if block else []
    rng = np.random.default_rng(0)
    scale = (rng.random(scale_shape) * 0.1 + 0.01).astype(np.float32)
    zp = helper.make_tensor("zp", zero_type, scale_shape, np.zeros(int(np.prod(scale_shape)), np.int64).tolist()
                            if zero_type != TensorProto.FLOAT8E4M3FN else [0] * int(np.prod(scale_shape)))
    attrs = {"axis": axis} | ({"block_size": block} if block else {})
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(scale, "s"), zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("zero_type, axis, block", [
    (TensorProto.INT8, 0, 0), (TensorProto.UINT8, 0, 0), (TensorProto.INT4, 1, 4), (TensorProto.UINT4, 1, 2),
    (TensorProto.FLOAT8E4M3FN, 0, 0), (TensorProto.INT8, 1, 4)])
def test_qdq_matches_onnx_reference_evaluator(zero_type, axis, block):
    model = _qdq_model(None, axis, block, zero_type)
    onnx.checker.check_model(model, full_check=True)
    x = (np.random.default_rng(11).standard_normal((4, 8)) * 0.8).astype(np.float32)
    x[0, 0] = 1e3  # saturates
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = lower_onnx(model)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_unsupported_op_names_node_op_domain_and_opset():
    node = helper.make_node("STFT", ["x", "step"], ["y"], name="my_stft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(8, np.int64), "step")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with pytest.raises(LoweringError) as info:
        lower_onnx(model)
    message = str(info.value)
    for needle in ("my_stft", "STFT", "ai.onnx", "21"):
        assert needle in message
