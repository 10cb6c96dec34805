"""Streaming per-tensor range statistics.

- `MaxObserver`: the running max of |x| over every sample (exact).
- `ChannelMaxObserver`: the running max of |x| per channel (last axis), e.g. for the amax of a tensor
  that a per-channel scale is applied to later (AWQ's x / s in W4A8).
- `PercentileObserver`: for each sample (one ``update``), the ``p``-th percentile of |x| with
  linear interpolation (``torch.quantile``, the same definition as ``numpy.percentile``'s
  default); the amax is the mean of those per-sample values. Tensors with more than
  `MAX_QUANTILE_ELEMENTS` elements are subsampled first (uniform random positions with a fixed
  seed), which bounds the cost of a very large activation to one sort of ~1M values. It also
  keeps the true running max for reports.

Statistics stay on the tensor's device; only `amax()`/`stats()` move a number to the host.
"""
from __future__ import annotations

import math
from typing import Any

import torch

MAX_QUANTILE_ELEMENTS = 1 << 20


class _RunningAbsMax:
    """Running absolute max of `_reduce(|tensor|)` over the updates (empty tensors are counted, not reduced)."""

    def __init__(self) -> None:
        self._max: torch.Tensor | None = None
        self.samples = 0

    @staticmethod
    def _reduce(abs_tensor: torch.Tensor) -> torch.Tensor:
        return abs_tensor.amax()

    def update(self, tensor: torch.Tensor) -> None:
        self.samples += 1
        if tensor.numel() == 0:
            return
        m = self._reduce(tensor.detach().abs()).float()
        self._max = m if self._max is None else torch.maximum(self._max, m)


class MaxObserver(_RunningAbsMax):
    """Running absolute max."""

    method = "max"

    def true_max(self) -> float:
        return 0.0 if self._max is None else float(self._max)

    def amax(self) -> float:
        return self.true_max()

    def stats(self) -> dict[str, Any]:
        return {"amax": self.amax(), "max": self.true_max(), "samples": self.samples}


class ChannelMaxObserver(_RunningAbsMax):
    """Running absolute max per channel of the last axis; `value()` is float32 [C] on the tensor's device."""

    @staticmethod
    def _reduce(abs_tensor: torch.Tensor) -> torch.Tensor:
        return abs_tensor.reshape(-1, abs_tensor.shape[-1]).amax(dim=0)

    def value(self) -> torch.Tensor:
        if self._max is None:
            raise ValueError("ChannelMaxObserver saw no values")
        return self._max


class PercentileObserver:
    """Per-sample |x| percentile, averaged over samples; also the true max."""

    method = "percentile"

    def __init__(self, percentile: float = 99.99, seed: int = 0) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile
        self._gen = torch.Generator().manual_seed(seed)
        self._max = MaxObserver()
        self._sample_max: list[float] = []  # one float per sample, for the clip statistics
        self._values: list[torch.Tensor] = []

    @property
    def samples(self) -> int:
        return len(self._values)

    def update(self, tensor: torch.Tensor) -> None:
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            return
        self._max.update(flat)
        flat = flat.abs().float()
        self._sample_max.append(flat.amax())
        if flat.numel() > MAX_QUANTILE_ELEMENTS:
            idx = torch.randint(flat.numel(), (MAX_QUANTILE_ELEMENTS,), generator=self._gen).to(flat.device)
            flat = flat[idx]
        self._values.append(torch.quantile(flat, self.percentile / 100.0))

    def true_max(self) -> float:
        return self._max.true_max()

    def amax(self) -> float:
        if not self._values:
            return 0.0
        return float(torch.stack(self._values).double().mean())

    def stats(self) -> dict[str, Any]:
        amax = self.amax()
        sample_max = torch.stack(self._sample_max).float().cpu() if self._sample_max else torch.zeros(0)
        clipped = float((sample_max > amax).float().mean()) if sample_max.numel() else 0.0
        return {"amax": amax, "max": self.true_max(), "percentile": self.percentile, "samples": self.samples,
                # share of samples whose |x| max is above the amax (they get clipped)
                "clipped_samples": clipped,
                "max_over_amax": (self.true_max() / amax) if amax > 0 else math.inf}


def make_observer(options) -> MaxObserver | PercentileObserver:
    """The observer a `CalibrationOptions` asks for."""
    if options.method == "max":
        return MaxObserver()
    if options.method == "percentile":
        return PercentileObserver(options.percentile)
    raise ValueError(f"unknown calibration method {options.method!r}; expected 'max' or 'percentile'")
