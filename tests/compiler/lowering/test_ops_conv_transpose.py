"""ConvTranspose with asymmetric pads, `output_shape` and SAME auto_pad, against ONNX Runtime on fresh data."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.lowering import lower_onnx


@pytest.mark.parametrize("attrs", [
    {"pads": [0, 2, 1, 1], "strides": [2, 3]},
    {"output_shape": [11, 18], "strides": [2, 3], "output_padding": [1, 0]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2], "dilations": [2, 1]},
    {"auto_pad": "SAME_LOWER", "strides": [3, 2]},
], ids=["asymmetric-pads", "output-shape", "same-upper", "same-lower"])
def test_conv_transpose_padding_forms_match_onnx_runtime(attrs):
    rng = np.random.default_rng(len(str(attrs)))
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 4)).astype(np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    (want,) = ort_session(model).run(None, {"x": x})
    (got,) = lower_onnx(model)(torch.from_numpy(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
