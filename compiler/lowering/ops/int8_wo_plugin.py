"""`qcompile::Int8WeightOnlyGemm` -> `torch.ops.qcompile.int8_weight_only_gemm`.

Inputs follow `qcompile.plugins.int8_wo_gemm.onnx_schema` (x, w_q, w_scale, bias). The ONNX INT8 weight is
the engine layout (int8 [K, N]); the bias becomes None when its initializer is all zeros.
"""
from __future__ import annotations

import torch
from onnx import numpy_helper

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.int8_wo_gemm import onnx_schema

BIAS = 3  # input index of the bias


def zero_initializer(ctx, index: int) -> bool:
    """Whether input `index` of the node is an all-zero initializer (a fused GEMM without bias gets zeros)."""
    proto = ctx.extra.get("initializers", {}).get(index)
    return proto is not None and not numpy_helper.to_array(proto).any()


@reg(onnx_schema.OP_TYPE, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN)
def int8_weight_only_gemm(ctx, x, w_q, w_scale, bias=None):
    import qcompile.plugins.int8_wo_gemm.op  # noqa: F401  (registers torch.ops.qcompile.int8_weight_only_gemm)

    w_q = as_tensor(w_q)
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ctx.fail(f"w_q must be INT8 [K, N], got {w_q.dtype} {tuple(w_q.shape)}")
    w_scale = as_tensor(w_scale).reshape(-1)
    if bias is not None and zero_initializer(ctx, BIAS):
        bias = None
    return torch.ops.qcompile.int8_weight_only_gemm(as_tensor(x), w_q, w_scale,
                                                     None if bias is None else as_tensor(bias))
