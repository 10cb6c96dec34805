"""`qcompile::Fp8BlockGemm` -> `torch.ops.qcompile.fp8_block_gemm`.

Inputs follow `qcompile.plugins.fp8_block_gemm.onnx_schema` (x, w_q fp8 [N, K], w_scale [N/128, K/128], bias);
the scale goes to the op as float32 (the interpreter keeps it float32 under an fp16 compute dtype), the bias
becomes None when its initializer is all zeros.
"""
from __future__ import annotations

import torch

from qcompile.lowering.ops.int8_wo_plugin import zero_initializer
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.fp8_block_gemm import onnx_schema

BIAS = 3  # input index of the bias


@reg(onnx_schema.OP_TYPE, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN)
def fp8_block_gemm(ctx, x, w_q, w_scale, bias=None):
    import qcompile.plugins.fp8_block_gemm.op  # noqa: F401  (registers torch.ops.qcompile.fp8_block_gemm)

    w_q = as_tensor(w_q)
    if w_q.dtype != torch.float8_e4m3fn or w_q.dim() != 2 or w_q.shape[0] % onnx_schema.BLOCK \
            or w_q.shape[1] % onnx_schema.BLOCK:
        raise ctx.fail(f"w_q must be FLOAT8E4M3FN [N, K] with N, K multiples of {onnx_schema.BLOCK}, got "
                       f"{w_q.dtype} {tuple(w_q.shape)}")
    if bias is not None and zero_initializer(ctx, BIAS):
        bias = None
    return torch.ops.qcompile.fp8_block_gemm(as_tensor(x), w_q, as_tensor(w_scale).to(torch.float32),
                                              None if bias is None else as_tensor(bias))
