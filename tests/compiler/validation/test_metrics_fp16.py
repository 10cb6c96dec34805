"""Error metrics against hand-derived values, and the FP16 reference graph against ONNX Runtime FP32."""
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import cosine, ort_session
from qcompile.validation.fp16 import to_float16
from qcompile.validation.metrics import compare_arrays, is_logits_like, merge_iterations


def test_metrics_on_fresh_random_data():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((4, 7, 11))
    noise = 0.01 * rng.standard_normal(ref.shape)
    m = compare_arrays(ref.astype(np.float32), (ref + noise).astype(np.float32), top1=True)
    ref32, got32 = ref.astype(np.float32).astype(np.float64), (ref + noise).astype(np.float32).astype(np.float64)
    err = got32 - ref32
    assert m["max_abs"] == pytest.approx(np.abs(err).max())
    assert m["mean_abs"] == pytest.approx(np.abs(err).mean())
    assert m["cosine"] == pytest.approx(cosine(ref32, got32), abs=1e-12)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10((ref32 ** 2).sum() / (err ** 2).sum()))
    assert m["top1"] == pytest.approx(np.mean(ref32.argmax(-1) == got32.argmax(-1)))
    assert 0.9 < m["top1"] <= 1.0


def test_metric_edge_cases():
    z = np.zeros((3, 4))
    assert compare_arrays(z, z)["cosine"] == 1.0 and compare_arrays(z, z)["sqnr_db"] == math.inf
    x = np.array([1.0, -2.0, 3.0])
    assert compare_arrays(x, -x)["cosine"] == pytest.approx(-1.0)
    assert compare_arrays(x, x)["sqnr_db"] == math.inf
    bad = compare_arrays(x, np.array([1.0, np.nan, 3.0]))
    assert math.isnan(bad["cosine"]) and math.isnan(bad["sqnr_db"])
    with pytest.raises(ValueError, match="shape"):
        compare_arrays(x, x[:2])
    # relative error has a floor: a zero in the reference does not make it infinite
    assert math.isfinite(compare_arrays(np.array([0.0, 1.0]), np.array([1e-3, 1.0]))["max_rel"])


def test_merge_takes_the_worst_iteration():
    a = compare_arrays(np.ones(4), np.ones(4) * 1.01)
    b = compare_arrays(np.arange(4.0), np.arange(4.0)[::-1].copy())
    merged = merge_iterations([a, b])
    assert merged["cosine"] == min(a["cosine"], b["cosine"])
    assert merged["max_abs"] == max(a["max_abs"], b["max_abs"])
    assert merged["top1"] is None


def test_logits_like():
    assert is_logits_like("logits", np.zeros((2, 5), np.float32))
    assert not is_logits_like("hidden_out", np.zeros((2, 5), np.float32))
    assert not is_logits_like("logits", np.zeros((2, 5), np.int64))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "small-cnn"])
def test_fp16_graph_runs_in_ort_and_tracks_fp32(name, export_builtins_once):
    src = export_builtins_once(name)
    m16 = to_float16(src.model)
    onnx.checker.check_model(m16, full_check=True)
    # same signature as the FP32 graph; everything inside is FP16
    assert [(v.name, v.type.tensor_type.elem_type) for v in m16.graph.input] == \
        [(v.name, v.type.tensor_type.elem_type) for v in src.model.graph.input]
    assert [(v.name, v.type.tensor_type.elem_type) for v in m16.graph.output] == \
        [(v.name, v.type.tensor_type.elem_type) for v in src.model.graph.output]
    assert not [i.name for i in m16.graph.initializer if i.data_type == TensorProto.FLOAT]
    feeds = src.random_inputs(np.random.default_rng(5))
    out16 = ort_session(m16).run(None, feeds)
    out32 = ort_session(src.model).run(None, feeds)
    for a, b in zip(out16, out32):
        assert a.dtype == np.float32
        m = compare_arrays(b, a)
        assert m["cosine"] > 0.9999
        assert 0 < m["max_abs"] < 0.05  # FP16 really changed the numbers, a little


def test_fp16_keeps_resize_scales_in_float32():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    w = numpy_helper.from_array(np.full((1,), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["xm"]),
         helper.make_node("Resize", ["xm", "", "scales"], ["y"], mode="nearest")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [scales, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    m16 = to_float16(model)
    types = {i.name: i.data_type for i in m16.graph.initializer}
    assert types == {"scales": TensorProto.FLOAT, "w": TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((1, 1, 2, 2)).astype(np.float32)
    got = ort_session(m16).run(None, {"x": x})[0]
    want = np.repeat(np.repeat(x * 0.5, 2, axis=2), 2, axis=3)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_fp16_turns_a_float32_mask_minimum_into_minus_infinity_quietly(recwarn):
    """A causal mask of float32's lowest value (torch.onnx's SDPA export) has no float16 value: it becomes -inf,
    as the engine's cast makes it, the masked logits get no weight, and no numpy overflow warning reaches the user."""
    mask = np.triu(np.full((4, 4), np.finfo(np.float32).min, np.float32), 1)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "mask"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [numpy_helper.from_array(mask, "mask")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    m16 = to_float16(model)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    mask16 = numpy_helper.to_array(m16.graph.initializer[0])
    assert np.isneginf(mask16[0, 1]) and mask16[1, 0] == 0
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    got = ort_session(m16).run(None, {"x": x})[0]
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True)) * (mask == 0)
    np.testing.assert_allclose(got, e / e.sum(axis=1, keepdims=True), atol=2e-3)
