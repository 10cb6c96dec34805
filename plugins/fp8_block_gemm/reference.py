"""Plain-torch reference of `qcompile::fp8_block_gemm`: the CPU path of the op and the test oracle.

    xq, sx = quantize_activation_blocks(x)          (1x128 dynamic blocks)
    y = dequant(xq, sx) @ dequant(w_q, w_scale).T + bias       (float32, cast to x.dtype)
"""
from __future__ import annotations

import torch

from qcompile.plugins.fp8_block_gemm.format import BLOCK, FP8, dequantize_blocks, quantize_activation_blocks

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(x, w_q, w_scale, bias) -> None:
    """Shape/dtype checks shared by every path (static properties only: safe under tracing)."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"fp8_block_gemm: x must be float32/float16/bfloat16, got {x.dtype}")
    if w_q.dtype != FP8 or w_q.dim() != 2 or w_q.shape[0] % BLOCK or w_q.shape[1] % BLOCK:
        raise ValueError(f"fp8_block_gemm: w_q must be float8_e4m3fn [N, K] with N, K multiples of {BLOCK}, got "
                         f"{w_q.dtype} {tuple(w_q.shape)}")
    n, k = w_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_block_gemm: x has K={x.shape[-1]} but w_q is {tuple(w_q.shape)} ([N, K])")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n // BLOCK, k // BLOCK):
        raise ValueError(f"fp8_block_gemm: w_scale must be float32 [{n // BLOCK}, {k // BLOCK}], got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp8_block_gemm: bias must be [{n}], got {tuple(bias.shape)}")


def fp8_block_gemm_reference(x, w_q, w_scale, bias) -> torch.Tensor:
    """`y[..., N]` of the plugin contract, in float32 math, returned in x.dtype."""
    check_args(x, w_q, w_scale, bias)
    n, k = w_q.shape
    xq, sx = quantize_activation_blocks(x.reshape(-1, k))
    y = dequantize_blocks(xq, sx, 1) @ dequantize_blocks(w_q, w_scale, BLOCK).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
