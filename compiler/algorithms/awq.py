"""AWQ: activation-aware weight quantization (Lin et al., 2023; the llm-awq / AutoAWQ search).

For ``y = x @ W`` (W [K, N]), AWQ picks a per-input-channel scale ``s`` [K] and quantizes
``W * s[:, None]`` instead of ``W``; the activations are divided by ``s`` (folded into the op that
produces ``x``: a norm's gamma, the previous linear's output columns, ...), so the float function is
unchanged: ``(x / s) @ (W * s) == x @ W``. Salient input channels (large mean |x|) get s > 1, which
shrinks their relative rounding error.

The search (per layer, on the weight's device):

1. scale search: ``s = act_abs_mean ** alpha`` normalised by ``sqrt(max(s) * min(s))``, for
   ``alpha = i / grid``, i = 0..grid-1 (alpha = 0 is RTN); keep the alpha minimising
   ``||x @ W - (x / s) @ Q(W * s)||^2`` on a small activation sample.
2. clip search: for every (group, output column) shrink the quantization range by a ratio in
   ``1, 1 - 1/clip_grid, ..., > 1 - max_shrink`` and keep the ratio minimising that group's
   contribution to the output error, ``||x_g (Q(w_g) - w_g)||^2`` on the (scaled) sample.

Statistics, streamed during calibration (no activations accumulated beyond the capped sample):

- `ActAbsMeanObserver`: per-channel mean |x| over all tokens (running sum and count).
- `ActivationSampleObserver`: a uniform sample of at most ``max_rows`` activation rows, chosen by a
  seeded hash of each token's global index, so the sample does not depend on how the tokens were
  batched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qcompile.algorithms.int4 import (QuantizedWeight, _check_weight, fake_quantize, fake_quantize_groups,
                                      group_params, quantize_rtn, resolve_group_size)


def _rows(x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    x = x.detach()
    if x.ndim == 0:
        raise ValueError("expected activations [..., K], got a scalar")
    if k is not None and x.shape[-1] != k:
        raise ValueError(f"activation has {x.shape[-1]} channels, expected {k}")
    return x.reshape(-1, x.shape[-1])


class ActAbsMeanObserver:
    """Per-input-channel mean |x| over all tokens: keeps only a running sum and a token count.

    ``update(x)`` takes activations [..., K] (every leading dim is tokens); ``value()`` is [K] float32
    on the activations' device.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self._sum: torch.Tensor | None = None
        self.tokens = 0
        self.samples = 0

    def update(self, x: torch.Tensor) -> None:
        rows = _rows(x, None if self._sum is None else self._sum.numel())
        self.samples += 1
        if rows.shape[0] == 0:
            return
        s = rows.abs().to(self.dtype).sum(dim=0)
        self._sum = s if self._sum is None else self._sum + s
        self.tokens += rows.shape[0]

    def value(self) -> torch.Tensor:
        if self._sum is None or self.tokens == 0:
            raise ValueError("ActAbsMeanObserver saw no tokens")
        return (self._sum / self.tokens).float()


def _splitmix64(idx: np.ndarray, seed: int) -> np.ndarray:
    z = idx.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % (1 << 64))
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class ActivationSampleObserver:
    """A uniform random sample of at most ``max_rows`` activation rows, streamed.

    Each token gets a key from a seeded hash of its global index (its position in the stream of
    tokens); the observer keeps the ``max_rows`` tokens with the smallest keys. The sample is therefore
    the same however the tokens are split into batches, and memory is ``max_rows * K`` values.
    ``value()`` returns the rows [<=max_rows, K] in stream order, in the activations' dtype.
    """

    def __init__(self, max_rows: int = 512, seed: int = 0) -> None:
        if max_rows <= 0:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        self.max_rows = max_rows
        self.seed = seed
        self.tokens = 0
        self.samples = 0
        self._rows: torch.Tensor | None = None
        self._keys: np.ndarray = np.zeros(0, dtype=np.uint64)
        self._index: np.ndarray = np.zeros(0, dtype=np.int64)

    def update(self, x: torch.Tensor) -> None:
        rows = _rows(x, None if self._rows is None else self._rows.shape[1])
        self.samples += 1
        n = rows.shape[0]
        if n == 0:
            return
        index = np.arange(self.tokens, self.tokens + n, dtype=np.int64)
        self.tokens += n
        keys = _splitmix64(index, self.seed)
        if n > self.max_rows:  # keep the batch's own best first, so at most 2 * max_rows rows meet below
            sel = np.argsort(keys, kind="stable")[: self.max_rows]
            keys, index = keys[sel], index[sel]
            rows = rows[torch.from_numpy(sel).to(rows.device)]
        if self._rows is None:
            all_rows, all_keys, all_index = rows.clone(), keys, index
        else:
            all_rows = torch.cat([self._rows, rows.to(self._rows.dtype)])
            all_keys, all_index = np.concatenate([self._keys, keys]), np.concatenate([self._index, index])
        keep = np.argsort(all_keys, kind="stable")[: self.max_rows]
        keep = keep[np.argsort(all_index[keep], kind="stable")]  # stream order
        self._rows = all_rows[torch.from_numpy(keep).to(all_rows.device)]
        self._keys, self._index = all_keys[keep], all_index[keep]

    def value(self) -> torch.Tensor:
        if self._rows is None:
            raise ValueError("ActivationSampleObserver saw no tokens")
        return self._rows

    @property
    def indices(self) -> np.ndarray:
        """Global token indices of the sampled rows (stream order)."""
        return self._index.copy()


@dataclass
class AwqResult:
    """What `awq_search` found for one layer.

    Attributes:
        qweight: the quantized ``W * scales[:, None]`` (with the clip ratios applied).
        scales: float32 [K]; fold ``1 / scales`` into the producer of x (activations are divided by it).
        alpha: the chosen exponent (``scales ∝ act_abs_mean ** alpha``; 0 means plain RTN scaling).
        clip_ratio: float32 [K/g, N], the chosen range shrink per (group, output column); all 1 when the
            clip search is off.
        losses: mean squared output errors on the sample: "rtn" (alpha 0, no clip), "scaled" (best
            alpha, no clip), "final" (best alpha and clip).
    """

    qweight: QuantizedWeight
    scales: torch.Tensor
    alpha: float
    clip_ratio: torch.Tensor
    losses: dict[str, float] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight in the original space, ``Q(W * s) / s[:, None]`` [K, N]."""
        return (self.qweight.dequantize() / self.scales[:, None]).to(dtype)


def _normalised_scales(act_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_abs_mean.float().pow(alpha).clamp_min(1e-4)
    return s / torch.sqrt(s.max() * s.min())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def _clip_search(w: torch.Tensor, x: torch.Tensor, g: int, symmetric: bool, clip_grid: int, max_shrink: float,
                 chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Per (group, column) range shrink minimising ``||x_g (Q(w_g) - w_g)||^2``; [G, N] float32."""
    K, N = w.shape
    G = K // g
    T = x.shape[0]
    wg = w.reshape(G, g, N)
    xg = x.reshape(T, G, g).transpose(0, 1)  # [G, T, g]
    ratios = [1.0 - i / clip_grid for i in range(max(1, int(round(max_shrink * clip_grid))))]
    best_ratio = torch.ones(G, N, device=w.device)
    best_err = torch.full((G, N), float("inf"), device=w.device)
    chunk = max(1, chunk_elems // max(1, G * T))
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        w_c = wg[:, :, n0:n1]
        for r in ratios:
            scale, zero = group_params(w_c, symmetric, r)
            dq = fake_quantize(w_c, scale[:, None, :], None if zero is None else zero[:, None, :])
            err = torch.bmm(xg, dq - w_c).pow(2).mean(dim=1)  # [G, n]
            better = err < best_err[:, n0:n1]
            best_err[:, n0:n1] = torch.where(better, err, best_err[:, n0:n1])
            best_ratio[:, n0:n1] = torch.where(better, torch.full_like(err, r), best_ratio[:, n0:n1])
    return best_ratio


@torch.no_grad()
def awq_search(w: torch.Tensor, x_sample: torch.Tensor, act_abs_mean: torch.Tensor, group_size: int | None,
               grid: int = 20, clip_grid: int | None = 20, max_shrink: float = 0.5,
               symmetric: bool = True) -> AwqResult:
    """AWQ scale search then clip search for ``y = x @ w``.

    Args:
        w: weight [K, N] (any float dtype; math in float32 on w's device).
        x_sample: activation rows [T, K] (or [..., K]) for the search loss, e.g. from
            `ActivationSampleObserver` (a few hundred tokens is enough).
        act_abs_mean: [K] per-channel mean |x| over all calibration tokens (`ActAbsMeanObserver`).
        group_size: rows per group along K (K, None or -1: per output channel).
        grid: number of alphas tried, ``alpha = i / grid`` for i in range(grid).
        clip_grid: clip-ratio grid resolution (ratios ``1 - i / clip_grid``, i < max_shrink * clip_grid);
            None or 0 skips the clip search.
        max_shrink: the largest range shrink tried by the clip search.
        symmetric: int4 symmetric (default) or uint4 with zero points.
    """
    _check_weight(w)
    K, N = w.shape
    g = resolve_group_size(K, group_size)
    dev = w.device
    wf = w.float()
    x = _rows(x_sample, K).to(dev, torch.float32)
    mean = act_abs_mean.to(dev, torch.float32).reshape(-1)
    if mean.numel() != K:
        raise ValueError(f"act_abs_mean has {mean.numel()} channels, expected K = {K}")
    if x.shape[0] == 0:
        raise ValueError("awq_search needs at least one activation row")
    ref = x @ wf

    best = (float("inf"), 0.0, torch.ones(K, device=dev))
    rtn_loss = None
    for i in range(max(1, grid)):
        alpha = i / max(1, grid)
        s = _normalised_scales(mean, alpha) if alpha > 0 else torch.ones(K, device=dev)
        dq = fake_quantize_groups(wf * s[:, None], g, symmetric)
        loss = _mse(ref, (x / s) @ dq)
        if i == 0:
            rtn_loss = loss
        if loss < best[0]:
            best = (loss, alpha, s)
    scaled_loss, alpha, s = best

    ws = wf * s[:, None]
    xs = x / s
    if clip_grid:
        clip = _clip_search(ws, xs, g, symmetric, clip_grid, max_shrink)
    else:
        clip = torch.ones(K // g, N, device=dev)
    qweight = quantize_rtn(ws, g, symmetric, clip)
    final_loss = _mse(ref, xs @ qweight.dequantize())
    if final_loss > scaled_loss:  # clipping is chosen per group on partial sums; never accept a worse total
        clip = torch.ones_like(clip)
        qweight = quantize_rtn(ws, g, symmetric)
        final_loss = scaled_loss
    return AwqResult(qweight, s.float(), float(alpha), clip.float(),
                     {"rtn": float(rtn_loss), "scaled": float(scaled_loss), "final": float(final_loss)})
