"""Elementwise, scan and reduction converters added with opsets 18-26 (and older ones that had none), against ONNX's
reference evaluator on fresh random data. ONNX's own node cases for them run in test_conformance.py."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qc_testutil import ort_session
from qcompile.lowering import lower_onnx

_NP = {TensorProto.FLOAT: np.float32, TensorProto.INT8: np.int8, TensorProto.UINT16: np.uint16,
       TensorProto.INT64: np.int64}


def _one_node(op, inputs, opset, constants=(), **attrs):
    """A one-node model; `inputs` are (name, ONNX type, shape), `constants` initializers."""
    node = helper.make_node(op, [i[0] for i in inputs] + [c.name for c in constants], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)], list(constants))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _check(model, feeds, exact=False):
    (want,) = ReferenceEvaluator(model).run(None, feeds)
    (got,) = lower_onnx(model)(*[torch.from_numpy(v) for v in feeds.values()])
    got = got.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op, opset, attrs, low, high", [
    ("Celu", 12, {"alpha": 0.7}, -3, 3), ("ThresholdedRelu", 10, {"alpha": 0.4}, -2, 2),
    ("Shrink", 9, {"bias": 0.3, "lambd": 0.8}, -2, 2), ("Swish", 24, {"alpha": 1.7}, -4, 4),
    ("Asinh", 9, {}, -5, 5), ("Acosh", 9, {}, 1, 6), ("Atanh", 9, {}, -0.99, 0.99),
])
def test_float_activations(op, opset, attrs, low, high):
    x = np.random.default_rng(len(op)).uniform(low, high, (3, 5, 7)).astype(np.float32)
    _check(_one_node(op, [("x", TensorProto.FLOAT, [3, 5, 7])], opset, **attrs), {"x": x})


def test_hardmax_marks_the_first_of_tied_maxima():
    x = np.random.default_rng(1).integers(0, 3, (4, 6, 5)).astype(np.float32)  # many ties
    for axis in (1, -1):
        _check(_one_node("Hardmax", [("x", TensorProto.FLOAT, [4, 6, 5])], 13, axis=axis), {"x": x}, exact=True)


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
def test_bit_shift_of_signed_values_and_shifts_past_the_width(direction):
    rng = np.random.default_rng(2)
    a = rng.integers(-128, 128, (64,)).astype(np.int8)
    b = rng.integers(0, 11, (64,)).astype(np.int8)  # 8, 9, 10 shift every bit out
    model = _one_node("BitShift", [("a", TensorProto.INT8, [64]), ("b", TensorProto.INT8, [64])], 11,
                      direction=direction)
    _check(model, {"a": a, "b": b}, exact=True)


def test_bitwise_not_of_a_wide_unsigned_type():
    x = np.random.default_rng(3).integers(0, 2**16, (5, 9)).astype(np.uint16)
    _check(_one_node("BitwiseNot", [("x", TensorProto.UINT16, [5, 9])], 18), {"x": x}, exact=True)


@pytest.mark.parametrize("op, opset", [("CumSum", 14), ("CumProd", 26)])
@pytest.mark.parametrize("exclusive, reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_scans(op, opset, exclusive, reverse):
    x = np.random.default_rng(4).uniform(0.5, 1.5, (3, 6, 4)).astype(np.float32)
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    model = _one_node(op, [("x", TensorProto.FLOAT, [3, 6, 4])], opset, [axis], exclusive=exclusive, reverse=reverse)
    _check(model, {"x": x})


def test_exclusive_cumsum_leaves_each_element_out_exactly():
    """Shifting the input keeps a small value next to a large one (inclusive sum minus the element lost it)."""
    x = np.array([1.0, 1e8, 1.0, 3.0], np.float32)
    axis = numpy_helper.from_array(np.array(0, np.int64), "axis")
    _check(_one_node("CumSum", [("x", TensorProto.FLOAT, [4])], 14, [axis], exclusive=1), {"x": x}, exact=True)


def test_reduce_log_sum():
    x = np.random.default_rng(5).uniform(0.1, 2, (3, 4, 5)).astype(np.float32)
    axes = numpy_helper.from_array(np.array([0, 2], np.int64), "axes")
    _check(_one_node("ReduceLogSum", [("x", TensorProto.FLOAT, [3, 4, 5])], 18, [axes], keepdims=0), {"x": x})


@pytest.mark.parametrize("p", [1, 2])
def test_lp_normalization_with_a_zero_row(p):
    """Against ONNX Runtime: ONNX's reference evaluator takes the L1 norm without absolute values (sum x)."""
    x = np.random.default_rng(6).standard_normal((4, 3, 5)).astype(np.float32)
    x[1, 2] = 0
    model = _one_node("LpNormalization", [("x", TensorProto.FLOAT, [4, 3, 5])], 21, axis=-1, p=p)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    (want,) = ort_session(model).run(None, {"x": x})
    (got,) = lower_onnx(model)(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), np.nan_to_num(want), rtol=1e-5, atol=1e-6)
    assert not got[1, 2].any()


def test_mean_variance_normalization_over_chosen_axes():
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 5)).astype(np.float32) * 3 + 1
    model = _one_node("MeanVarianceNormalization", [("x", TensorProto.FLOAT, [2, 3, 4, 5])], 13, axes=[1, 3])
    _check(model, {"x": x})


@pytest.mark.parametrize("exponent", [2.0, 0.5, 3.0, -1.0, 1.7])
def test_pow_by_a_constant_exponent_matches_the_reference_and_keeps_no_exponent_tensor(exponent):
    """A 0-d float exponent constant is read when the graph is lowered: the exported program raises x to a number
    (`aten.pow.Tensor_Scalar`, which Inductor writes as x * x for 2.0) and holds no exponent buffer."""
    e = numpy_helper.from_array(np.array(exponent, np.float32), "e")
    model = _one_node("Pow", [("x", TensorProto.FLOAT, [4, 64])], 18, constants=[e])
    x = np.random.default_rng(7).uniform(0.1, 3.0, (4, 64)).astype(np.float32)
    _check(model, {"x": x})
    program = lower_onnx(model)
    assert list(program.buffers()) == []
    graph = torch.export.export(program, (torch.from_numpy(x),)).graph
    pows = [n for n in graph.nodes if n.op == "call_function" and "pow" in str(n.target)]
    assert [(str(n.target), n.args[1]) for n in pows] == [("aten.pow.Tensor_Scalar", float(np.float32(exponent)))]


def test_pow_by_a_constant_node_reads_its_exponent_as_a_number():
    exponent = helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(np.array(2.0, np.float32)))
    graph = helper.make_graph([exponent, helper.make_node("Pow", ["x", "e"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = np.random.default_rng(10).uniform(-2.0, 2.0, (3, 5)).astype(np.float32)
    _check(model, {"x": x})
    assert list(lower_onnx(model).buffers()) == []


def test_pow_by_an_integer_constant_and_by_an_input_match_the_reference():
    e = numpy_helper.from_array(np.array(3, np.int64), "e")
    x = np.random.default_rng(8).uniform(-2.0, 2.0, (3, 5)).astype(np.float32)
    _check(_one_node("Pow", [("x", TensorProto.FLOAT, [3, 5])], 18, constants=[e]), {"x": x})
    y = np.random.default_rng(9).uniform(-2.0, 2.0, (3, 5)).astype(np.float32)
    _check(_one_node("Pow", [("x", TensorProto.FLOAT, [3, 5]), ("y", TensorProto.FLOAT, [3, 5])], 18),
           {"x": np.abs(x) + 0.1, "y": y})
