"""ONNX form of the FP8 block-scaled GEMM plugin node: `qcompile::Fp8BlockGemm` (version 1).

Plugin contract (what `FuseFp8BlockGemmPass` writes and the lowering reads):

    y[..., N] = DQ1x128(Q1x128(x)) @ DQ128x128(w_q, w_scale).T + bias

inputs (in order):
  0 x        float [..., K]            activation (the plugin quantizes it: dynamic 1x128 FP8 blocks)
  1 w_q      FLOAT8E4M3FN [N, K]       weight, K contiguous
  2 w_scale  float32 [N/128, K/128]    one scale per 128x128 weight block, strictly positive
  3 bias     float32 [N]               zeros when the GEMM had no bias
attributes: plugin_version = "1", plugin_namespace = "qcompile". K and N are multiples of 128.
output: y, [..., N], the dtype of x.

The model-local function body lets ONNX Runtime run a graph holding the node as the reference: the dynamic
1x128 quantization of x in float32 (Reshape to [..., K/128, 128], per-block amax / 448 floored at the float32
tiny, x / s cast to FLOAT8E4M3FN with saturation, times s), the weight dequantized per 128x128 block
(Reshape to [N/128, 128, K/128, 128] times the unsqueezed scale), then Transpose -> MatMul -> Add.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompile.plugins.formats import MIN_SCALE, qmax
from qcompile.plugins.onnx_functions import (add_plugin_function, make_plugin_function, make_plugin_node,
                                             plugin_attributes)

DOMAIN = "qcompile"
OP_TYPE = "Fp8BlockGemm"
VERSION = 1  # the qcompile domain's opset version (shared by every qcompile plugin)
INPUTS = ("x", "w_q", "w_scale", "bias")
OUTPUTS = ("y",)
FUNCTION_OPSET = 21
BLOCK = 128


def attributes() -> dict:
    """The attributes every Fp8BlockGemm node carries."""
    return plugin_attributes(1, DOMAIN)


def make_node(name: str, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    """An Fp8BlockGemm NodeProto (inputs in the order of `INPUTS`)."""
    return make_plugin_node(DOMAIN, OP_TYPE, INPUTS, name, inputs, outputs, attributes())


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value), name))


def function_proto() -> onnx.FunctionProto:
    """The model-local function body that lets ONNX Runtime run an Fp8BlockGemm node."""
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        # x: dynamic 1x128 blocks, float32 math (ONNX QuantizeLinear rules: divide, saturate, round to E4M3)
        _const("c_blk", i64([-1, BLOCK])), _const("c_last", i64([-1])), _const("c0", i64([0])),
        _const("qmax", np.float32(qmax("fp8"))), _const("tiny", np.float32(MIN_SCALE)),
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Slice", ["x_shape", "c0", "c_last"], ["lead"]),
        helper.make_node("Concat", ["lead", "c_blk"], ["blk_shape"], axis=0),
        helper.make_node("Reshape", ["xf", "blk_shape"], ["xb"]),
        helper.make_node("Abs", ["xb"], ["xabs"]),
        helper.make_node("ReduceMax", ["xabs", "c_last"], ["amax"], keepdims=1),
        helper.make_node("Div", ["amax", "qmax"], ["s_raw"]),
        helper.make_node("Max", ["s_raw", "tiny"], ["sx"]),
        helper.make_node("Div", ["xb", "sx"], ["xs"]),
        helper.make_node("Cast", ["xs"], ["xq"], to=TensorProto.FLOAT8E4M3FN, saturate=1),
        helper.make_node("Cast", ["xq"], ["xqf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xqf", "sx"], ["xdb"]),
        helper.make_node("Reshape", ["xdb", "x_shape"], ["xd"]),
        # weight: 128x128 blocks
        _const("c1", i64([1])), _const("c2", i64([2])), _const("c13", i64([1, 3])),
        helper.make_node("Shape", ["w_scale"], ["ws_shape"]),
        helper.make_node("Slice", ["ws_shape", "c1", "c2"], ["kb"]),
        _const("c_m1_blk", i64([-1, BLOCK])), _const("c_blk1", i64([BLOCK])),
        helper.make_node("Concat", ["c_m1_blk", "kb", "c_blk1"], ["w4_shape"], axis=0),
        helper.make_node("Cast", ["w_q"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["wf", "w4_shape"], ["w4"]),
        helper.make_node("Unsqueeze", ["w_scale", "c13"], ["ws4"]),
        helper.make_node("Mul", ["w4", "ws4"], ["wd4"]),
        helper.make_node("Shape", ["w_q"], ["w_shape"]),
        helper.make_node("Reshape", ["wd4", "w_shape"], ["wd"]),
        helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["xd", "wt"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["yf"]),
        helper.make_node("CastLike", ["yf", "x"], ["y"]),
    ]
    return make_plugin_function(DOMAIN, OP_TYPE, INPUTS, OUTPUTS, nodes, FUNCTION_OPSET)


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile domain and the function body in `model` (idempotent)."""
    add_plugin_function(model, DOMAIN, VERSION, OP_TYPE, function_proto)
