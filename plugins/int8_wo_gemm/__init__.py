"""The INT8 weight-only GEMM plugin (W8A16): int8 weights per output channel, float activations.

Plugin contract:

- ONNX node `qcompile::Int8WeightOnlyGemm` v1 (`onnx_schema`): inputs `x [..., K]` float, `w_q [K, N]` INT8
  (row-major, N contiguous: ONNX's and TensorRT's weight-only layout, kept as is in the engine), `w_scale [N]`
  float32, `bias [N]` float32 (zeros when the GEMM had none); attributes `plugin_version = "1"`,
  `plugin_namespace = "qcompile"`. Function body: `DequantizeLinear(w_q, w_scale, axis=1)` -> MatMul -> Add.
- op `torch.ops.qcompile.int8_weight_only_gemm(x, w_q, w_scale, bias)`:
  * `x`: float32 / float16 / bfloat16 `[..., K]`, any number of rows M (dynamic);
  * `w_q`: int8 `[K, N]`, symmetric (zero point 0), N contiguous;
  * `w_scale`: float `[N]`, strictly positive; `bias`: float `[N]` or None.
- semantics: `y = x @ (w_q * w_scale[None, :]) + bias`, accumulated in float32, returned in x.dtype, `[..., N]`.
- GPU: split-K Triton kernel for M <= 16 (the weight streamed once, int8 -> x.dtype in registers, the
  per-channel scale applied once to the float32 sums), dequantize + cuBLAS above (`kernel.py`).

Faces: `reference` (plain torch: CPU path and oracle), `kernel` (Triton, CUDA only, imported lazily),
`op` (the `triton_op`), `onnx_schema` (the ONNX node). There is no packing: the ONNX INT8 layout is the
engine layout.
"""
from __future__ import annotations

import importlib

from qcompile.plugins.int8_wo_gemm.reference import int8_wo_gemm_reference

__all__ = ["int8_wo_gemm_reference", "register"]


def register():
    """Register `torch.ops.qcompile.int8_weight_only_gemm` (idempotent) and return the op."""
    return importlib.import_module("qcompile.plugins.int8_wo_gemm.op").int8_weight_only_gemm
