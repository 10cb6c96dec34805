"""4-bit weight quantization: the result type, round-to-nearest (RTN) and the helpers AWQ/GPTQ share.

Convention (ONNX MatMul layout): a linear layer is ``y = x @ W`` with ``W`` [K, N] (K input
features, N output features). Weights are quantized in groups of ``group_size`` consecutive rows
along K, one scale (and zero point) per (group, output column): ``scale`` is [K/g, N], which is
exactly ONNX ``DequantizeLinear(axis=0, block_size=g)``. ``group_size = K`` is per output channel.

- symmetric (default): signed int4, ``q = clamp(round_half_even(w / scale), -8, 7)``,
  ``scale = amax * clip_ratio / 7``; ``w_hat = q * scale``.
- asymmetric: unsigned int4 with a zero point (GPTQ/AWQ checkpoint style),
  ``scale = (max - min) / 15`` over the group's range widened to include 0 (so the zero point is an
  exact integer in [0, 15]), ``zero = round(-min / scale)``,
  ``q = clamp(round_half_even(w / scale) + zero, 0, 15)``; ``w_hat = (q - zero) * scale``.

Everything is pure torch and runs on the weight's device; math is float32 whatever the input dtype.
Packing two int4 values per byte is not done here (``q`` is an int8 tensor holding the values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The smallest scale we emit (float32 tiny): keeps all-zero groups valid (TensorRT rejects scale <= 0).
MIN_SCALE = float(torch.finfo(torch.float32).tiny)
INT4_MIN, INT4_MAX = -8, 7
UINT4_MAX = 15


@dataclass
class QuantizedWeight:
    """A group-quantized 4-bit weight.

    Attributes:
        q: int8 [K, N] holding int4 values ([-8, 7] symmetric, [0, 15] asymmetric).
        scale: float32 [K/g, N], strictly positive.
        zero: int8 [K/g, N] zero points in [0, 15] (asymmetric), or None (symmetric).
        group_size: rows of W (along K) per group.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``w_hat`` [K, N]: ``q * scale`` (symmetric) or ``(q - zero) * scale`` (asymmetric)."""
        K, N = self.q.shape
        g = self.group_size
        q = self.q.float().reshape(K // g, g, N)
        if self.zero is not None:
            q = q - self.zero.float()[:, None, :]
        return (q * self.scale[:, None, :]).reshape(K, N).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.q.to(device), self.scale.to(device),
                               None if self.zero is None else self.zero.to(device), self.group_size)


def resolve_group_size(k: int, group_size: int | None) -> int:
    """``group_size`` checked against K; None or -1 mean one group over all of K (per channel)."""
    if group_size is None or group_size == -1:
        return k
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide K = {k}")
    return group_size


def _check_weight(w: torch.Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {tuple(w.shape)}")
    if not torch.is_floating_point(w):
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")


def group_params(wg: torch.Tensor, symmetric: bool = True,
                 clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of groups of rows: ``wg`` [..., g, N] -> scale [..., N] (float32).

    ``clip_ratio`` (a float, or a tensor broadcasting to [..., N]) shrinks the range: the
    symmetric amax, or the asymmetric min and max. The zero point is float32 here (an integer value
    in [0, 15]); `QuantizedWeight` stores it as int8.
    """
    wg = wg.float()
    if not isinstance(clip_ratio, torch.Tensor):
        clip_ratio = torch.tensor(float(clip_ratio), device=wg.device)
    clip_ratio = clip_ratio.float()
    if symmetric:
        amax = wg.abs().amax(dim=-2) * clip_ratio
        return (amax / INT4_MAX).clamp_min(MIN_SCALE), None
    wmin = wg.amin(dim=-2).clamp(max=0.0) * clip_ratio
    wmax = wg.amax(dim=-2).clamp(min=0.0) * clip_ratio
    scale = ((wmax - wmin) / UINT4_MAX).clamp_min(MIN_SCALE)
    zero = torch.round(-wmin / scale).clamp(0, UINT4_MAX)
    return scale, zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Integer values (float32 holding integers) of ``w`` with scales/zeros that broadcast against it."""
    y = torch.round(w.float() / scale)  # torch.round rounds half to even
    if zero is None:
        return y.clamp(INT4_MIN, INT4_MAX)
    return (y + zero).clamp(0, UINT4_MAX)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Quantize then dequantize (float32), with broadcasting scales."""
    return dequantize_values(quantize_values(w, scale, zero), scale, zero)


def fake_quantize_groups(w: torch.Tensor, group_size: int, symmetric: bool = True,
                         clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``quantize_rtn(...).dequantize()`` without building the result: [K, N] float32."""
    K, N = w.shape
    wg = w.float().reshape(K // group_size, group_size, N)
    scale, zero = group_params(wg, symmetric, clip_ratio)
    zero = None if zero is None else zero[:, None, :]
    return fake_quantize(wg, scale[:, None, :], zero).reshape(K, N)


def quantize_rtn(w: torch.Tensor, group_size: int | None, symmetric: bool = True,
                 clip_ratio: float | torch.Tensor = 1.0) -> QuantizedWeight:
    """Round-to-nearest group quantization of ``w`` [K, N].

    Args:
        w: the weight, any float dtype, any device.
        group_size: rows per group along K; K (or None / -1) for per output channel.
        symmetric: signed int4 with ``scale = amax * clip_ratio / 7``; else uint4 with a zero point.
        clip_ratio: range shrink factor, a float or a [K/g, N] tensor (one per group and column).
    """
    _check_weight(w)
    K, N = w.shape
    g = resolve_group_size(K, group_size)
    wg = w.float().reshape(K // g, g, N)
    scale, zero = group_params(wg, symmetric, clip_ratio)
    q = quantize_values(wg, scale[:, None, :], None if zero is None else zero[:, None, :])
    return QuantizedWeight(q.reshape(K, N).to(torch.int8), scale.float(),
                           None if zero is None else zero.to(torch.int8), g)


def output_error(x: torch.Tensor, w: torch.Tensor, x_hat: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative output error ``||x W - x_hat W_hat||_F / ||x W||_F`` (float32 math)."""
    ref = x.float() @ w.float()
    return float(torch.linalg.norm(ref - x_hat.float() @ w_hat.float()) / torch.linalg.norm(ref).clamp_min(1e-30))
