"""Plain-torch reference of `qcompile::int8_weight_only_gemm`: the CPU path of the op and the test oracle.

    y = x @ (w_q * w_scale[:, None])^T + bias          (float32, cast to x.dtype; w_q int8 [N, K])
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(x, w_q, w_scale, bias) -> None:
    """Shape/dtype checks shared by every path (static properties only: safe under tracing)."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"int8_weight_only_gemm: x must be float32/float16/bfloat16, got {x.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"int8_weight_only_gemm: w_q must be int8 [N, K], got {w_q.dtype} {tuple(w_q.shape)}")
    n, k = w_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"int8_weight_only_gemm: x has K={x.shape[-1]} but w_q is {tuple(w_q.shape)} ([N, K])")
    if w_scale.dtype not in FLOAT_DTYPES or tuple(w_scale.shape) != (n,):
        raise ValueError(f"int8_weight_only_gemm: w_scale must be float [{n}], got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"int8_weight_only_gemm: bias must be [{n}], got {tuple(bias.shape)}")


def dequantize_weight(w_q, w_scale, dtype=torch.float32) -> torch.Tensor:
    """`w_q * w_scale[:, None]` as `dtype` [N, K] (computed in float32)."""
    return (w_q.to(torch.float32) * w_scale.to(torch.float32)[:, None]).to(dtype)


def int8_wo_gemm_reference(x, w_q, w_scale, bias) -> torch.Tensor:
    """`y[..., N] = x @ dequant(W) + bias` computed in float32, returned in x.dtype."""
    check_args(x, w_q, w_scale, bias)
    y = x.to(torch.float32) @ dequantize_weight(w_q, w_scale).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
