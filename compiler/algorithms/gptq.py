"""GPTQ: second-order weight quantization with error compensation (Frantar et al., 2022).

For ``y = x @ W`` (W [K, N]) the layer loss ``||x W - x W_hat||^2`` has Hessian ``H = 2/n Σ xᵀx``
([K, K], over the n calibration tokens). GPTQ quantizes W one row at a time along K (a "column" in
the paper's [N, K] layout) and spreads each row's rounding error over the rows not yet quantized,
using the upper Cholesky factor of ``H⁻¹`` (``H`` damped by ``damp * mean(diag H)``). Updates to
rows outside the current block of ``block_size`` rows are applied lazily, once per block.

Groups and scales: a group's scale (and zero point) is computed when the first of its rows is
about to be quantized, from the group's current (error-compensated) values; rows of the group that
sit outside the current block get the block's pending lazy update applied first, so the values
are exactly the compensated ones (reference GPTQ reads stale values there when a group starts in
the middle of a block).

act_order (quantize rows in decreasing ``diag(H)``) keeps the groups *static*: group j is still
rows ``[j*g, (j+1)*g)`` of the original W, so the result has the plain [K/g, N] scale layout that
ONNX ``DequantizeLinear(block_size=g)`` takes (no ``g_idx`` permutation table). The rows of a group
are visited out of order; its scale is fixed when the first of them (the one with the largest
``H_ii``) comes up, from the values all its rows have at that point. The result is un-permuted
before it is returned.

Dead input channels (``H_ii == 0``: always zero in calibration) get ``H_ii = 1``; their rows are
rounded like RTN and their error goes nowhere. Unlike reference GPTQ we do not zero those rows:
a channel that calibration never excited may still carry signal at run time.

`HessianObserver` accumulates ``Σ xᵀx`` and the token count while calibration streams batches; no
activations are kept.
"""
from __future__ import annotations

import torch

from qcompile.algorithms.int4 import (QuantizedWeight, _check_weight, dequantize_values, group_params,
                                      quantize_values, resolve_group_size)


class HessianObserver:
    """Streamed ``H = 2/n Σ_tokens xᵀx`` for one linear layer's input.

    ``update(x)`` takes activations [..., K]; ``value()`` is H [K, K] in the accumulation dtype
    (float32 by default; float64 for very long calibrations) on the activations' device.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._sum: torch.Tensor | None = None
        self.tokens = 0
        self.samples = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if self._sum is not None and rows.shape[1] != self._sum.shape[0]:
            raise ValueError(f"activation has {rows.shape[1]} channels, expected {self._sum.shape[0]}")
        self.samples += 1
        if rows.shape[0] == 0:
            return
        xtx = rows.T @ rows
        self._sum = xtx if self._sum is None else self._sum.add_(xtx)
        self.tokens += rows.shape[0]

    def value(self) -> torch.Tensor:
        if self._sum is None or self.tokens == 0:
            raise ValueError("HessianObserver saw no tokens")
        return self._sum * (2.0 / self.tokens)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (float64 math), raising the damping if H is not PD."""
    h = h.double()
    diag_mean = float(torch.diagonal(h).mean())
    if not diag_mean > 0:
        diag_mean = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * diag_mean
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U
        lam = max(lam * 10.0, 1e-6 * diag_mean)
    raise ValueError("GPTQ: the Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group_size: int | None, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, symmetric: bool = True) -> QuantizedWeight:
    """GPTQ-quantize ``w`` [K, N] given the input Hessian [K, K] (e.g. `HessianObserver.value()`).

    Args:
        w: weight [K, N], any float dtype; math in float32 (Cholesky in float64) on w's device.
        hessian: [K, K], ``2/n Σ xᵀx`` over the calibration tokens; not modified.
        group_size: rows per group along K (K, None or -1: per output channel).
        damp: added to the diagonal as ``damp * mean(diag H)`` (raised 10x until H is PD).
        block_size: rows per lazy-update block.
        act_order: quantize rows in decreasing ``diag(H)`` order (static groups, see the module doc).
        symmetric: int4 symmetric (default) or uint4 with zero points.
    """
    _check_weight(w)
    K, N = w.shape
    if tuple(hessian.shape) != (K, K):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({K}, {K})")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    g = resolve_group_size(K, group_size)
    G = K // g
    dev = w.device
    H = hessian.to(dev, torch.float64).clone()
    if not torch.isfinite(H).all():
        raise ValueError("GPTQ: the Hessian has NaN or Inf entries")
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    diag[dead] = 1.0

    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    else:
        perm = torch.arange(K, device=dev)
    invperm = torch.argsort(perm)
    H = H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp).float()

    W = w.float()[perm].clone()  # rows in processing order
    Q = torch.zeros(K, N, device=dev, dtype=torch.float32)  # integer values, processing order
    scale = torch.zeros(G, N, device=dev, dtype=torch.float32)
    zero = None if symmetric else torch.zeros(G, N, device=dev, dtype=torch.float32)
    have = torch.zeros(G, dtype=torch.bool)  # on the host: per-row bookkeeping stays off the device
    group_of = (perm // g).tolist()  # processing position -> group
    members = invperm.reshape(G, g)  # group -> processing positions of its rows

    for b0 in range(0, K, block_size):
        b1 = min(K, b0 + block_size)
        W1 = W[b0:b1].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            i = b0 + j
            gid = group_of[i]
            if not have[gid]:
                pos = members[gid]
                vals = W[pos].clone()
                in_block = pos < b1
                vals[in_block] = W1[pos[in_block] - b0]
                out = ~in_block
                if j > 0 and bool(out.any()):  # the block's pending lazy update for rows after it
                    vals[out] = vals[out] - Hinv[b0:i][:, pos[out]].T @ Err1[:j]
                s, z = group_params(vals, symmetric)
                scale[gid] = s
                if zero is not None:
                    zero[gid] = z
                have[gid] = True
            s = scale[gid]
            z = None if zero is None else zero[gid]
            row = W1[j]
            q = quantize_values(row, s, z)
            Q[i] = q
            err = (row - dequantize_values(q, s, z)) / Hinv1[j, j]
            W1[j:] -= Hinv1[j, j:, None] * err[None, :]
            Err1[j] = err
        W[b0:b1] = W1
        if b1 < K:
            W[b1:] -= Hinv[b0:b1, b1:].T @ Err1

    Q = Q[invperm]
    return QuantizedWeight(Q.to(torch.int8), scale, None if zero is None else zero.to(torch.int8), g)
