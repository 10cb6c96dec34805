"""Block quantizers of the FP8 block-scaled GEMM plugin (plain torch, traceable).

Weights: 128x128 blocks of `W[N, K]`, one float32 scale each, `s = max(amax(block) / 448, MIN_SCALE)`, data
`fp8(clamp(W / s, ±448))` -> (w_q float8_e4m3fn [N, K], w_scale float32 [N/128, K/128]).
Activations: 1x128 blocks of `x[M, K]` (per row, per 128 columns), computed at run time the same way ->
(xq float8_e4m3fn [M, K], x_scale float32 [M, K/128]). The quantization itself is ONNX QuantizeLinear's
(`formats.quantize_activation`, shared with every plugin): float32 division, saturation to ±448, round to nearest
even.
"""
from __future__ import annotations

import torch

from qcompile.plugins.formats import MIN_SCALE, qmax, quantize_activation

BLOCK = 128
FP8 = torch.float8_e4m3fn


def _check(t: torch.Tensor, what: str, rows_blocked: bool) -> None:
    if t.dim() != 2 or t.shape[1] % BLOCK or (rows_blocked and t.shape[0] % BLOCK):
        dims = "both dims" if rows_blocked else "the last dim"
        raise ValueError(f"{what} must be 2-D with {dims} a multiple of {BLOCK}, got {tuple(t.shape)}")


def block_scales(amax: torch.Tensor) -> torch.Tensor:
    """`max(amax / 448, MIN_SCALE)` in float32 (the floor keeps all-zero blocks valid)."""
    return torch.clamp(amax.to(torch.float32) / qmax("fp8"), min=MIN_SCALE)


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (w_q float8_e4m3fn [N, K], w_scale float32 [N/128, K/128])."""
    _check(w, "weight", rows_blocked=True)
    n, k = w.shape
    blocks = w.to(torch.float32).reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = block_scales(blocks.abs().amax(dim=(1, 3)))
    q = quantize_activation(blocks, scale[:, None, :, None], FP8)
    return q.reshape(n, k), scale


def quantize_activation_blocks(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (xq float8_e4m3fn [M, K], x_scale float32 [M, K/128])."""
    _check(x2d, "activation", rows_blocked=False)
    m, k = x2d.shape
    blocks = x2d.reshape(m, k // BLOCK, BLOCK)
    scale = block_scales(blocks.abs().amax(dim=-1))
    return quantize_activation(blocks, scale[..., None], FP8).reshape(m, k), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, row_block: int) -> torch.Tensor:
    """float32 `q * scale` with one scale per `row_block` x 128 block (row_block 1: activations, 128: weights)."""
    s = scale.to(torch.float32).repeat_interleave(BLOCK, dim=1)
    if row_block > 1:
        s = s.repeat_interleave(row_block, dim=0)
    return q.to(torch.float32) * s
