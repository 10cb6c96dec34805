"""ONNX form of the scaled-GEMM plugin with per-token dynamic activations: `qcompile::DynamicScaledGemm` (v1).

Plugin contract (what the fusion pass writes and the lowering reads):

    s[m]     = max(max_k |x[m, k]| / qmax, MIN_SCALE)          (per row of x, computed at run time)
    y[..., N] = (DQ(Q(x, s)) @ DQ(w_q, w_scale, axis=0).T) + bias

inputs (in order):
  0 x            float tensor [..., K]    the high-precision activation (the plugin quantizes it per row)
  1 x_zero_point int8 or float8e4m3fn 0   scalar; its dtype selects the activation format (qmax 127 / 448)
  2 w_q          int8 or float8e4m3fn     [N, K] quantized weight, K contiguous (cuBLAS "TN")
  3 w_scale      float32 [N] or scalar    per-output-channel or per-tensor weight scale
  4 bias         float32 [N]              zeros when the GEMM had no bias
attributes: plugin_version="1", plugin_namespace="qcompile" (as TensorRT's ONNX parser expects).
output: y, float, [..., N], the dtype of x.

The function body writes the row quantization as `Q(x / s, 1) * s` (bitwise the same as the blocked
`QuantizeLinear(x, s, axis=-1, block_size=K)` of the portable Q/DQ graph, but with no K in it); our lowering
maps the node to `torch.ops.qcompile.scaled_gemm_dynamic`.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from qcompile.plugins import formats
from qcompile.plugins.onnx_functions import (add_plugin_function, make_plugin_function, make_plugin_node,
                                             plugin_attributes)

DOMAIN = "qcompile"
OP_TYPE = "DynamicScaledGemm"
VERSION = 1
INPUTS = ("x", "x_zero_point", "w_q", "w_scale", "bias")
OUTPUTS = ("y",)
FUNCTION_OPSET = 21


def attributes() -> dict:
    """The attributes every DynamicScaledGemm node carries."""
    return plugin_attributes(VERSION, DOMAIN)


def make_node(name: str, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    """A DynamicScaledGemm NodeProto (inputs in the order of `INPUTS`)."""
    return make_plugin_node(DOMAIN, OP_TYPE, INPUTS, name, inputs, outputs, attributes())


def function_proto() -> onnx.FunctionProto:
    """The model-local function body that lets ONNX Runtime run a DynamicScaledGemm node.

    qmax comes from the zero point's type: `DQ(Q(448, 1, zp), 1, zp)` saturates to 127 for int8, 448 for fp8."""
    const = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [v]))
    nodes = [
        const("big", 448.0), const("one", 1.0), const("tiny", formats.MIN_SCALE),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [1], [-1])),
        helper.make_node("QuantizeLinear", ["big", "one", "x_zero_point"], ["qmax_q"]),
        helper.make_node("DequantizeLinear", ["qmax_q", "one", "x_zero_point"], ["qmax"]),
        helper.make_node("Abs", ["x"], ["ax"]),
        helper.make_node("ReduceMax", ["ax", "axes"], ["amax"], keepdims=1),
        helper.make_node("Div", ["amax", "qmax"], ["s0"]),
        helper.make_node("Max", ["s0", "tiny"], ["s"]),
        helper.make_node("Div", ["x", "s"], ["xs"]),
        helper.make_node("QuantizeLinear", ["xs", "one", "x_zero_point"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "x_zero_point"], ["xd0"]),
        helper.make_node("Mul", ["xd0", "s"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["wd"], axis=0),
        helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["xd", "wt"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"]),
    ]
    return make_plugin_function(DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes, FUNCTION_OPSET)


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile domain and the function body in `model` (idempotent)."""
    add_plugin_function(model, DOMAIN, VERSION, OP_TYPE, function_proto)
