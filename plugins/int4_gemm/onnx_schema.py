"""ONNX form of the groupwise INT4 GEMM plugin node: `qcompile::Int4GroupwiseGemm` (version 1).

Plugin contract (what a fusion pass writes and the lowering reads):

    y[..., N] = x @ DequantizeLinear(w_q, w_scale, w_zero_point, axis=0, block_size=g) + bias

inputs (in order; an absent optional input is an empty name):
  0 x             float [..., K]        activation (float32/float16/bfloat16; the same dtype as w_scale)
  1 w_q           INT4 or UINT4 [K, N]  ONNX's own 4-bit type (row-major, two per byte, first in the low nibble)
  2 w_scale       float [K/g, N]        block scales along K, strictly positive
  3 w_zero_point  (optional) w_q's type [K/g, N]
  4 bias          (optional) float [N]
attributes: block_size = g (int; 32, 64, 128, or K for per-channel), plugin_version = "1",
plugin_namespace = "qcompile" (as TensorRT's ONNX parser expects).
output: y, [..., N], the dtype of x.

The model-local function body (DequantizeLinear -> Flatten -> Gemm(bias optional) -> Reshape) lets ONNX
Runtime run a graph holding the node as the reference; Gemm is used because its bias input is optional,
so one body serves nodes with and without bias. Our lowering maps the node to
`torch.ops.qcompile.int4_groupwise_gemm` instead.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

DOMAIN = "qcompile"
OP_TYPE = "Int4GroupwiseGemm"
VERSION = 1
INPUTS = ("x", "w_q", "w_scale", "w_zero_point", "bias")
OUTPUTS = ("y",)
FUNCTION_OPSET = 21


def attributes(block_size: int) -> dict:
    """The attributes every Int4GroupwiseGemm node carries."""
    return {"block_size": int(block_size), "plugin_version": str(VERSION), "plugin_namespace": DOMAIN}


def make_node(name: str, inputs: list[str], outputs: list[str], block_size: int) -> onnx.NodeProto:
    """An Int4GroupwiseGemm NodeProto. `inputs`: x, w_q, w_scale[, w_zero_point[, bias]] ("" = absent)."""
    if not 3 <= len(inputs) <= len(INPUTS) or len(outputs) != 1 or not all(inputs[:3]):
        raise ValueError(f"Int4GroupwiseGemm takes inputs {INPUTS} (the first three required) and one output")
    return helper.make_node(OP_TYPE, list(inputs), outputs, name=name, domain=DOMAIN, **attributes(block_size))


def function_proto() -> onnx.FunctionProto:
    """The model-local function body that lets ONNX Runtime run an Int4GroupwiseGemm node."""
    block = helper.make_attribute_ref("block_size", onnx.AttributeProto.INT)
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["wd"], axis=0)
    dq.attribute.append(block)
    i64 = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))
    nodes = [
        dq,
        helper.make_node("Flatten", ["x"], ["x2"], axis=-1),
        helper.make_node("Gemm", ["x2", "wd", "bias"], ["y2"]),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        i64("c0", [0]), i64("cm1", [-1]), i64("c1", [1]), i64("c2", [2]),
        helper.make_node("Slice", ["x_shape", "c0", "cm1"], ["lead"]),
        helper.make_node("Shape", ["wd"], ["w_shape"]),
        helper.make_node("Slice", ["w_shape", "c1", "c2"], ["n"]),
        helper.make_node("Concat", ["lead", "n"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["y2", "y_shape"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), list(OUTPUTS), nodes,
        opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)],
        attributes=["plugin_version", "plugin_namespace"],
        attribute_protos=[helper.make_attribute("block_size", 0)],
    )


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile domain and the function body in `model` (idempotent)."""
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        model.functions.append(function_proto())
