"""`qcompile::Int8WeightOnlyGemm` -> `torch.ops.qcompile.int8_weight_only_gemm`.

Inputs follow `qcompile.plugins.int8_wo_gemm.onnx_schema` (x, w_q, w_scale, bias). The ONNX INT8 weight [K, N]
becomes the engine layout, int8 [N, K] (K contiguous), by one transpose. For an initializer weight (the normal
case) the `prepare` hook does it once, when the graph is lowered, so exported programs and engines hold only the
engine layout; a weight computed in the graph is transposed in the traced forward instead. The bias becomes None
when its initializer is all zeros.
"""
from __future__ import annotations

import torch
from onnx import numpy_helper

from qcompile.lowering.registry import Prepared
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.int8_wo_gemm import onnx_schema

W_Q, BIAS = 1, 3  # input indices of the weight and the bias


def zero_initializer(ctx, index: int) -> bool:
    """Whether input `index` of the node is an all-zero initializer (a fused GEMM without bias gets zeros)."""
    proto = ctx.extra.get("initializers", {}).get(index)
    return proto is not None and not numpy_helper.to_array(proto).any()


def _engine_weight(ctx, w_q: torch.Tensor) -> torch.Tensor:
    """The engine weight int8 [N, K] of the node's ONNX weight int8 [K, N]."""
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ctx.fail(f"w_q must be INT8 [K, N], got {w_q.dtype} {tuple(w_q.shape)}")
    return w_q.t().contiguous()


def _prepare(ctx, constants: dict[int, torch.Tensor]) -> Prepared | None:
    """The engine weight, once, from a constant w_q; None when it is computed in the graph."""
    if W_Q not in constants:
        return None
    return Prepared({"w_q": _engine_weight(ctx, constants[W_Q])}, replaces=(W_Q,))


@reg(onnx_schema.OP_TYPE, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN, prepare=_prepare)
def int8_weight_only_gemm(ctx, x, w_q, w_scale, bias=None, *, prepared=None):
    import qcompile.plugins.int8_wo_gemm.op  # noqa: F401  (registers torch.ops.qcompile.int8_weight_only_gemm)

    w_q = prepared["w_q"] if prepared is not None else _engine_weight(ctx, as_tensor(w_q))
    w_scale = as_tensor(w_scale).reshape(-1)
    if bias is not None and zero_initializer(ctx, BIAS):
        bias = None
    return torch.ops.qcompile.int8_weight_only_gemm(as_tensor(x), w_q, w_scale,
                                                     None if bias is None else as_tensor(bias))
