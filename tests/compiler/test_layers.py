"""The per-layer table (`qcompile.layers.layer_table`) read off plugin graphs built from ONNX helpers."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.layers import layer_table
from qcompile.plugins.int4_gemm import onnx_schema as int4_schema

K, N, G = 128, 64, 32


def _int4_model(act_quant: str) -> onnx.ModelProto:
    """x [b, K] -> one Int4GroupwiseGemm node (INT4 weight, group scales; x_scale when fp8_static) -> y."""
    w_q = helper.make_tensor("w_q", TensorProto.INT4, [K, N], np.zeros(K * N // 2, np.uint8).tobytes(), raw=True)
    inits = [w_q, numpy_helper.from_array(np.full((K // G, N), 0.01, np.float32), "w_scale")]
    inputs = ["x", "w_q", "w_scale"]
    if act_quant == "fp8_static":
        inits.append(numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"))
        inputs += ["", "", "x_scale"]
    node = int4_schema.make_node("gemm", inputs, ["y"], G, act_quant=act_quant)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("qcompile", 1)])


@pytest.mark.parametrize("act_quant, fmt, granularity", [("none", "int4/fp16", f"group{G}/-"),
                                                         ("fp8_static", "int4/fp8", f"group{G}/tensor"),
                                                         ("fp8_dynamic", "int4/fp8", f"group{G}/token")])
def test_int4_rows_show_the_activation_format_of_act_quant(act_quant, fmt, granularity):
    (row,) = layer_table(_int4_model(act_quant))
    assert (row.op, row.format, row.granularity) == ("Int4GroupwiseGemm", fmt, granularity)
    assert row.plugin == "qcompile::Int4GroupwiseGemm"
    assert row.bytes_before == K * N * 4 and row.bytes_after == K * N // 2 + (K // G) * N * 4


def _fp4_model(fmt: str, w4a4: bool) -> onnx.ModelProto:
    """x [b, K] -> one Fp4Gemm / Fp4GemmW4A4 node (FP4 weight [N, K], block scales, global scales) -> y."""
    from qcompile.plugins.fp4_gemm import onnx_schema as fp4_schema

    block = 16 if fmt == "nvfp4" else 32
    w_q = helper.make_tensor("w_q", TensorProto.FLOAT4E2M1, [N, K], np.zeros(N * K // 2, np.uint8).tobytes(), raw=True)
    if fmt == "nvfp4":
        w_scale = helper.make_tensor("w_scale", TensorProto.FLOAT8E4M3FN, [N, K // block],
                                     np.full(N * K // block, 0x38, np.uint8).tobytes(), raw=True)
    else:
        w_scale = numpy_helper.from_array(np.full((N, K // block), 0.5, np.float32), "w_scale")
    inits = [w_q, w_scale, numpy_helper.from_array(np.array(0.01, np.float32), "w_global")]
    inputs = ["x", "w_q", "w_scale", "w_global"]
    if w4a4:
        inits.append(numpy_helper.from_array(np.array(0.02, np.float32), "x_global"))
        inputs.append("x_global")
    node = fp4_schema.make_node("gemm", inputs, ["y"], block, w4a4=w4a4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("qcompile", 1)])


@pytest.mark.parametrize("fmt, w4a4, op, want_fmt, granularity, scale_bytes", [
    ("nvfp4", False, "Fp4Gemm", "nvfp4/fp16", "block16/-", N * K // 16),
    ("nvfp4", True, "Fp4GemmW4A4", "nvfp4/nvfp4", "block16/block16", N * K // 16),
    ("mxfp4", False, "Fp4Gemm", "mxfp4/fp16", "block32/-", N * K // 32 * 4)])
def test_fp4_rows(fmt, w4a4, op, want_fmt, granularity, scale_bytes):
    (row,) = layer_table(_fp4_model(fmt, w4a4))
    assert (row.op, row.format, row.granularity, row.plugin) == (op, want_fmt, granularity, f"qcompile::{op}")
    assert row.bytes_before == K * N * 4 and row.bytes_after == K * N // 2 + scale_bytes
