"""ONNX form of the scaled-GEMM plugin node: `qcompile::ScaledGemm` (version 1).

Plugin contract (what the fusion pass writes and the lowering reads):

    y[..., N] = (DQ(Q(x, x_scale, x_zero_point)) @ DQ(w_q, w_scale, axis=0).T) + bias

inputs (in order):
  0 x            float tensor [..., K]    the high-precision activation (the plugin quantizes it)
  1 x_scale      float32 scalar           static per-tensor activation scale
  2 x_zero_point int8 or float8e4m3fn 0   scalar; its dtype selects the activation format
  3 w_q          int8 or float8e4m3fn     [N, K] quantized weight, K contiguous (cuBLAS "TN")
  4 w_scale      float32 [N] or scalar    per-output-channel or per-tensor weight scale
  5 bias         float32 [N]              zeros when the GEMM had no bias
attributes: plugin_version="1", plugin_namespace="qcompile" (as TensorRT's ONNX parser expects).
output: y, float, [..., N], the dtype of x.

The node has a model-local ONNX function body (Q/DQ + MatMul + Add) so ONNX Runtime can run the
graph as a reference; our lowering maps the node to `torch.ops.qcompile.scaled_gemm` instead.
"""
from __future__ import annotations

import onnx
from onnx import helper

from qcompile.plugins.onnx_functions import (add_plugin_function, make_plugin_function, make_plugin_node,
                                             plugin_attributes)

DOMAIN = "qcompile"
OP_TYPE = "ScaledGemm"
VERSION = 1
INPUTS = ("x", "x_scale", "x_zero_point", "w_q", "w_scale", "bias")
OUTPUTS = ("y",)
FUNCTION_OPSET = 21


def attributes() -> dict:
    """The attributes every ScaledGemm node carries."""
    return plugin_attributes(VERSION, DOMAIN)


def make_node(name: str, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    """A ScaledGemm NodeProto (inputs in the order of `INPUTS`)."""
    return make_plugin_node(DOMAIN, OP_TYPE, INPUTS, name, inputs, outputs, attributes())


def function_proto() -> onnx.FunctionProto:
    """The model-local function body that lets ONNX Runtime run a ScaledGemm node."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["wd"], axis=0),
        helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["xd", "wt"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"]),
    ]
    return make_plugin_function(DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes, FUNCTION_OPSET)


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile domain and the function body in `model` (idempotent)."""
    add_plugin_function(model, DOMAIN, VERSION, OP_TYPE, function_proto)
