"""ONNX TensorProto dtype codes -> torch dtypes, and the float8 types' largest finite values."""
from __future__ import annotations

import onnx
import torch

_MAP = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    onnx.TensorProto.INT4: torch.int8, onnx.TensorProto.UINT4: torch.uint8,
    onnx.TensorProto.FLOAT4E2M1: torch.float32,  # the lowering holds FP4 as its (exact) float values
    onnx.TensorProto.UINT16: torch.int32, onnx.TensorProto.UINT32: torch.int64,
}

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def onnx_to_torch_dtype(code: int) -> torch.dtype:
    try:
        return _MAP[code]
    except KeyError:
        raise ValueError(f"ONNX dtype {onnx.TensorProto.DataType.Name(code)} is not supported") from None
