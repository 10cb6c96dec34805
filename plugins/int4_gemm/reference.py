"""Plain-torch reference of `qcompile::int4_groupwise_gemm`: the CPU path of the op and the test oracle.

    dequant(W)[k, n] = (q[k, n] - zp[k // g, n]) * scale[k // g, n]      (zp = 0 when absent)
    y = x @ dequant(W) + bias                                            (float32, cast to x.dtype)

W4A8 (FP8 E4M3 activations): `quantize_activation_fp8` gives xq [M, K] and one float32 scale per row
(the static per-tensor scale repeated, or the dynamic per-token scale), and
    y = (xq * x_row_scale[:, None]) @ dequant(W) + bias                  (float32, cast to x.dtype)
"""
from __future__ import annotations

import torch

from qcompile.plugins import fp8_large_m
from qcompile.plugins.formats import quantize_activation
from qcompile.plugins.gemm_dispatch import run_by_buckets, unpack_optional
from qcompile.plugins.int4_gemm.format import PACK, columns_in_words_order, from_engine

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


def check_activation_args(x_scale, x_dynamic: bool) -> None:
    """The W4A8 arguments: a static scalar `x_scale`, or `x_dynamic` without one."""
    if x_dynamic and x_scale is not None:
        raise ValueError("int4_groupwise_gemm: x_dynamic computes per-row scales; x_scale must then be None")
    if x_scale is not None and (x_scale.numel() != 1 or not x_scale.dtype.is_floating_point):
        raise ValueError(f"int4_groupwise_gemm: x_scale must be a float scalar, got {x_scale.dtype} "
                         f"{tuple(x_scale.shape)}")


def quantize_activation_fp8(x, x_scale, x_dynamic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq float8_e4m3fn [M, K], x_row_scale float32 [M]): ONNX QuantizeLinear with the static
    scalar `x_scale`, or per row with `dynamic_row_scales` (amax / 448, floored) when `x_dynamic`."""
    x2d = x.reshape(-1, x.shape[-1])
    if x_dynamic:
        return fp8_large_m.quantize_rows(x2d)
    scale = x_scale.to(torch.float32).reshape(())
    row_scale = scale.reshape(1).expand(x2d.shape[0]).contiguous()
    return quantize_activation(x2d, scale, torch.float8_e4m3fn), row_scale


def dequantize_weight(w_packed, w_scale, w_zero, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """`(q - zp) * scale` as `dtype` [K, N] (computed in float32)."""
    q = from_engine(w_packed, group_size).to(torch.float32)
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


def int4_gemm_w4a8_reference(xq, x_row_scale, w_packed, w_scale, w_zero, bias, group_size: int,
                             out_dtype: torch.dtype) -> torch.Tensor:
    """W4A8: `y[M, N] = (xq * x_row_scale[:, None]) @ dequant(W) + bias` in float32, returned in out_dtype."""
    w = dequantize_weight(w_packed, w_scale, w_zero, group_size)
    y = (xq.to(torch.float32) * x_row_scale.to(torch.float32)[:, None]) @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def fp8_column_bound(w_scale: torch.Tensor, w_zero: torch.Tensor | None) -> torch.Tensor:
    """float32 [N]: the largest |(q - zp) * scale| column n can hold (q in [-8, 7]), from the scales alone (the FP8
    path's column scale is this / 448, `plugins/fp8_large_m.py`)."""
    s = w_scale.to(torch.float32).abs()
    if w_zero is None:
        return (s * 8.0).amax(dim=0)
    z = w_zero.to(torch.float32)
    return (s * torch.maximum((z + 8.0).abs(), (7.0 - z).abs())).amax(dim=0)


def fp8_weight_reference(w_packed, w_scale, w_zero, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 float8_e4m3fn [N, K], S float32 [N]) of the FP8 path: `(q - zp) * (scale * (1 / S[n]))` in float32, rounded
    to E4M3, K in the words' order (`format.columns_in_words_order`); the same values as the CUDA kernel's
    (`dequant_fp8.fp8_weight`)."""
    s = fp8_large_m.column_scales(fp8_column_bound(w_scale, w_zero))
    q = from_engine(w_packed, group_size).to(torch.float32)
    if w_zero is not None:
        q = q - w_zero.to(torch.float32).repeat_interleave(group_size, dim=0)
    mult = (w_scale.to(torch.float32) * (1.0 / s)).repeat_interleave(group_size, dim=0)
    return columns_in_words_order((q * mult).t(), group_size).to(fp8_large_m.FP8), s


def fp8_linear(x2d, x_row_scale, w8, w_col_scale, bias, group_size: int, out_dtype) -> torch.Tensor:
    """`fp8_large_m.linear` on an INT4 FP8 weight, whose K is in the words' order: x quantized per row (unless FP8
    already, with its `x_row_scale`), then its columns gathered into that order (`format.columns_in_words_order`).
    The CUDA path (`kernel.run_bucket`) and the CPU one share it."""
    if x_row_scale is None:
        x2d, x_row_scale = fp8_large_m.quantize_rows(x2d)
    return fp8_large_m.linear(columns_in_words_order(x2d, group_size), w8, w_col_scale, bias, out_dtype, x_row_scale)


def int4_gemm_fp8_large_m_reference(x, x_row_scale, w_packed, w_scale, w_zero, bias, group_size: int,
                                    out_dtype) -> torch.Tensor:
    """The op with `fp8_large_m` off CUDA: up to 128 rows exact (`int4_gemm_reference`, or the W4A8 one when x is FP8
    with its `x_row_scale`), from 129 the FP8 path's numerics (`fp8_large_m.linear`, emulated); a torch.cond on a
    symbolic M. Returns [..., N] in out_dtype."""
    k, n = w_packed.shape[0] * PACK, w_packed.shape[1]
    present = (w_zero is not None, bias is not None, x_row_scale is not None)

    def exact(x2d, w_packed, w_scale, *rest):
        w_zero, bias, row = unpack_optional(rest, *present)
        if row is None:
            return int4_gemm_reference(x2d, w_packed, w_scale, w_zero, bias, group_size).to(out_dtype)
        return int4_gemm_w4a8_reference(x2d, row, w_packed, w_scale, w_zero, bias, group_size, out_dtype)

    def fp8(x2d, w_packed, w_scale, *rest):
        w_zero, bias, row = unpack_optional(rest, *present)
        w8, s = fp8_weight_reference(w_packed, w_scale, w_zero, group_size)
        return fp8_linear(x2d, row, w8, s, bias, group_size, out_dtype)

    weights = (w_packed, w_scale) + tuple(t for t in (w_zero, bias, x_row_scale) if t is not None)
    return run_by_buckets(x, k, n, [(fp8_large_m.MIN_ROWS - 1, exact), (None, fp8)], weights)
