"""The scaled-GEMM plugin: W8A8 GEMMs with int8 or fp8 (e4m3fn) weights and activations.

Plugin contract (format):

- weight `w_q`: int8 or float8_e4m3fn, shape [N, K], K contiguous (cuBLAS "TN"); its dtype is also the
  activation format.
- weight scale `w_scale`: float32, [N] (per output channel) or [] (per tensor), strictly positive.
- activation scale `x_scale`: float32 [] (static, calibrated, per tensor); None is reserved for
  weight-only (the weight is dequantized, x is not quantized).
- zero points: always 0 (symmetric). In the ONNX node the activation zero point is an explicit 0-valued
  scalar whose dtype selects the format; the weight carries no zero point.
- bias: [N] float (float32 in the ONNX node; zeros there when the layer has none), or None.
- semantics: `xq = QuantizeLinear(x, x_scale)` (int8: x / scale, round half to even, saturate to
  [-128, 127]; fp8: saturate to ±448, cast to e4m3fn), `acc = xq @ w_q.T` accumulated exactly (int32 / fp32),
  `y = acc * (x_scale * w_scale[n]) + bias[n]`, returned in x.dtype (fp32 / fp16 / bf16) with shape [..., N].

Faces: `onnx_schema` (the ONNX node, with a DQ+MatMul function body), `reference` (plain torch: CPU path and
oracle), `op` (`torch.ops.qcompile.scaled_gemm`, a
`triton_op`; importing it registers the op).
"""
from __future__ import annotations

import importlib

from qcompile.plugins.formats import quantize_activation  # re-exported: the activation quantizer it runs
from qcompile.plugins.scaled_gemm.reference import scaled_gemm_reference

__all__ = ["scaled_gemm_reference", "quantize_activation", "op", "scaled_gemm", "register"]


def register():
    """Register `torch.ops.qcompile.scaled_gemm` (idempotent) and return the op."""
    return importlib.import_module("qcompile.plugins.scaled_gemm.op").scaled_gemm


def __getattr__(name):
    if name == "op":
        return importlib.import_module("qcompile.plugins.scaled_gemm.op")
    if name == "scaled_gemm":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
