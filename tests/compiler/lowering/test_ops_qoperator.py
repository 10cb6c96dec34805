"""ONNX Runtime's integer "QOperator" ops (models quantized by onnxruntime.quantization) through the lowering, on
fresh random data: a dynamically quantized model against ONNX Runtime, and QLinearMatMul / QLinearConv against
ONNX's reference evaluator (ONNX Runtime 1.31.1's CPU kernels get per-channel weight scales wrong, by up to 52
codes on 40% of the outputs, where the reference evaluator and float64 by hand agree); and the build summary's note
on such a source."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qc_testutil import ort_session
from qcompile.lowering import lower_onnx


def _float_model(rng) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> MatMul + bias -> Relu -> MatMul, batch dynamic."""
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "cw"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "cb"),
             numpy_helper.from_array(np.array([-1, 512], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((512, 64)).astype(np.float32) * 0.05, "w1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32) * 0.2, "w2")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]), helper.make_node("MatMul", ["f", "w1"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["a1"]), helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.fixture(scope="module")
def dynamic_quantized(tmp_path_factory):
    """The float model through `onnxruntime.quantization.quantize_dynamic` (DynamicQuantizeLinear, MatMulInteger,
    ConvInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = tmp_path_factory.mktemp("qop")
    onnx.save(_float_model(np.random.default_rng(0)), folder / "f.onnx")
    quantize_dynamic(folder / "f.onnx", folder / "q.onnx", weight_type=QuantType.QInt8)
    return folder / "q.onnx"


def test_dynamically_quantized_model_matches_onnx_runtime(dynamic_quantized):
    model = onnx.load(dynamic_quantized)
    assert {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"} <= {n.op_type for n in model.graph.node}
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    (want,) = ort_session(model).run(None, {"x": x})
    (got,) = lower_onnx(model)(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def _qlinear(op, inputs: list, constants: dict, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, inputs, ["y"], **attrs)
    feeds = [i for i in inputs if i not in constants]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in feeds],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _check_against_reference(model, feeds):
    (want,) = ReferenceEvaluator(model).run(None, feeds)
    (got,) = lower_onnx(model)(*[torch.from_numpy(v) for v in feeds.values()])
    assert got.dtype == torch.from_numpy(want).dtype
    # requantization: the reference multiplies in float32, we in float64; a value on a rounding tie may differ by one
    diff = np.abs(got.numpy().astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_qlinear_matmul_with_per_column_weight_scales():
    rng = np.random.default_rng(2)
    n = 24
    constants = {"a_s": np.float32(0.02), "a_z": np.uint8(120), "b": rng.integers(-127, 128, (40, n), dtype=np.int8),
                 "b_s": rng.uniform(0.001, 0.01, (1, n)).astype(np.float32), "b_z": np.zeros((1, n), np.int8),
                 "y_s": np.float32(0.05), "y_z": np.uint8(128)}
    model = _qlinear("QLinearMatMul", ["a", "a_s", "a_z", "b", "b_s", "b_z", "y_s", "y_z"], constants)
    _check_against_reference(model, {"a": rng.integers(0, 256, (2, 5, 40), dtype=np.uint8)})


def test_qlinear_conv_with_per_channel_weights_and_bias():
    rng = np.random.default_rng(3)
    constants = {"x_s": np.float32(0.03), "x_z": np.uint8(100),
                 "w": rng.integers(-127, 128, (6, 4, 3, 3), dtype=np.int8),
                 "w_s": rng.uniform(0.002, 0.02, 6).astype(np.float32), "w_z": np.zeros(6, np.int8),
                 "y_s": np.float32(0.2), "y_z": np.uint8(90), "bias": rng.integers(-2000, 2000, 6, dtype=np.int32)}
    model = _qlinear("QLinearConv", ["x", "x_s", "x_z", "w", "w_s", "w_z", "y_s", "y_z", "bias"], constants,
                     pads=[1, 0, 1, 0], strides=[1, 2])
    _check_against_reference(model, {"x": rng.integers(0, 256, (2, 4, 9, 10), dtype=np.uint8)})


def test_build_summary_says_the_source_is_already_quantized(dynamic_quantized):
    import qcompile

    result = qcompile.build(str(dynamic_quantized), "int8", output=None, calib="random")
    note = [n for n in result.pass_notes if "already quantized" in n]
    assert note and "2 MatMulInteger" in note[0] and "1 ConvInteger" in note[0], result.pass_notes
