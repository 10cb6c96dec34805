"""ONNX forms of the FP4 GEMM plugin: `qcompile::Fp4Gemm` and `qcompile::Fp4GemmW4A4` (version 1).

Plugin contract (what `FuseFp4GemmPass` writes and the lowering reads):

    Fp4Gemm:      y[..., N] = x @ W.T + bias
    Fp4GemmW4A4:  y[..., N] = nvfp4(x; x_global) @ W.T + bias
    W = DequantizeLinear(w_q, Cast(w_scale, float) * w_global, axis=-1, block_size=B)   # [N, K]

inputs (in order; an absent optional input is an empty name):
  0 x         float [..., K]             activation
  1 w_q       FLOAT4E2M1 [N, K]          weight, TensorRT's [out, in] layout (row-major, two per byte, low nibble first)
  2 w_scale   [N, K/B]                   block scales: FLOAT8E4M3FN (NVFP4, B = 16) or FLOAT powers of two
                                          (MXFP4, B = 32: the E8M0 values, exactly)
  3 w_global  FLOAT scalar               NVFP4 global scale (decode form, amax/(6*448)); 1.0 for MXFP4
  4 x_global  FLOAT scalar               (Fp4GemmW4A4 only) the activation's NVFP4 global scale
  4|5 bias    (optional) float [N]
attributes: block_size = B, plugin_version = "1", plugin_namespace = "qcompile".
output: y, [..., N], the dtype of x.

Function bodies (opset 23) let a runtime with FP4 kernels run the nodes: Fp4Gemm is the weight DQ chain
-> Gemm(transB=1); Fp4GemmW4A4 is TensorRT's dynamic NVFP4 activation form
(`trt::TRT_FP4DynamicQuantize` -> DQ(scales, x_global) -> DQ(x, that)) feeding an Fp4Gemm. Our lowering maps
both to `torch.ops.qcompile.fp4_gemm` instead.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from qcompile.plugins.onnx_functions import declare_domain

DOMAIN = "qcompile"
OP_TYPE = "Fp4Gemm"
OP_TYPE_W4A4 = "Fp4GemmW4A4"
OP_TYPES = (OP_TYPE, OP_TYPE_W4A4)
VERSION = 1
INPUTS = ("x", "w_q", "w_scale", "w_global", "bias")
INPUTS_W4A4 = ("x", "w_q", "w_scale", "w_global", "x_global", "bias")
OUTPUTS = ("y",)
FUNCTION_OPSET = 23
TRT_DOMAIN = "trt"
TRT_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"


def attributes(block_size: int) -> dict:
    """The attributes every FP4 GEMM node carries."""
    return {"block_size": int(block_size), "plugin_version": str(VERSION), "plugin_namespace": DOMAIN}


def dynamic_quantize_attributes() -> dict:
    """Attributes of TensorRT's `trt::TRT_FP4DynamicQuantize` (axis must be set: the parser defaults to 1)."""
    return {"axis": -1, "block_size": 16, "scale_type": TensorProto.FLOAT8E4M3FN}


def make_node(name: str, inputs: list[str], outputs: list[str], block_size: int, w4a4: bool = False) -> onnx.NodeProto:
    """An Fp4Gemm (or Fp4GemmW4A4) NodeProto; `inputs` as in the module docstring ("" = absent)."""
    names = INPUTS_W4A4 if w4a4 else INPUTS
    required = len(names) - 1
    if not required <= len(inputs) <= len(names) or len(outputs) != 1 or not all(inputs[:required]):
        raise ValueError(f"{OP_TYPE_W4A4 if w4a4 else OP_TYPE} takes inputs {names} (all but bias required) "
                         "and one output")
    return helper.make_node(OP_TYPE_W4A4 if w4a4 else OP_TYPE, list(inputs), outputs, name=name, domain=DOMAIN,
                            **attributes(block_size))


def _block_ref():
    return helper.make_attribute_ref("block_size", onnx.AttributeProto.INT)


def _function(op_type: str, inputs, nodes, extra_opsets=()) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, op_type, list(inputs), list(OUTPUTS), nodes,
        opset_imports=[helper.make_opsetid("", FUNCTION_OPSET), *extra_opsets],
        attributes=["plugin_version", "plugin_namespace"],
        attribute_protos=[helper.make_attribute("block_size", 0)],
    )


def function_proto() -> onnx.FunctionProto:
    """Body of Fp4Gemm: the two-level weight DQ, then Gemm(transB=1) on x flattened to 2-D."""
    dq = helper.make_node("DequantizeLinear", ["w_q", "s"], ["wd"], axis=-1)
    dq.attribute.append(_block_ref())
    i64 = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))
    nodes = [
        helper.make_node("Cast", ["w_scale"], ["s32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s32", "w_global"], ["s_f"]),
        helper.make_node("CastLike", ["s_f", "x"], ["s"]),
        dq,
        helper.make_node("Flatten", ["x"], ["x2"], axis=-1),
        helper.make_node("Gemm", ["x2", "wd", "bias"], ["y2"], transB=1),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        i64("c0", [0]), i64("cm1", [-1]), i64("c1", [1]),
        helper.make_node("Slice", ["x_shape", "c0", "cm1"], ["lead"]),
        helper.make_node("Shape", ["wd"], ["w_shape"]),
        helper.make_node("Slice", ["w_shape", "c0", "c1"], ["n"]),
        helper.make_node("Concat", ["lead", "n"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["y2", "y_shape"], ["y"]),
    ]
    return _function(OP_TYPE, INPUTS, nodes)


def function_proto_w4a4() -> onnx.FunctionProto:
    """Body of Fp4GemmW4A4: TensorRT's NVFP4 dynamic activation quantization feeding an Fp4Gemm."""
    dq_x = helper.make_node("DequantizeLinear", ["x_f4", "sx"], ["xd32"], axis=-1, block_size=16)
    gemm = helper.make_node(OP_TYPE, ["xd", "w_q", "w_scale", "w_global", "bias"], ["y"], domain=DOMAIN)
    gemm.attribute.append(_block_ref())
    nodes = [
        helper.make_node(TRT_DYNAMIC_QUANTIZE, ["x", "x_global"], ["x_f4", "sx_f8"], domain=TRT_DOMAIN,
                         **dynamic_quantize_attributes()),
        helper.make_node("DequantizeLinear", ["sx_f8", "x_global"], ["sx"]),
        dq_x,
        helper.make_node("CastLike", ["xd32", "x"], ["xd"]),
        gemm,
    ]
    return _function(OP_TYPE_W4A4, INPUTS_W4A4, nodes,
                     [helper.make_opsetid(TRT_DOMAIN, 1), helper.make_opsetid(DOMAIN, VERSION)])


def add_to_model(model: onnx.ModelProto) -> None:
    """Declare the qcompile (and, for W4A4, trt) domains and the function bodies in `model` (idempotent)."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    wanted = [OP_TYPE] + ([OP_TYPE_W4A4] if OP_TYPE_W4A4 in used else [])
    declare_domain(model, DOMAIN, VERSION)
    if OP_TYPE_W4A4 in used:
        declare_domain(model, TRT_DOMAIN, 1)
    have = {(f.domain, f.name) for f in model.functions}
    for op_type, make in ((OP_TYPE, function_proto), (OP_TYPE_W4A4, function_proto_w4a4)):
        if op_type in wanted and (DOMAIN, op_type) not in have:
            model.functions.append(make())

