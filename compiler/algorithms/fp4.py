"""FP4 weight quantization (NVFP4 two-level scales, MXFP4 E8M0 scales) and the NVFP4 activation global scale.

Convention: the weight is given as ONNX MatMul's `W [K, N]` and quantized as `Wt = W.T [N, K]` (TensorRT's
and ModelOpt's NVFP4 layout: blocks of 16/32 consecutive elements along K, the last axis).

- NVFP4: `global = amax(W) / (6 * 448)` (decode form, float32), optionally searched
  (`mse_search=True`: global scales `amax * r / (6*448)` for r on a grid, the one with the least squared
  error wins); `block_scale = e4m3(amax(block) / 6 / global)`; `codes = e2m1(Wt / (fp32(block_scale) * global))`.
- MXFP4: `scale = E8M0(floor(log2(amax(block))) - 2)` (OCP MX), `codes = e2m1(Wt / scale)` (saturating).
- Activations (W4A4): `activation_global_scale(amax) = amax / (6 * 448)` from the calibrated amax
  (1.0 when it is zero or unknown, as ModelOpt does).

All math is torch float32 on the weight's device; the formats are `qcompile.plugins.fp4_gemm.format`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.plugins.fp4_gemm import format as F

FORMATS = ("nvfp4", "mxfp4")
BLOCK = {"nvfp4": F.NVFP4_BLOCK, "mxfp4": F.MXFP4_BLOCK}
_MSE_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))  # 1.0 .. 0.6


@dataclass
class Fp4Weight:
    """A block-quantized FP4 weight in TensorRT's [N, K] layout.

    Attributes:
        fmt: "nvfp4" or "mxfp4".
        codes: uint8 [N, K] E2M1 codes (unpacked).
        scale: [N, K/B] block scales: torch.float8_e4m3fn (nvfp4) or uint8 E8M0 bits (mxfp4).
        global_scale: float32 scalar tensor (nvfp4, decode form) or None (mxfp4).
    """

    fmt: str
    codes: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None

    @property
    def block_size(self) -> int:
        return BLOCK[self.fmt]

    def block_scales(self) -> torch.Tensor:
        """Float32 effective block scales [N, K/B] (`fp32(scale) * global` for NVFP4)."""
        s = F.decode_scales(self.scale)
        return s if self.global_scale is None else s * self.global_scale.to(torch.float32)

    def dequantize(self) -> torch.Tensor:
        """Float32 `W_hat [N, K]`."""
        return F.dequantize_blocks(self.codes, self.block_scales(), self.block_size)


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Decode-form global scale `amax / (6 * 448)` as a float32 scalar (1.0 for a zero or non-finite amax)."""
    a = torch.as_tensor(amax, dtype=torch.float32)
    ok = torch.isfinite(a) & (a > 0)
    return torch.where(ok, a / (F.E2M1_MAX * F.E4M3_MAX), torch.ones_like(a)).reshape(())


def activation_global_scale(amax: float | None) -> float:
    """The NVFP4 activation global scale (decode form) of a calibrated amax."""
    return float(nvfp4_global_scale(0.0 if amax is None else float(amax)))


def _nvfp4_with_global(wt: torch.Tensor, global_scale: torch.Tensor) -> Fp4Weight:
    amax = F.blocks(wt, F.NVFP4_BLOCK).abs().amax(dim=-1)
    scale = F.e4m3_encode(amax / F.E2M1_MAX / global_scale)
    codes = F.quantize_blocks(wt, scale.to(torch.float32) * global_scale, F.NVFP4_BLOCK)
    return Fp4Weight("nvfp4", codes, scale, global_scale)


def quantize_nvfp4(w: torch.Tensor, mse_search: bool = False) -> Fp4Weight:
    """NVFP4 weight quantization of `W [K, N]` (see the module docstring)."""
    wt = w.to(torch.float32).t().contiguous()
    best = _nvfp4_with_global(wt, nvfp4_global_scale(wt.abs().amax()))
    if not mse_search:
        return best
    best_err = float(((best.dequantize() - wt) ** 2).sum())
    for r in _MSE_RATIOS[1:]:
        cand = _nvfp4_with_global(wt, nvfp4_global_scale(wt.abs().amax() * r))
        err = float(((cand.dequantize() - wt) ** 2).sum())
        if err < best_err:
            best, best_err = cand, err
    return best


def quantize_mxfp4(w: torch.Tensor) -> Fp4Weight:
    """MXFP4 weight quantization of `W [K, N]` (OCP MX shared exponent, see the module docstring)."""
    wt = w.to(torch.float32).t().contiguous()
    bits = F.e8m0_from_amax(F.blocks(wt, F.MXFP4_BLOCK).abs().amax(dim=-1))
    codes = F.quantize_blocks(wt, F.e8m0_decode(bits), F.MXFP4_BLOCK)
    return Fp4Weight("mxfp4", codes, bits, None)


def quantize_fp4(w: torch.Tensor, fmt: str, mse_search: bool = False) -> Fp4Weight:
    """Quantize `W [K, N]` to `fmt` ("nvfp4" | "mxfp4")."""
    if fmt == "nvfp4":
        return quantize_nvfp4(w, mse_search)
    if fmt == "mxfp4":
        return quantize_mxfp4(w)
    raise ValueError(f"unknown FP4 format {fmt!r}; expected one of {FORMATS}")
