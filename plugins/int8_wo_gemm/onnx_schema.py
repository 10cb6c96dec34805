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

from qcompile.plugins.onnx_functions import add_function, declare_domain

DOMAIN = "qcompile"
OP_TYPE = "Int8WeightOnlyGemm"
VERSION = 1  # the qcompile domain's opset version (shared by every qcompile plugin)
INPUTS = ("x", "w_q", "w_scale", "bias")
OUTPUTS = ("y",)
FUNCTION_OPSET = 21


def attributes() -> dict:
    """The attributes every Int8WeightOnlyGemm node carries."""
    return {"plugin_version": "1", "plugin_namespace": DOMAIN}


def make_node(name: str, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    """An Int8WeightOnlyGemm NodeProto (inputs in the order of `INPUTS`)."""
    if len(inputs) != len(INPUTS) or len(outputs) != 1:
        raise ValueError(f"Int8WeightOnlyGemm takes inputs {INPUTS} and one output")
    return helper.make_node(OP_TYPE, inputs, outputs, name=name, domain=DOMAIN, **attributes())


def function_proto() -> onnx.FunctionProto:
    """The model-local function body that lets ONNX Runtime run an Int8WeightOnlyGemm node."""
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["wd"], axis=1),
        helper.make_node("CastLike", ["wd", "x"], ["wx"]),
        helper.make_node("CastLike", ["bias", "x"], ["bx"]),
        helper.make_node("MatMul", ["x", "wx"], ["mm"]),
        helper.make_node("Add", ["mm", "bx"], ["y"]),
    ]
    return helper.make_function(DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS), nodes,
                                opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)],
                                attributes=["plugin_version", "plugin_namespace"])


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile domain and the function body in `model` (idempotent)."""
    declare_domain(model, DOMAIN, VERSION)
    add_function(model, DOMAIN, OP_TYPE, function_proto)
