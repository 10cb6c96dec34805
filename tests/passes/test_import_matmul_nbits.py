"""ONNX Runtime's MatMulNBits: the lowering's float reading of its weight format, and the import of 4-bit layers as
INT4 GEMM plugin nodes, against ONNX Runtime running the quantized model, on fresh random data."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.lowering import lower_onnx
from qcompile.passes.pipeline import fuse_plugins
from qcompile.plugins.int4_gemm import onnx_schema

K, N = 256, 96


def _quantized(bits: int, symmetric: bool, seed: int) -> onnx.ModelProto:
    """x @ W + b with W quantized by onnxruntime.quantization's MatMulNBitsQuantizer (block 64)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32) * 0.05, "w"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32) * 0.1, "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=64, is_symmetric=symmetric)
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 1
    return model


def _x(seed):
    return np.random.default_rng(seed).standard_normal((2, 5, K)).astype(np.float32)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_lowering_reads_the_weight_format_as_onnx_runtime_does(bits, symmetric):
    model = _quantized(bits, symmetric, seed=bits + symmetric)
    x = _x(1)
    (want,) = ort_session(model).run(None, {"x": x})
    (got,) = lower_onnx(model)(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_four_bit_layers_become_int4_plugins_with_positive_scales(symmetric):
    """ONNX Runtime's symmetric weights have negative scales; the plugin's are positive, with the codes mirrored,
    and the plugin graph (in ONNX Runtime through its function bodies, and lowered) gives the same outputs."""
    model = _quantized(4, symmetric, seed=7)
    plugin_model, result = fuse_plugins(model)
    nodes = [n for n in plugin_model.graph.node if n.op_type == onnx_schema.OP_TYPE]
    assert len(nodes) == 1 and result.stats["ImportMatMulNBitsPass.imported"] == 1
    if symmetric:
        scales = [t for t in model.graph.initializer if "scales" in t.name]
        assert (numpy_helper.to_array(scales[0]) < 0).any()  # what the mirroring is for
    scale = next(t for t in plugin_model.graph.initializer if t.name == nodes[0].input[2])
    assert (numpy_helper.to_array(scale) > 0).all()
    x = _x(2)
    (want,) = ort_session(model).run(None, {"x": x})
    (via_functions,) = ort_session(plugin_model).run(None, {"x": x})
    (lowered,) = lower_onnx(plugin_model)(torch.from_numpy(x))
    np.testing.assert_allclose(via_functions, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lowered.numpy(), want, rtol=1e-4, atol=1e-5)


def test_eight_bit_layers_are_declined_with_a_reason():
    plugin_model, result = fuse_plugins(_quantized(8, True, seed=3))
    assert [n.op_type for n in plugin_model.graph.node].count("MatMulNBits") == 1
    assert any("bits=8" in reason for _, reason in result.declined), result.declined
