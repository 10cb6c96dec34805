"""Reductions (axes as attribute before opset 18 / 13 for ReduceSum, as input after) and ArgMax/ArgMin."""
from __future__ import annotations

import torch

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_ints, as_tensor


def _axes(ctx, x, axes_input):
    axes = as_ints(axes_input) if axes_input is not None else ctx.attr("axes")
    if not axes:
        return None if not ctx.attr("noop_with_empty_axes", 0) else []
    return [a % x.ndim for a in axes]


def _reduction(fn):
    def convert(ctx, x, axes=None):
        x = as_tensor(x)
        dims = _axes(ctx, x, axes)
        keep = bool(ctx.attr("keepdims", 1))
        if dims == []:
            return x
        if dims is None:
            dims = list(range(x.ndim))
        return fn(x, dims, keep)
    return convert


def _sum(x, d, k):
    return torch.sum(x, dim=d, keepdim=k)


def _mean(x, d, k):
    return torch.mean(x, dim=d, keepdim=k)


def _max(x, d, k):
    return torch.amax(x, dim=d, keepdim=k)


def _min(x, d, k):
    return torch.amin(x, dim=d, keepdim=k)


def _prod(x, d, k):
    for dim in sorted(d, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=k)
    return x


def _l2(x, d, k):
    return torch.sqrt(torch.sum(x * x, dim=d, keepdim=k))


def _l1(x, d, k):
    return torch.sum(torch.abs(x), dim=d, keepdim=k)


def _sum_square(x, d, k):
    return torch.sum(x * x, dim=d, keepdim=k)


def _log_sum_exp(x, d, k):
    return torch.logsumexp(x, dim=d, keepdim=k)


def _log_sum(x, d, k):
    return torch.log(torch.sum(x, dim=d, keepdim=k))


for _op, _fn in [("ReduceSum", _sum), ("ReduceMean", _mean), ("ReduceMax", _max), ("ReduceMin", _min),
                 ("ReduceProd", _prod), ("ReduceL2", _l2), ("ReduceL1", _l1), ("ReduceSumSquare", _sum_square),
                 ("ReduceLogSumExp", _log_sum_exp), ("ReduceLogSum", _log_sum)]:
    _conv = _reduction(_fn)
    reg(_op, since=1)(_conv)
    reg(_op, since=13 if _op == "ReduceSum" else 18)(_conv)


def _arg(fn):
    def convert(ctx, x):
        x = as_tensor(x)
        axis = ctx.attr("axis", 0) % x.ndim
        keep = bool(ctx.attr("keepdims", 1))
        if ctx.attr("select_last_index", 0):
            flipped = torch.flip(x, [axis])
            idx = fn(flipped, dim=axis, keepdim=keep)
            return (x.shape[axis] - 1 - idx).to(torch.int64)
        return fn(x, dim=axis, keepdim=keep).to(torch.int64)
    return convert


reg("ArgMax")(_arg(torch.argmax))
reg("ArgMin")(_arg(torch.argmin))


@reg("CumSum")
def cumsum(ctx, x, axis):
    return _cumulative(ctx, as_tensor(x), axis, torch.cumsum, 0)


@reg("CumProd", since=26)
def cumprod(ctx, x, axis):
    return _cumulative(ctx, as_tensor(x), axis, torch.cumprod, 1)


def _cumulative(ctx, x: torch.Tensor, axis, scan, identity) -> torch.Tensor:
    """A scan along `axis` with ONNX's `reverse` and `exclusive` (each output leaves its own element out: the scan of
    the input shifted by one, starting from `identity`)."""
    dim = as_ints(axis)[0] % x.ndim
    reverse = bool(ctx.attr("reverse", 0))
    if reverse:
        x = torch.flip(x, [dim])
    if ctx.attr("exclusive", 0):
        first = torch.full_like(x.narrow(dim, 0, 1), identity)
        x = torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim)
    y = scan(x, dim)
    return torch.flip(y, [dim]) if reverse else y
