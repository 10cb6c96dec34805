"""Plain-torch reference of `qcompile::int4_groupwise_gemm`: the CPU path of the op and the test oracle.

    dequant(W)[k, n] = (q[k, n] - zp[k // g, n]) * scale[k // g, n]      (zp = 0 when absent)
    y = x @ dequant(W) + bias                                            (float32, cast to x.dtype)
"""
from __future__ import annotations

import torch

from qcompile.plugins.int4_gemm.format import PACK, from_engine

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(x, w_packed, w_scale, w_zero, bias, group_size: int) -> None:
    """Shape/dtype checks shared by every path (static properties only: safe under tracing)."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"int4_groupwise_gemm: x must be float32/float16/bfloat16, got {x.dtype}")
    if w_packed.dtype != torch.int32 or w_packed.dim() != 2:
        raise ValueError(f"int4_groupwise_gemm: w_packed must be int32 [K/8, N] (engine layout), got "
                         f"{w_packed.dtype} {tuple(w_packed.shape)}")
    k, n = w_packed.shape[0] * PACK, w_packed.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"int4_groupwise_gemm: x has K={x.shape[-1]} but w_packed {tuple(w_packed.shape)} holds K={k}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"int4_groupwise_gemm: group_size {group_size} must divide K={k}")
    groups = k // group_size
    if w_scale.dtype not in FLOAT_DTYPES or tuple(w_scale.shape) != (groups, n):
        raise ValueError(f"int4_groupwise_gemm: w_scale must be float [{groups}, {n}], got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if w_zero is not None and (w_zero.dtype != torch.int8 or tuple(w_zero.shape) != (groups, n)):
        raise ValueError(f"int4_groupwise_gemm: w_zero must be int8 [{groups}, {n}] or None, got {w_zero.dtype} "
                         f"{tuple(w_zero.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"int4_groupwise_gemm: bias must be [{n}], got {tuple(bias.shape)}")


def dequantize_weight(w_packed, w_scale, w_zero, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """`(q - zp) * scale` as `dtype` [K, N] (computed in float32)."""
    q = from_engine(w_packed).to(torch.float32)
    if w_zero is not None:
        q = q - w_zero.to(torch.float32).repeat_interleave(group_size, dim=0)
    return (q * w_scale.to(torch.float32).repeat_interleave(group_size, dim=0)).to(dtype)


def int4_gemm_reference(x, w_packed, w_scale, w_zero, bias, group_size: int) -> torch.Tensor:
    """`y[..., N] = x @ dequant(W) + bias` computed in float32, returned in x.dtype."""
    check_args(x, w_packed, w_scale, w_zero, bias, group_size)
    w = dequantize_weight(w_packed, w_scale, w_zero, group_size)
    y = x.to(torch.float32) @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
