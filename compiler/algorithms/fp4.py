"""FP4 weight quantization (NVFP4 two-level scales, MXFP4 E8M0 scales) and the NVFP4 activation global scale.

Convention: the weight is given as ONNX MatMul's `W [K, N]` and quantized as `Wt = W.T [N, K]` (TensorRT's
and ModelOpt's NVFP4 layout: blocks of 16/32 consecutive elements along K, the last axis).

- NVFP4: `global = amax(W) / (6 * 448)` (decode form, float32); `block_scale = e4m3(amax(block) / 6 / global)`;
  `codes = e2m1(Wt / (fp32(block_scale) * global))`.
  `mse_search=True` (recipe: `weight = { format = "nvfp4", scale_search = "mse" }`) searches both levels for
  the least squared weight error: first the global scale (`amax * r / (6*448)`, r on a grid in [0.6, 1]), then,
  at that global, each block's E4M3 scale among the E4M3 values from about half the amax scale up to the next
  value above it (a smaller block scale clips the block's largest elements to 6 * scale and rounds the others
  more finely). Each candidate set holds the amax choice, so the error is never higher than amax's. The result
  is an ordinary NVFP4 weight (same decode); only the chosen scale values differ.
- MXFP4: shared exponent `floor(log2(amax(block))) - 2` (OCP MX v1.0 §6.3, emax_elem = 2 for E2M1), clamped
  to E8M0's [-127, 127]; an all-zero block gets the smallest scale; `codes = e2m1(Wt / 2**exp)` (saturating
  at ±6, as the spec's clamping of normal values). The exponent is read exactly from the float32 bits
  (`frexp`), not from a float32 `log2`, which rounds up for an amax just below a power of two.
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
# block-scale candidates, in E4M3 codes relative to the amax scale: 8 codes = one octave down, 1 = next value up
_MSE_BLOCK_STEPS = range(-8, 2)
_E4M3_MAX_CODE = 126  # 0x7E = 448; 0x7F is NaN


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


def _block_errors(xb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Squared error per block of `xb [..., nb, B]` quantized with effective float32 scales `[..., nb]`."""
    s = scale.unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return ((F.e2m1_round(xb / safe) * s - xb) ** 2).sum(-1)


def _amax_block_codes(xb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """E4M3 codes (int32) of the amax block scales `e4m3(amax(block) / 6 / g)`."""
    return F.e4m3_encode(xb.abs().amax(dim=-1) / F.E2M1_MAX / g).view(torch.uint8).to(torch.int32)


def _code_scales(code: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return code.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32) * g


def _mse_nvfp4(wt: torch.Tensor) -> Fp4Weight:
    """NVFP4 of `Wt [N, K]` with the global scale, then each block's E4M3 scale, searched for the least squared
    error (see the module docstring); both candidate sets start with the amax choice, which a candidate must
    beat strictly."""
    xb = F.blocks(wt, F.NVFP4_BLOCK)
    amax = wt.abs().amax()
    g, best_err = None, None
    for r in _MSE_RATIOS:
        cand = nvfp4_global_scale(amax * r)
        err = float(_block_errors(xb, _code_scales(_amax_block_codes(xb, cand), cand)).sum())
        if best_err is None or err < best_err:
            g, best_err = cand, err
    code0 = _amax_block_codes(xb, g)
    best_code, best_err = code0, _block_errors(xb, _code_scales(code0, g))
    for step in _MSE_BLOCK_STEPS:
        if step == 0:
            continue
        code = torch.where(code0 > 0, (code0 + step).clamp(1, _E4M3_MAX_CODE), code0)
        err = _block_errors(xb, _code_scales(code, g))
        better = err < best_err
        best_code, best_err = torch.where(better, code, best_code), torch.where(better, err, best_err)
    scale = best_code.to(torch.uint8).view(torch.float8_e4m3fn)
    return Fp4Weight("nvfp4", F.quantize_blocks(wt, scale.to(torch.float32) * g, F.NVFP4_BLOCK), scale, g)


def quantize_nvfp4(w: torch.Tensor, mse_search: bool = False, amax: float | None = None) -> Fp4Weight:
    """NVFP4 weight quantization of `W [K, N]` (see the module docstring). `amax`: the global scale's amax, when
    several weights share one (at least W's own; default W's own)."""
    wt = w.to(torch.float32).t().contiguous()
    if mse_search:
        return _mse_nvfp4(wt)
    return _nvfp4_with_global(wt, nvfp4_global_scale(wt.abs().amax() if amax is None else amax))


def mx_shared_exponent(amax: torch.Tensor, emax_elem: int = F.E2M1_EMAX) -> torch.Tensor:
    """OCP MX v1.0 shared exponent bits (E8M0, uint8) of blocks with absolute max `amax` (float32):
    `floor(log2(amax)) - emax_elem + 127`, clamped to [0, 254] (254 = 2**127; 255 is NaN); 0 for an all-zero
    block. `floor(log2(a))` is `frexp(a).exponent - 1`, exact for every positive float32, subnormals included."""
    a = amax.to(torch.float32)
    _, exp = torch.frexp(torch.where(a > 0, a, torch.ones_like(a)))
    shared = exp.to(torch.int32) - 1 - emax_elem
    shared = torch.where(a > 0, shared, torch.full_like(shared, -F.E8M0_BIAS))
    return torch.clamp(shared + F.E8M0_BIAS, 0, 254).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor) -> Fp4Weight:
    """MXFP4 weight quantization of `W [K, N]` (OCP MX shared exponent, see the module docstring)."""
    wt = w.to(torch.float32).t().contiguous()
    bits = mx_shared_exponent(F.blocks(wt, F.MXFP4_BLOCK).abs().amax(dim=-1))
    codes = F.quantize_blocks(wt, F.e8m0_decode(bits), F.MXFP4_BLOCK)
    return Fp4Weight("mxfp4", codes, bits, None)


def quantize_fp4(w: torch.Tensor, fmt: str, mse_search: bool = False, amax: float | None = None) -> Fp4Weight:
    """Quantize `W [K, N]` to `fmt` ("nvfp4" | "mxfp4"); `amax`: NVFP4's shared global amax (`quantize_nvfp4`)."""
    if fmt == "nvfp4":
        return quantize_nvfp4(w, mse_search, amax)
    if fmt == "mxfp4":
        return quantize_mxfp4(w)
    raise ValueError(f"unknown FP4 format {fmt!r}; expected one of {FORMATS}")
