"""The groupwise INT4 weight-only GEMM plugin (W4A16): int4 weights, float activations.

Plugin contract (format; `format.py` has the layouts in full):

- ONNX node `qcompile::Int4GroupwiseGemm` v1 (`onnx_schema`): inputs `x [..., K]` float,
  `w_q [K, N]` INT4 (or UINT4) in ONNX's own 4-bit type (row-major, two per byte, first element in the
  low nibble), `w_scale [K/g, N]` float, optional `w_zero_point [K/g, N]` of w_q's type, optional
  `bias [N]`; attributes `block_size = g`, `plugin_version = "1"`, `plugin_namespace = "qcompile"`.
  Its function body is `DequantizeLinear(w_q, w_scale, w_zero_point, axis=0, block_size=g)` -> MatMul
  -> Add(bias).
- op `torch.ops.qcompile.int4_groupwise_gemm(x, w_packed, w_scale, w_zero, bias, group_size)`:
  * `x`: float32 / float16 / bfloat16 `[..., K]`, any number of rows M (dynamic);
  * `w_packed`: engine layout, int32 `[K/8, N]`, word `[i, n]` holds `q[8i + j, n]` (signed nibble,
    two's complement) in bits 4j..4j+3, K a multiple of 8;
  * `w_scale`: float32/float16/bfloat16 `[K/g, N]`, strictly positive;
  * `w_zero`: int8 `[K/g, N]` (integer zero point, one per byte) or None (symmetric);
  * `bias`: `[N]` float or None; `group_size` g divides K (32, 64, 128, or K = per channel).
- semantics: `dequant(W)[k, n] = (q[k, n] - zp[k // g, n]) * scale[k // g, n]`,
  `y = x @ dequant(W) + bias`, accumulated in float32, returned in x.dtype, shape `[..., N]`.
  UINT4 weights enter the engine as `q - 8` with `zp - 8` (a UINT4 weight without zero point: zp = -8).
- GPU: split-K Triton kernel for M <= 16 (weights streamed once), dequantize + cuBLAS above.

Faces: `format` (pack/unpack, ONNX <-> engine layout), `reference` (plain torch: CPU path and oracle),
`kernel` (Triton, CUDA only, imported lazily), `op` (the `triton_op`), `onnx_schema` (the ONNX node).
"""
from __future__ import annotations

import importlib

from qcompile.plugins.int4_gemm.reference import dequantize_weight, int4_gemm_reference

__all__ = ["int4_gemm_reference", "dequantize_weight", "op", "int4_groupwise_gemm", "register"]


def register():
    """Register `torch.ops.qcompile.int4_groupwise_gemm` (idempotent) and return the op."""
    return importlib.import_module("qcompile.plugins.int4_gemm.op").int4_groupwise_gemm


def __getattr__(name):
    if name == "op":
        return importlib.import_module("qcompile.plugins.int4_gemm.op")
    if name == "int4_groupwise_gemm":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
