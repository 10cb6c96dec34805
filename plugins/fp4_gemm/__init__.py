"""The FP4 GEMM plugin (NVFP4, MXFP4): FP4 weights decompressed in the kernel, float activations.

Plugin contract (`format.py` has the number formats and layouts in full):

- ONNX nodes `qcompile::Fp4Gemm` / `qcompile::Fp4GemmW4A4` v1 (`onnx_schema`): inputs `x [..., K]`,
  `w_q [N, K]` FLOAT4E2M1 (TensorRT's [out, in] layout), `w_scale [N, K/B]` (FLOAT8E4M3FN for NVFP4,
  FP32 powers of two for MXFP4), `w_global` FP32 scalar (1.0 for MXFP4), `x_global` (W4A4 only), optional
  `bias [N]`; attributes `block_size = B`, `plugin_version = "1"`, `plugin_namespace = "qcompile"`.
- op `torch.ops.qcompile.fp4_gemm(x, w_packed, w_scale, w_global, x_global, bias, block_size, fp8_large_m=False)`:
  * `x`: float32 / float16 / bfloat16 `[..., K]`, any number of rows M (dynamic);
  * `w_packed`: uint8 `[N, K/2]`, byte `[n, j]` = code(k=2j) | code(k=2j+1) << 4 (the ONNX bytes), or int32
    `[N, K/8]` planar words for K a multiple of 128 (`format.to_planar_words`: the one-dot kernel's layout; the
    lowering stores it for CUDA engines, `lowering.LoweringOptions.fp4_layout`);
  * `w_scale`: `[N, K/B]`, torch.float8_e4m3fn (NVFP4, B = 16) or uint8 E8M0 bits (MXFP4, B = 32);
  * `w_global`: float32 scalar (NVFP4) or None (MXFP4);
  * `x_global`: None (weight-only) or the float32 NVFP4 activation global scale: x is fake-quantized with
    dynamic per-16 E4M3 block scales first (the Blackwell W4A4 numerics; `format.nvfp4_fake_quantize`);
  * `bias`: `[N]` float or None;
  * `fp8_large_m`: calls of more than 128 rows run the FP8 path of `plugins/fp8_large_m.py` (W and x rounded to FP8
    there; the semantics below hold up to that rounding; emulated off CUDA).
- semantics: `W[n, k] = e2m1(w[n, k]) * scale[n, k // B] * (w_global or 1)`, `y = x_hat @ W.T + bias`,
  accumulated in float32, returned in x.dtype, shape `[..., N]`.

Faces: `format`, `reference` (plain torch: the oracle and the CPU path), `kernel` (Triton, CUDA only, imported
lazily: weights decompressed in registers; split-K / tiled / dequantize + cuBLAS by M), `gemv` (M = 1), `planar`
and `one_dot` (planar words: their decoding, and one tensor-core MMA per 128-K step), `op` (the `triton_op`),
`onnx_schema` (the ONNX nodes).
"""
from __future__ import annotations

import importlib

from qcompile.plugins.fp4_gemm.reference import dequantize_weight, fp4_gemm_reference

__all__ = ["fp4_gemm_reference", "dequantize_weight", "op", "fp4_gemm", "register"]


def register():
    """Register `torch.ops.qcompile.fp4_gemm` (idempotent) and return the op."""
    return importlib.import_module("qcompile.plugins.fp4_gemm.op").fp4_gemm


def __getattr__(name):
    if name == "op":
        return importlib.import_module("qcompile.plugins.fp4_gemm.op")
    if name == "fp4_gemm":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
