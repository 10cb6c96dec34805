"""The INT8 weight-only GEMM plugin (W8A16): int8 weights per output channel, float activations.

Plugin contract:

- ONNX node `qcompile::Int8WeightOnlyGemm` v1 (`onnx_schema`): inputs `x [..., K]` float, `w_q [K, N]` INT8
  (row-major, N contiguous: ONNX's and TensorRT's weight-only layout), `w_scale [N]`
  float32, `bias [N]` float32 (zeros when the GEMM had none); attributes `plugin_version = "1"`,
  `plugin_namespace = "qcompile"`. Function body: `DequantizeLinear(w_q, w_scale, axis=1)` -> MatMul -> Add.
- op `torch.ops.qcompile.int8_weight_only_gemm(x, w_q, w_scale, bias)`:
  * `x`: float32 / float16 / bfloat16 `[..., K]`, any number of rows M (dynamic);
  * `w_q`: int8 `[N, K]`, symmetric (zero point 0), K contiguous: the engine layout, the transpose of the ONNX
    weight (the lowering transposes it once, when the graph is lowered), so each output feature's weights are
    one contiguous run of memory;
  * `w_scale`: float `[N]`, strictly positive; `bias`: float `[N]` or None.
- semantics: `y = x @ (w_q * w_scale[:, None])^T + bias`, accumulated in float32, returned in x.dtype,
  `[..., N]`.
- GPU (`kernel.py`): up to 16 rows, on layers wide enough to fill the GPU with wide tiles, the INT8 tensor cores
  on x split into two int8 planes (`split_mma.py`); else a GEMV at M = 1 and a tensor-core kernel up to 16 rows.
  Each program owns whole weight rows, scale, bias and cast in the kernel; a tiled kernel and dequantize +
  cuBLAS above 16 rows.

Faces: `reference` (plain torch: CPU path and oracle), `kernel` and `split_mma` (Triton, CUDA only, imported lazily),
`op` (the `triton_op`), `onnx_schema` (the ONNX node). There is no packing: the engine layout is the
transposed ONNX weight.
"""
from __future__ import annotations

import importlib

from qcompile.plugins.int8_wo_gemm.reference import int8_wo_gemm_reference

__all__ = ["int8_wo_gemm_reference", "register"]


def register():
    """Register `torch.ops.qcompile.int8_weight_only_gemm` (idempotent) and return the op."""
    return importlib.import_module("qcompile.plugins.int8_wo_gemm.op").int8_weight_only_gemm
