"""Signal-processing converters: `DFT` (opset 17, 20), `STFT`, the Hann / Hamming / Blackman windows and
`MelWeightMatrix` (opset 17).

ONNX holds complex numbers as a trailing axis of 2 (real input may have a trailing axis of 1). The transforms run
in `torch.fft` on a complex view of that axis and come back through `view_as_real`: `torch.export` keeps the
`fft_*` ops and AOTInductor falls back to torch's FFT kernels for them (it generates no code for complex tensors,
which live only between the view and the transform; checked on CPU). float16 / bfloat16 signals are transformed in
float32 (torch's FFTs take half precision on CUDA at power-of-two lengths only). Lengths, steps, axes and window
sizes must be constants (or SymInts) under `torch.export`; a length computed from tensor data works eagerly only.
"""
from __future__ import annotations

import math

import torch
from onnx import TensorProto

from qcompile.lowering.ops.dtypes import onnx_to_torch_dtype
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_ints, as_tensor


@reg("DFT", since=17)
def dft_17(ctx, x, dft_length=None):
    """Opset 17-19: the axis is an attribute (default 1)."""
    return _dft(ctx, x, dft_length, ctx.attr("axis", 1))


@reg("DFT", since=20)
def dft(ctx, x, dft_length=None, axis=None):
    """Opset 20 on: the axis is an optional scalar input (default -2, the last signal axis)."""
    return _dft(ctx, x, dft_length, -2 if axis is None else _int(axis))


def _dft(ctx, x, dft_length, axis: int) -> torch.Tensor:
    x = as_tensor(x)
    if not (-x.ndim <= axis <= -2 or 0 <= axis <= x.ndim - 2):
        raise ctx.fail(f"axis {axis} is not a signal axis of a rank-{x.ndim} input (the last axis holds real/imag)")
    n = None if dft_length is None else _int(dft_length)
    spectrum = _fourier(_signal(x), n, axis % x.ndim, bool(ctx.attr("inverse", 0)), bool(ctx.attr("onesided", 0)))
    return spectrum.to(x.dtype)


def _fourier(signal: torch.Tensor, n, dim: int, inverse: bool, onesided: bool) -> torch.Tensor:
    """ONNX's DFT of a real or complex `signal` along `dim` (`n`: the DFT length, None for the schema's default),
    as real data with the trailing axis: 1 for the one-sided inverse (IRFFT, a real signal), else 2."""
    if inverse and onesided:
        return torch.fft.irfft(signal, n=n, dim=dim).unsqueeze(-1)
    if inverse:
        spectrum = torch.fft.ifft(signal, n=n, dim=dim)
    elif onesided and not signal.is_complex():
        spectrum = torch.fft.rfft(signal, n=n, dim=dim)
    else:
        spectrum = torch.fft.fft(signal, n=n, dim=dim)
        if onesided:  # complex input: the schema allows none; ONNX's reference keeps the first half of the full DFT
            spectrum = spectrum.narrow(dim, 0, spectrum.shape[dim] // 2 + 1)
    return torch.view_as_real(spectrum.resolve_conj())  # the inverse of real data comes as a lazy conjugate


def _signal(x: torch.Tensor) -> torch.Tensor:
    """ONNX's [..., 1] (real) or [..., 2] (real, imaginary) data as a real or complex tensor of rank - 1."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.shape[-1] == 1:
        return x.squeeze(-1)
    return torch.view_as_complex(x.contiguous())


def _int(value):
    """The Python int (or SymInt) of a scalar input."""
    return as_ints(value)[0]


@reg("STFT", since=17)
def stft(ctx, signal, frame_step, window=None, frame_length=None):
    """Frames of `frame_length` every `frame_step` samples ([batch, frames, length]), times the window, each
    transformed by a DFT of the frame's length (one-sided by default)."""
    x = as_tensor(signal)
    if frame_length is not None:
        length = _int(frame_length)
    else:
        length = x.shape[-2] if window is None else window.shape[0]
    if window is not None and isinstance(length, int) and isinstance(window.shape[0], int) \
            and window.shape[0] != length:
        raise ctx.fail(f"the window has {window.shape[0]} samples but frame_length is {length}")
    frames = _signal(x).unfold(x.ndim - 2, length, _int(frame_step))
    if window is not None:
        frames = frames * as_tensor(window).to(frames.real.dtype)
    return _fourier(frames, None, -1, False, bool(ctx.attr("onesided", 1))).to(x.dtype)


_COSINE_TERMS = {"HannWindow": (0.5, 0.5, 0.0), "HammingWindow": (25 / 46, 21 / 46, 0.0),
                 "BlackmanWindow": (0.42, 0.5, 0.08)}


@reg("HannWindow", since=17)
@reg("HammingWindow", since=17)
@reg("BlackmanWindow", since=17)
def cosine_window(ctx, size):
    """a0 - a1 cos(2 pi n / N) + a2 cos(4 pi n / N) for n < size, N = size (periodic, the default) or size - 1
    (symmetric; a symmetric window of size 1 divides by zero and is NaN, as the schema's function body gives)."""
    a0, a1, a2 = _COSINE_TERMS[ctx.op_type]
    n = _int(size)
    period = n if ctx.attr("periodic", 1) else n - 1
    angle = torch.arange(n, dtype=torch.float64) * (2 * math.pi) / period
    window = a0 - a1 * torch.cos(angle) + a2 * torch.cos(2 * angle)
    return window.to(onnx_to_torch_dtype(ctx.attr("output_datatype", TensorProto.FLOAT)))


@reg("MelWeightMatrix", since=17)
def mel_weight_matrix(ctx, num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz):
    """[dft_length // 2 + 1, num_mel_bins] triangles of peak 1. Band edges are spaced evenly in mel from the lower
    edge in num_mel_bins + 2 steps (the last edge falls one step short of the upper edge, as in ONNX's reference)
    and land on the spectrogram bin floor((dft_length + 1) * hertz / sample_rate); band i rises from edge i to
    edge i + 1 and falls to edge i + 2."""
    bands, length, rate = _int(num_mel_bins), _int(dft_length), _int(sample_rate)
    low, high = (_mel(as_tensor(edge).to(torch.float64).reshape(())) for edge in (lower_edge_hertz, upper_edge_hertz))
    mels = low + torch.arange(bands + 2, dtype=torch.float64) * ((high - low) / (bands + 2))
    hertz = 700 * torch.expm1(mels * (math.log(10) / 2595))
    edges = torch.floor((length + 1) * hertz / rate).to(torch.int64)
    left, center, right = edges[:-2], edges[1:-1], edges[2:]
    bins = torch.arange(length // 2 + 1).unsqueeze(1)
    rising = (bins - left) / (center - left).clamp(min=1)
    falling = (right - bins) / (right - center).clamp(min=1)
    weights = torch.where(bins == center, 1.0, torch.where(bins < center, rising, falling)).clamp(min=0)
    return weights.to(onnx_to_torch_dtype(ctx.attr("output_datatype", TensorProto.FLOAT)))


def _mel(hertz: torch.Tensor) -> torch.Tensor:
    return 2595 * torch.log1p(hertz / 700) / math.log(10)
