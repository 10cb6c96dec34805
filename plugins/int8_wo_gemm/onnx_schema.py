"""ONNX form of the INT8 weight-only GEMM plugin node: `qcompile::Int8WeightOnlyGemm` (version 1).

Plugin contract (what `FuseInt8WoGemmPass` writes and the lowering reads):

    y[..., N] = x @ DequantizeLinear(w_q, w_scale, axis=1) + bias

inputs (in order):
  0 x        float [..., K]   activation (float32/float16/bfloat16), not quantized
  1 w_q      INT8 [K, N]      per-output-channel symmetric weight (row-major, N contiguous)
  2 w_scale  float32 [N]      strictly positive
  3 bias     float32 [N]      zeros when the GEMM had no bias
attributes: plugin_version = "1", plugin_namespace = "qcompile" (as TensorRT's ONNX parser expects).
output: y, [..., N], the dtype of x.

The model-local function body (DequantizeLinear -> CastLike x -> MatMul -> Add) lets ONNX Runtime run a graph
holding the node as the reference; our lowering maps the node to `torch.ops.qcompile.int8_weight_only_gemm`.
"""
from __future__ import annotations

import onnx
from onnx import helper

from qcompile.plugins.onnx_functions import (add_plugin_function, make_plugin_function, make_plugin_node,
                                             plugin_attributes)

DOMAIN = "qcompile"
OP_TYPE = "Int8WeightOnlyGemm"
VERSION = 1  # the qcompile domain's opset version (shared by every qcompile plugin)
INPUTS = ("x", "w_q", "w_scale", "bias")
OUTPUTS = ("y",)
FUNCTION_OPSET = 21


def attributes() -> dict:
    """The attributes every Int8WeightOnlyGemm node carries."""
    return plugin_attributes(1, DOMAIN)


def make_node(name: str, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    """An Int8WeightOnlyGemm NodeProto (inputs in the order of `INPUTS`)."""
    return make_plugin_node(DOMAIN, OP_TYPE, INPUTS, name, inputs, outputs, attributes())


def function_proto() -> onnx.FunctionProto:
    """The model-local function body that lets ONNX Runtime run an Int8WeightOnlyGemm node."""
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["wd"], axis=1),
        helper.make_node("CastLike", ["wd", "x"], ["wx"]),
        helper.make_node("CastLike", ["bias", "x"], ["bx"]),
        helper.make_node("MatMul", ["x", "wx"], ["mm"]),
        helper.make_node("Add", ["mm", "bx"], ["y"]),
    ]
    return make_plugin_function(DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes, FUNCTION_OPSET)


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile domain and the function body in `model` (idempotent)."""
    add_plugin_function(model, DOMAIN, VERSION, OP_TYPE, function_proto)
