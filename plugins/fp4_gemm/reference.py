"""Plain-torch reference of `qcompile::fp4_gemm`: the CPU path of the op and the test oracle.

    W[n, k] = e2m1(w[n, k]) * scale[n, k // B] * (w_global or 1)        (scale: E4M3 or E8M0, decoded)
    x_hat   = nvfp4_fake_quantize(x, x_global) if x_global is given else x
    y       = x_hat @ W.T + bias                                          (float32, cast to x.dtype)
"""
from __future__ import annotations

import torch

from qcompile.plugins import fp8_large_m
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.gemm_dispatch import run_by_buckets, unpack_optional

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(x, w_packed, w_scale, w_global, x_global, bias, block_size: int) -> None:
    """Shape/dtype checks shared by every path (static properties only: safe under tracing)."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"fp4_gemm: x must be float32/float16/bfloat16, got {x.dtype}")
    shape_ok = w_packed.dim() == 2 or (F.is_row_pairs(w_packed) and tuple(w_packed.shape[2:]) == (2, 16))
    if w_packed.dtype not in (torch.uint8, torch.int32) or not shape_ok:
        raise ValueError(f"fp4_gemm: w_packed must be uint8 [N, K/2] (ONNX bytes), int32 [N, K/8] (planar words) or "
                         f"int32 [N/2, K/128, 2, 16] (row pairs), got {w_packed.dtype} {tuple(w_packed.shape)}")
    planar = F.is_planar(w_packed)
    n, k = F.weight_nk(w_packed)
    if x.shape[-1] != k:
        raise ValueError(f"fp4_gemm: x has K={x.shape[-1]} but w_packed {tuple(w_packed.shape)} holds K={k}")
    if planar and k % F.PLANAR_K_MULTIPLE:
        raise ValueError(f"fp4_gemm: planar words need K a multiple of {F.PLANAR_K_MULTIPLE}, got K={k} (keep the "
                         f"ONNX bytes for this weight)")
    nvfp4 = w_scale.dtype == torch.float8_e4m3fn
    if not nvfp4 and w_scale.dtype != torch.uint8:
        raise ValueError(f"fp4_gemm: w_scale must be float8_e4m3fn (NVFP4) or uint8 E8M0 (MXFP4), got {w_scale.dtype}")
    want_block = F.NVFP4_BLOCK if nvfp4 else F.MXFP4_BLOCK
    if block_size != want_block or k % block_size:
        raise ValueError(f"fp4_gemm: block_size {block_size} must be {want_block} for "
                         f"{'NVFP4' if nvfp4 else 'MXFP4'} and divide K={k}")
    if tuple(w_scale.shape) != (n, k // block_size):
        raise ValueError(f"fp4_gemm: w_scale must be [{n}, {k // block_size}], got {tuple(w_scale.shape)}")
    if nvfp4 != (w_global is not None):
        raise ValueError("fp4_gemm: w_global (float32 scalar) goes with NVFP4 (E4M3 scales) and only with it")
    for name, s in (("w_global", w_global), ("x_global", x_global)):
        if s is not None and (s.dtype != torch.float32 or s.numel() != 1):
            raise ValueError(f"fp4_gemm: {name} must be a float32 scalar, got {s.dtype} {tuple(s.shape)}")
    if x_global is not None and k % F.NVFP4_BLOCK:
        raise ValueError(f"fp4_gemm: NVFP4 activation quantization needs K={k} to be a multiple of 16")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"fp4_gemm: bias must be [{n}], got {tuple(bias.shape)}")


def dequantize_weight(w_packed, w_scale, w_global, block_size: int, dtype=torch.float32) -> torch.Tensor:
    """`W [N, K]` as `dtype` (computed in float32) from an engine weight in either layout."""
    scale = F.decode_scales(w_scale)
    if w_global is not None:
        scale = scale * w_global.to(torch.float32).reshape(())
    return F.dequantize_blocks(F.unpack_codes(F.engine_bytes(w_packed)), scale, block_size).to(dtype)


def fp4_gemm_reference(x, w_packed, w_scale, w_global, x_global, bias, block_size: int) -> torch.Tensor:
    """`y[..., N] = x_hat @ W.T + bias` computed in float32, returned in x.dtype."""
    check_args(x, w_packed, w_scale, w_global, x_global, bias, block_size)
    w = dequantize_weight(w_packed, w_scale, w_global, block_size)
    xf = x.to(torch.float32)
    if x_global is not None:
        xf = F.nvfp4_fake_quantize(xf, x_global.reshape(()))
    y = xf @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def fp8_column_bound(w_scale: torch.Tensor, w_global) -> torch.Tensor:
    """float32 [N]: the largest |W[n, :]| row n can hold (E2M1 codes reach 6), from its block scales and global (the
    FP8 path's column scale is this / 448, `plugins/fp8_large_m.py`)."""
    bound = F.decode_scales(w_scale).to(torch.float32).amax(dim=1) * 6.0
    return bound if w_global is None else bound * w_global.to(torch.float32).abs().reshape(())


def fp8_weight_reference(w_packed, w_scale, w_global, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 float8_e4m3fn [N, K], S float32 [N]) of the FP8 path: `W * (1 / S[n])` in float32, rounded to E4M3 (the CUDA
    kernel's `kernel.fp8_weight` multiplies NVFP4's global scale in another order: one float32 rounding apart)."""
    s = fp8_large_m.column_scales(fp8_column_bound(w_scale, w_global))
    w = dequantize_weight(w_packed, w_scale, w_global, block_size)
    return (w * (1.0 / s)[:, None]).to(fp8_large_m.FP8), s


def fp4_gemm_fp8_large_m_reference(x, w_packed, w_scale, w_global, x_global, bias, block_size: int) -> torch.Tensor:
    """The op with `fp8_large_m` off CUDA: up to 128 rows exact (`fp4_gemm_reference`), from 129 the FP8 path's
    numerics (x fake-quantized to NVFP4 first for W4A4, as on CUDA; `fp8_large_m.linear`, emulated); a torch.cond on
    a symbolic M. Returns [..., N] in x.dtype."""
    check_args(x, w_packed, w_scale, w_global, x_global, bias, block_size)
    n, k = F.weight_nk(w_packed)
    present = (w_global is not None, x_global is not None, bias is not None)

    def exact(x2d, w_packed, w_scale, *rest):
        return fp4_gemm_reference(x2d, w_packed, w_scale, *unpack_optional(rest, *present), block_size)

    def fp8(x2d, w_packed, w_scale, *rest):
        w_global, x_global, bias = unpack_optional(rest, *present)
        if x_global is not None:
            x2d = F.nvfp4_fake_quantize(x2d.to(torch.float32), x_global.reshape(())).to(x2d.dtype)
        w8, s = fp8_weight_reference(w_packed, w_scale, w_global, block_size)
        return fp8_large_m.linear(x2d, w8, s, bias, x2d.dtype)

    weights = (w_packed, w_scale) + tuple(t for t in (w_global, x_global, bias) if t is not None)
    return run_by_buckets(x, k, n, [(fp8_large_m.MIN_ROWS - 1, exact), (None, fp8)], weights)
