"""Converters whose output shape depends on the input data: `NonZero`, `Compress`, `Unique`.

Under `torch.export` their data-dependent sizes become unbacked SymInts (`torch.nonzero`, `torch.unique` and
`unique_dim` have meta kernels for them); AOTInductor runs `nonzero` itself and `unique` / `unique_dim` through
its proxy executor (no C shim). What follows such an output must not branch on its size.
"""
from __future__ import annotations

import torch

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor


@reg("NonZero", since=9)
def non_zero(ctx, x):
    """[rank, count] int64 indices in row-major order (a scalar gives [0, 1] or [0, 0])."""
    return torch.nonzero(as_tensor(x)).t()


@reg("Compress", since=9)
def compress(ctx, x, condition):
    """The slices along `axis` (else the elements of the flattened input) where `condition` holds; a condition
    shorter than the axis drops the slices past its end."""
    x = as_tensor(x)
    kept = torch.nonzero(as_tensor(condition)).reshape(-1)
    axis = ctx.attr("axis")
    if axis is None:
        return x.reshape(-1).index_select(0, kept)
    return x.index_select(axis % x.ndim, kept)


@reg("Unique", since=11)
def unique(ctx, x):
    """Unique elements of the flattened input, or unique slices along `axis`, ascending (`sorted=1`, the default)
    or in order of first occurrence; with the int64 index of each one's first occurrence, each input element's
    (slice's) index in Y, and the counts."""
    x = as_tensor(x)
    axis = ctx.attr("axis")
    if axis is None:
        x, dim = x.reshape(-1), 0
    else:
        dim = axis % x.ndim
    y, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True,
                                      dim=None if axis is None else dim)
    inverse = inverse.reshape(-1)
    first = torch.zeros_like(counts).scatter_reduce(0, inverse, torch.arange(inverse.numel(), device=x.device),
                                                    "amin", include_self=False)
    if not ctx.attr("sorted", 1):
        order = torch.argsort(first)
        y, first, counts = y.index_select(dim, order), first[order], counts[order]
        inverse = torch.argsort(order)[inverse]
    return (y, first, inverse, counts)[:max(ctx.num_outputs, 1)]
