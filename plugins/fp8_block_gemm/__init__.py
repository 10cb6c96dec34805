"""The FP8 block-scaled GEMM plugin (DeepSeek-V3 style): FP8 E4M3 weights in 128x128 blocks and FP8 E4M3
activations in dynamic 1x128 blocks, FP32 scales (tensorrt-conventions.md §3.4).

Plugin contract (`format.py` has the quantizers):

- ONNX node `qcompile::Fp8BlockGemm` v1 (`onnx_schema`): inputs `x [..., K]` float (not quantized: the
  plugin quantizes it), `w_q [N, K]` FLOAT8E4M3FN (K contiguous, TensorRT-LLM's `b`), `w_scale [N/128, K/128]`
  float32, `bias [N]` float32 (zeros when the GEMM had none); attributes `plugin_version = "1"`,
  `plugin_namespace = "qcompile"`. K and N are multiples of 128.
- op `torch.ops.qcompile.fp8_block_gemm(x, w_q, w_scale, bias)`:
  * `x`: float32 / float16 / bfloat16 `[..., K]`, any number of rows M;
  * `w_q`: float8_e4m3fn `[N, K]`; `w_scale`: float32 `[N/128, K/128]`, strictly positive; `bias`: `[N]` or None.
- semantics: per row m and 128-column block j of x, `sx[m, j] = max(amax|x[m, 128j:128j+128]| / 448, tiny)`,
  `xq = fp8(clamp(x / sx, ±448))` (round to nearest even), and
  `y[m, n] = sum_j sx[m, j] * w_scale[n // 128, j] * (xq[m, block j] . w_q[n, block j]) + bias[n]`,
  in float32, returned in x.dtype.
- GPU: sm90 -> `torch.nn.functional.scaled_mm` with `BlockWise1x128` x `BlockWise128x128` scales (cuBLASLt);
  other CUDA GPUs -> a Triton kernel (FP8 dots per 128-K block, scales applied to the float32 partial sums).
- CPU: the plain-torch reference (block-quantize x, float32 math).
"""
from __future__ import annotations

import importlib

from qcompile.plugins.fp8_block_gemm import onnx_schema
from qcompile.plugins.fp8_block_gemm.format import BLOCK, quantize_activation_blocks, quantize_weight_blocks
from qcompile.plugins.fp8_block_gemm.reference import fp8_block_gemm_reference

__all__ = ["BLOCK", "onnx_schema", "quantize_activation_blocks", "quantize_weight_blocks", "fp8_block_gemm_reference", "register"]


def register():
    """Register `torch.ops.qcompile.fp8_block_gemm` (idempotent) and return the op."""
    return importlib.import_module("qcompile.plugins.fp8_block_gemm.op").fp8_block_gemm
