"""The groupwise INT4 GEMM plugin: int4 weights with float activations (W4A16) or FP8 E4M3 activations (W4A8).

Plugin contract, version 2 (format; `format.py` has the layouts in full). Version 2 adds W4A8 (the optional
`x_scale` input / op arguments and `act_quant`); a version-1 node or call is a version-2 one with
act_quant "none", and W4A16 nodes are still written as version 1.

- ONNX node `qcompile::Int4GroupwiseGemm` (`onnx_schema`): inputs `x [..., K]` float,
  `w_q [K, N]` INT4 (or UINT4) in ONNX's own 4-bit type (row-major, two per byte, first element in the
  low nibble), `w_scale [K/g, N]` float, optional `w_zero_point [K/g, N]` of w_q's type, optional
  `bias [N]`, optional `x_scale` (float scalar, x's dtype; act_quant "fp8_static" only); attributes
  `block_size = g`, `plugin_version` ("1", or "2" with act_quant), `plugin_namespace = "qcompile"`,
  `act_quant` = "none" | "fp8_static" | "fp8_dynamic". Its function bodies (one overload per act_quant) are
  [FP8 Q/DQ of x ->] `DequantizeLinear(w_q, w_scale, w_zero_point, axis=0, block_size=g)` -> MatMul -> Add(bias).
- op `torch.ops.qcompile.int4_groupwise_gemm(x, w_packed, w_scale, w_zero, bias, group_size,
  x_scale=None, x_dynamic=False, fp8_large_m=False)`:
  * `x`: float32 / float16 / bfloat16 `[..., K]`, any number of rows M (dynamic);
  * `w_packed`: engine layout, int32 `[K/8, N]` of signed (two's complement) nibbles, K a multiple of 8: when K
    and g are multiples of 64 the planar order (in each 64 K, word c holds k = 16 j + 2 c + t in nibble j + 4 t),
    else word `[i, n]` holds `q[8i + j, n]` in bits 4j..4j+3 (`format.py`, `format.to_engine(q, g)`);
  * `w_scale`: float32/float16/bfloat16 `[K/g, N]`, strictly positive;
  * `w_zero`: int8 `[K/g, N]` (integer zero point, one per byte) or None (symmetric);
  * `bias`: `[N]` float or None; `group_size` g divides K (32, 64, 128, or K = per channel);
  * `x_scale`: float scalar tensor (static per-tensor FP8 scale) or None; `x_dynamic`: per-row dynamic FP8
    (x_scale must then be None). Neither: W4A16;
  * `fp8_large_m`: calls of more than 128 rows run the FP8 path of `plugins/fp8_large_m.py` (W and, for W4A16, x
    rounded to FP8 there; the semantics below hold up to that rounding; emulated off CUDA).
- semantics: `dequant(W)[k, n] = (q[k, n] - zp[k // g, n]) * scale[k // g, n]`,
  `y = A(x) @ dequant(W) + bias`, accumulated in float32, returned in x.dtype, shape `[..., N]`, where A is
  the identity (W4A16) or FP8 E4M3 quantize-dequantize with ONNX QuantizeLinear rules (x / s in float32,
  saturate to ±448, round to nearest even): s = x_scale, or per row s[m] = max(amax(|x[m, :]|) / 448,
  float32 tiny) (`plugins.formats.dynamic_row_scales`).
  UINT4 weights enter the engine as `q - 8` with `zp - 8` (a UINT4 weight without zero point: zp = -8).
- W4A8 inside the op: x is quantized with aten ops (fused by AOTInductor into the kernel that produces x) into
  `xq` float8_e4m3fn [M, K] and `x_row_scale` float32 [M] (the static scale repeated, or the dynamic ones);
  CPU: `reference.int4_gemm_w4a8_reference`; CUDA: `int4_gemm_triton(xq, w_packed, w_scale, w_zero, bias, g,
  x_row_scale=x_row_scale, out_dtype=x.dtype, wrap=torch.library.wrap_triton, num_sms=...)`.
- GPU (W4A16): split-K Triton kernel for M <= 16 (weights streamed once), dequantize + cuBLAS above.

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
