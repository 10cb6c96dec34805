"""The qcompile plugin nodes: `qcompile::ScaledGemm` -> `torch.ops.qcompile.scaled_gemm`,
`qcompile::DynamicScaledGemm` (x, x_zero_point, w_q, w_scale, bias) -> `torch.ops.qcompile.scaled_gemm_dynamic`.

Inputs follow `qcompile.plugins.scaled_gemm.onnx_schema` (x, x_scale, x_zero_point, w_q, w_scale,
bias); the op takes `(x, w_q, w_scale, x_scale, bias)`: scales as float32 (`w_scale` [N] or [],
`x_scale` []), bias None when the node's bias initializer is all zeros. The activation format is
w_q's dtype (the zero point only declares it in ONNX).
"""
from __future__ import annotations

import torch
from onnx import numpy_helper

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.scaled_gemm import dynamic_schema, onnx_schema


@reg(onnx_schema.OP_TYPE, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN)
def scaled_gemm(ctx, x, x_scale, x_zero_point, w_q, w_scale, bias=None):
    import qcompile.plugins.scaled_gemm.op  # noqa: F401  (registers torch.ops.qcompile.scaled_gemm)

    x, w_q = as_tensor(x), as_tensor(w_q)
    if x_zero_point is not None and as_tensor(x_zero_point).dtype != w_q.dtype:
        raise ctx.fail(f"activation format {as_tensor(x_zero_point).dtype} (x_zero_point) differs from the "
                       f"weight format {w_q.dtype}; the plugin runs both in one format")
    if bias is not None and _is_zero_constant(ctx.extra.get("initializers", {}).get(5)):
        bias = None
    w_scale = as_tensor(w_scale).float()
    if w_scale.numel() == 1:
        w_scale = w_scale.reshape(())  # per-tensor
    x_scale = None if x_scale is None else as_tensor(x_scale).float().reshape(())
    return torch.ops.qcompile.scaled_gemm(x, w_q, w_scale, x_scale, None if bias is None else as_tensor(bias))


@reg(dynamic_schema.OP_TYPE, since=dynamic_schema.VERSION, domain=dynamic_schema.DOMAIN)
def dynamic_scaled_gemm(ctx, x, x_zero_point, w_q, w_scale, bias=None):
    import qcompile.plugins.scaled_gemm.op  # noqa: F401  (registers torch.ops.qcompile.scaled_gemm_dynamic)

    x, w_q = as_tensor(x), as_tensor(w_q)
    if as_tensor(x_zero_point).dtype != w_q.dtype:
        raise ctx.fail(f"activation format {as_tensor(x_zero_point).dtype} (x_zero_point) differs from the "
                       f"weight format {w_q.dtype}; the plugin runs both in one format")
    if bias is not None and _is_zero_constant(ctx.extra.get("initializers", {}).get(4)):
        bias = None
    w_scale = as_tensor(w_scale).float()
    w_scale = w_scale.reshape(()) if w_scale.numel() == 1 else w_scale
    return torch.ops.qcompile.scaled_gemm_dynamic(x, w_q, w_scale, None if bias is None else as_tensor(bias))


def _is_zero_constant(proto) -> bool:
    """Whether an initializer is all zeros (a fused GEMM without bias gets a zero bias)."""
    return proto is not None and not numpy_helper.to_array(proto).any()
