"""`to_float16`: the FP16 version of an FP32 ONNX graph, the reference an engine is validated against.

Float32 initializers, Constant values, Cast targets and intermediate value types become float16; graph
inputs and outputs keep their FP32 signature through Cast nodes at the edges, so that the FP16 graph takes
the same feeds as the FP32 graph and the engine. Inputs of ops that ONNX requires in float32 whatever the
data type (Resize scales, ...) stay float32.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
# (op type, input index) that ONNX defines as float32 regardless of the data type
_FLOAT32_INPUTS = {("Resize", 2)}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP16 copy of `model` with the same (FP32) inputs and outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    keep32 = {node.input[i] for node in graph.node for op, i in _FLOAT32_INPUTS
              if node.op_type == op and i < len(node.input)}
    for i, init in enumerate(graph.initializer):
        if init.data_type == FLOAT and init.name not in keep32:
            graph.initializer[i].CopyFrom(_as_float16(init))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT \
                    and not (node.op_type == "Constant" and node.output[0] in keep32):
                attr.t.CopyFrom(_as_float16(attr.t))
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == FLOAT and value.name not in keep32:
            value.type.tensor_type.elem_type = FLOAT16
    _cast_edges(graph)
    return out


def _as_float16(tensor: TensorProto) -> TensorProto:
    """`tensor` in float16; values beyond its range (a mask's -3.4e38) become infinities, as the engine's cast."""
    with np.errstate(over="ignore"):
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)


def _cast_edges(graph: onnx.GraphProto) -> None:
    """Cast FP32 graph inputs to FP16 on entry and FP16 results back to FP32 at the outputs."""
    renames = {}
    entry = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == FLOAT:
            renames[value.name] = f"{value.name}__fp16"
            entry.append(helper.make_node("Cast", [value.name], [renames[value.name]], to=FLOAT16,
                                          name=f"{value.name}__to_fp16"))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    exit_ = []
    for value in graph.output:
        if value.type.tensor_type.elem_type == FLOAT:
            inner = f"{value.name}__fp16"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == value.name:
                        node.output[i] = inner
                for i, name in enumerate(node.input):
                    if name == value.name:
                        node.input[i] = inner
            exit_.append(helper.make_node("Cast", [inner], [value.name], to=FLOAT, name=f"{value.name}__to_fp32"))
    nodes = entry + list(graph.node) + exit_
    del graph.node[:]
    graph.node.extend(nodes)
