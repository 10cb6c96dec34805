"""The qcompile plugin nodes: `qcompile::ScaledGemm` -> `torch.ops.qcompile.scaled_gemm`."""
from __future__ import annotations

import torch

from onnx import numpy_helper

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.scaled_gemm import onnx_schema


@reg(onnx_schema.OP_TYPE, since=1, domain=onnx_schema.DOMAIN)
def scaled_gemm(ctx, x, x_scale, x_zero_point, w_q, w_scale, bias):
    import qcompile.plugins.scaled_gemm.op  # noqa: F401  (registers torch.ops.qcompile.scaled_gemm)

    x = as_tensor(x)
    if bias is not None and _is_zero_constant(ctx.extra.get("initializers", {}).get(5)):
        bias = None
    w_scale = as_tensor(w_scale).float()
    if w_scale.numel() == 1:
        w_scale = w_scale.reshape(())  # per-tensor
    return torch.ops.qcompile.scaled_gemm(x, as_tensor(w_q), w_scale,
                                          as_tensor(x_scale).float(), None if bias is None else as_tensor(bias))


def _is_zero_constant(proto) -> bool:
    """Whether an initializer is all zeros (a fused GEMM without bias gets a zero bias)."""
    return proto is not None and not numpy_helper.to_array(proto).any()
