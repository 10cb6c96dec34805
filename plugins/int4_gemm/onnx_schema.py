"""ONNX form of the groupwise INT4 GEMM plugin node: `qcompile::Int4GroupwiseGemm`.

Plugin contract (what a fusion pass writes and the lowering reads):

    y[..., N] = A(x) @ DequantizeLinear(w_q, w_scale, w_zero_point, axis=0, block_size=g) + bias

inputs (in order; an absent optional input is an empty name):
  0 x             float [..., K]        activation (float32/float16/bfloat16; the same dtype as w_scale)
  1 w_q           INT4 or UINT4 [K, N]  ONNX's own 4-bit type (row-major, two per byte, first in the low nibble)
  2 w_scale       float [K/g, N]        block scales along K, strictly positive
  3 w_zero_point  (optional) w_q's type [K/g, N]
  4 bias          (optional) float [N]
  5 x_scale       (plugin_version 2, act_quant = "fp8_static" only) float scalar, x's dtype, > 0
attributes: block_size = g (int; 32, 64, 128, or K for per-channel), plugin_version, plugin_namespace =
"qcompile" (as TensorRT's ONNX parser expects), and from version 2 `act_quant`, the activation quantization A:
  "none"         A(x) = x (W4A16; written as a version-1 node: no act_quant, no x_scale)
  "fp8_static"   A(x) = DQ(Q(x, x_scale, zero float8e4m3fn), ...): FP8 E4M3 per tensor, calibrated scale
  "fp8_dynamic"  A(x) = per-row FP8 Q/DQ with s[m] = max(amax(|x[m, :]|) / 448, float32 tiny), computed in
                 float32 at run time (per token)
output: y, [..., N], the dtype of x.

Model-local function bodies let ONNX Runtime run a graph holding the node as the reference: one overload per
act_quant (IR 10 function overloads; `add_to_model` sets each node's `overload` from its act_quant, since
graph-surgeon does not keep the field). Each is [activation Q/DQ ->] DequantizeLinear -> Flatten ->
Gemm(bias optional) -> Reshape; Gemm is used because its bias input is optional, so one body serves nodes with
and without bias. Our lowering maps the node to `torch.ops.qcompile.int4_groupwise_gemm` instead.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompile.plugins.formats import MIN_SCALE, qmax
from qcompile.plugins.onnx_functions import (PLUGIN_ATTRIBUTES, declare_domain, make_plugin_function, make_plugin_node,
                                             plugin_attributes)

DOMAIN = "qcompile"
OP_TYPE = "Int4GroupwiseGemm"
VERSION = 1  # the qcompile domain's opset version (shared with ScaledGemm); plugin_version is per node
PLUGIN_VERSION = 2  # the contract version; nodes that need no version-2 feature are written as version 1
INPUTS = ("x", "w_q", "w_scale", "w_zero_point", "bias", "x_scale")
OUTPUTS = ("y",)
FUNCTION_OPSET = 21
ACT_QUANT = ("none", "fp8_static", "fp8_dynamic")


def attributes(block_size: int, act_quant: str = "none") -> dict:
    """The attributes of an Int4GroupwiseGemm node (W4A16 nodes stay plugin_version 1, without act_quant)."""
    if act_quant not in ACT_QUANT:
        raise ValueError(f"Int4GroupwiseGemm act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    if act_quant == "none":
        return {"block_size": int(block_size), **plugin_attributes(1, DOMAIN)}
    return {"block_size": int(block_size), **plugin_attributes(PLUGIN_VERSION, DOMAIN), "act_quant": act_quant}


def act_quant_of(attrs: dict) -> str:
    """The node's activation quantization ("none" when the attribute is absent: a version-1 node)."""
    value = attrs.get("act_quant", "none")
    return value.decode() if isinstance(value, bytes) else str(value)


def make_node(name: str, inputs: list[str], outputs: list[str], block_size: int,
              act_quant: str = "none") -> onnx.NodeProto:
    """An Int4GroupwiseGemm NodeProto. `inputs`: x, w_q, w_scale[, w_zero_point[, bias[, x_scale]]] ("" = absent)."""
    has_scale = len(inputs) > 5 and bool(inputs[5])
    if has_scale != (act_quant == "fp8_static"):
        raise ValueError("Int4GroupwiseGemm takes x_scale (input 5) with act_quant='fp8_static' and only then")
    node = make_plugin_node(DOMAIN, OP_TYPE, INPUTS, name, inputs, outputs, attributes(block_size, act_quant),
                            required=3)
    node.overload = _overload(act_quant)
    return node


def _overload(act_quant: str) -> str:
    return "" if act_quant == "none" else act_quant


def _i64(name: str, vals: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))


def _f32(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [value]))


def _activation_nodes(act_quant: str) -> list[onnx.NodeProto]:
    """x -> "xa", the activation the GEMM reads (ONNX QuantizeLinear semantics)."""
    if act_quant == "none":
        return [helper.make_node("Identity", ["x"], ["xa"])]
    if act_quant == "fp8_static":
        zero = helper.make_tensor("x_zero", TensorProto.FLOAT8E4M3FN, [], np.zeros(1, np.uint8).tobytes(), raw=True)
        return [helper.make_node("Constant", [], ["x_zero"], value=zero),
                helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
                helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xa"])]
    # fp8_dynamic: per-row scale in float32, then x / s saturated and rounded to E4M3 (QuantizeLinear's cast)
    return [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Abs", ["xf"], ["xabs"]),
        _i64("last", [-1]),
        helper.make_node("ReduceMax", ["xabs", "last"], ["amax"], keepdims=1),
        _f32("qmax", qmax("fp8")), _f32("floor", MIN_SCALE),
        helper.make_node("Div", ["amax", "qmax"], ["s_raw"]),
        helper.make_node("Max", ["s_raw", "floor"], ["s"]),
        helper.make_node("Div", ["xf", "s"], ["xs"]),
        helper.make_node("Cast", ["xs"], ["xq"], to=TensorProto.FLOAT8E4M3FN, saturate=1),
        helper.make_node("Cast", ["xq"], ["xqf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xqf", "s"], ["xd"]),
        helper.make_node("CastLike", ["xd", "x"], ["xa"]),
    ]


def function_proto(act_quant: str = "none") -> onnx.FunctionProto:
    """The model-local function body (the overload for `act_quant`) that lets ONNX Runtime run the node."""
    block = helper.make_attribute_ref("block_size", onnx.AttributeProto.INT)
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["wd"], axis=0)
    dq.attribute.append(block)
    nodes = [
        *_activation_nodes(act_quant),
        dq,
        helper.make_node("Flatten", ["xa"], ["x2"], axis=-1),
        helper.make_node("Gemm", ["x2", "wd", "bias"], ["y2"]),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        _i64("c0", [0]), _i64("cm1", [-1]), _i64("c1", [1]), _i64("c2", [2]),
        helper.make_node("Slice", ["x_shape", "c0", "cm1"], ["lead"]),
        helper.make_node("Shape", ["wd"], ["w_shape"]),
        helper.make_node("Slice", ["w_shape", "c1", "c2"], ["n"]),
        helper.make_node("Concat", ["lead", "n"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["y2", "y_shape"], ["y"]),
    ]
    function = make_plugin_function(DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes, FUNCTION_OPSET,
                                    attributes=(*PLUGIN_ATTRIBUTES, "act_quant"),
                                    attribute_protos=[helper.make_attribute("block_size", 0)])
    function.overload = _overload(act_quant)
    return function


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile domain in `model`, point each node at the overload of its act_quant and add the
    function bodies its nodes use (idempotent)."""
    declare_domain(model, DOMAIN, VERSION)
    used = {}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            act_quant = act_quant_of({a.name: helper.get_attribute_value(a) for a in node.attribute})
            node.overload = _overload(act_quant)
            used[node.overload] = act_quant
    if not used:  # the body of a version-1 node, for graphs that add nodes later
        used[""] = "none"
    have = {f.overload for f in model.functions if f.domain == DOMAIN and f.name == OP_TYPE}
    model.functions.extend(function_proto(a) for o, a in sorted(used.items()) if o not in have)
