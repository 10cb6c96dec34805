"""The per-layer table: which layers were quantized, how, and what it saved.

Read off the final (plugin) ONNX model, so it describes what the engine really runs:
the qcompile plugin nodes (ScaledGemm, DynamicScaledGemm, Int4GroupwiseGemm, Fp4Gemm(W4A4), Int8WeightOnlyGemm,
Fp8BlockGemm) and GEMM/Conv nodes whose weight is still a
DequantizeLinear of a quantized initializer (simulated Q/DQ).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from qcompile.plugins.formats import format_of_onnx_dtype
from qcompile.plugins.fp4_gemm import onnx_schema as fp4_schema
from qcompile.plugins.fp8_block_gemm import onnx_schema as fp8_block_schema
from qcompile.plugins.int4_gemm import onnx_schema as int4_schema
from qcompile.plugins.int8_wo_gemm import onnx_schema as int8_wo_schema
from qcompile.plugins.scaled_gemm import dynamic_schema, onnx_schema

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# plugin nodes with inputs (x, w_q, w_scale, ...): op type -> (format, granularity) of their rows
_WEIGHT_SCALE_PLUGINS = {int8_wo_schema.OP_TYPE: ("int8/fp16", "channel/-"),
                         fp8_block_schema.OP_TYPE: ("fp8/fp8", "block128x128/block1x128")}
# Int4GroupwiseGemm's act_quant -> (activation format, activation granularity) of its rows (W4A16 / W4A8)
_INT4_ACTIVATIONS = {"none": ("fp16", "-"), "fp8_static": ("fp8", "tensor"), "fp8_dynamic": ("fp8", "token")}


@dataclass
class LayerRow:
    node: str
    op: str
    module: str
    format: str          # "weight/activation", e.g. "int8/int8"; "fp16" when not quantized
    granularity: str     # "weight/activation", e.g. "channel/tensor"
    bytes_before: int    # float32 weight bytes
    bytes_after: int     # quantized weight + scale bytes
    plugin: str          # "qcompile::ScaledGemm", or "Q/DQ (dequantize + float op)"

    def to_dict(self) -> dict:
        return asdict(self)


def layer_table(model: onnx.ModelProto) -> list[LayerRow]:
    """One row per quantized layer of `model` (a plugin or Q/DQ ONNX model)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for node in model.graph.node:
        module = module_of(node)
        if node.domain == onnx_schema.DOMAIN and node.op_type == onnx_schema.OP_TYPE:
            x_zp, w_q, w_scale = (inits.get(node.input[i]) for i in (2, 3, 4))
            if w_q is None or w_scale is None:
                continue
            w_fmt = format_of_onnx_dtype(w_q.data_type) or "?"
            a_fmt = format_of_onnx_dtype(x_zp.data_type) if x_zp is not None else "fp16"
            rows.append(LayerRow(node.name, "ScaledGemm", module, f"{w_fmt}/{a_fmt}",
                                 f"{_granularity(w_scale)}/tensor", _numel(w_q) * 4,
                                 _nbytes(w_q) + _nbytes(w_scale),
                                 f"{onnx_schema.DOMAIN}::{onnx_schema.OP_TYPE}"))
        elif node.domain == dynamic_schema.DOMAIN and node.op_type == dynamic_schema.OP_TYPE:
            x_zp, w_q, w_scale = (inits.get(node.input[i]) for i in (1, 2, 3))
            if w_q is None or w_scale is None:
                continue
            w_fmt = format_of_onnx_dtype(w_q.data_type) or "?"
            rows.append(LayerRow(node.name, dynamic_schema.OP_TYPE, module,
                                 f"{w_fmt}/{format_of_onnx_dtype(x_zp.data_type) if x_zp is not None else '?'}",
                                 f"{_granularity(w_scale)}/token", _numel(w_q) * 4, _nbytes(w_q) + _nbytes(w_scale),
                                 f"{dynamic_schema.DOMAIN}::{dynamic_schema.OP_TYPE}"))
        elif node.domain == int4_schema.DOMAIN and node.op_type == int4_schema.OP_TYPE:
            w_q, w_scale = inits.get(node.input[1]), inits.get(node.input[2])
            if w_q is None or w_scale is None:
                continue
            w_zero = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
            a_fmt, a_gran = _INT4_ACTIVATIONS[int4_schema.act_quant_of(
                {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})]
            rows.append(LayerRow(node.name, int4_schema.OP_TYPE, module,
                                 f"{'int4' if w_zero is None else 'uint4'}/{a_fmt}", f"group{block}/{a_gran}",
                                 _numel(w_q) * 4,
                                 _nbytes(w_q) + _nbytes(w_scale) + (_nbytes(w_zero) if w_zero is not None else 0),
                                 f"{int4_schema.DOMAIN}::{int4_schema.OP_TYPE}"))
        elif node.domain == fp4_schema.DOMAIN and node.op_type in fp4_schema.OP_TYPES:
            w_q, w_scale = inits.get(node.input[1]), inits.get(node.input[2])
            if w_q is None or w_scale is None:
                continue
            block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
            w_fmt = "nvfp4" if w_scale.data_type == onnx.TensorProto.FLOAT8E4M3FN else "mxfp4"
            w4a4 = node.op_type == fp4_schema.OP_TYPE_W4A4
            rows.append(LayerRow(node.name, node.op_type, module, f"{w_fmt}/{'nvfp4' if w4a4 else 'fp16'}",
                                 f"block{block}/{'block16' if w4a4 else '-'}", _numel(w_q) * 4,
                                 _nbytes(w_q) + _nbytes(w_scale), f"{fp4_schema.DOMAIN}::{node.op_type}"))
        elif node.domain == onnx_schema.DOMAIN and node.op_type in _WEIGHT_SCALE_PLUGINS:
            w_q, w_scale = inits.get(node.input[1]), inits.get(node.input[2])
            if w_q is None or w_scale is None:
                continue
            fmt, gran = _WEIGHT_SCALE_PLUGINS[node.op_type]
            rows.append(LayerRow(node.name, node.op_type, module, fmt, gran, _numel(w_q) * 4,
                                 _nbytes(w_q) + _nbytes(w_scale), f"{onnx_schema.DOMAIN}::{node.op_type}"))
        elif node.op_type in WEIGHTED_OPS and len(node.input) > 1:
            w_dq = producers.get(node.input[1])
            if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] not in inits:
                continue
            w_q, w_scale = inits[w_dq.input[0]], inits.get(w_dq.input[1])
            x_dq = producers.get(node.input[0])
            a_fmt = "fp16"
            if x_dq is not None and x_dq.op_type == "DequantizeLinear" and len(x_dq.input) > 2:
                zp = inits.get(x_dq.input[2])
                a_fmt = format_of_onnx_dtype(zp.data_type) if zp is not None else "int8"
            elif x_dq is not None and x_dq.op_type == "DequantizeLinear":
                a_fmt = "uint8"
            scale_bytes = _nbytes(w_scale) if w_scale is not None else 0
            rows.append(LayerRow(node.name, node.op_type, module,
                                 f"{format_of_onnx_dtype(w_q.data_type) or '?'}/{a_fmt}",
                                 f"{_granularity(w_scale) if w_scale is not None else '?'}/tensor",
                                 _numel(w_q) * 4, _nbytes(w_q) + scale_bytes,
                                 "Q/DQ (dequantize + float op)"))
    return rows


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Total bytes of the model's initializers as stored (4-bit types count half a byte)."""
    return sum(_nbytes(t) for t in model.graph.initializer)


def module_of(node: onnx.NodeProto) -> str:
    return next((p.value for p in node.metadata_props if p.key == "qcompile.module"), "")


def _numel(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        return (_numel(t) + 1) // 2
    return _numel(t) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _granularity(scale: onnx.TensorProto) -> str:
    size = _numel(scale)
    if size == 1:
        return "tensor"
    return "channel" if len(scale.dims) == 1 else "block"
