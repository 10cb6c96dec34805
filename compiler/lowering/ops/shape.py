"""Shape and data-movement converters. Shapes flow as `IntList`s so dynamic dims stay SymInts."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.lowering.ops.dtypes import onnx_to_torch_dtype
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import IntList, as_ints, as_tensor


@reg("Shape", since=1)
def shape(ctx, x):
    dims = tuple(x.shape)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return IntList(dims[slice(start, end)])


@reg("Size")
def size(ctx, x):
    n = 1
    for d in x.shape:
        n = n * d
    return IntList((n,), scalar=True)


@reg("Constant")
def constant(ctx):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in ctx.attrs:
            value = ctx.attrs[key]
            break
    else:
        raise ctx.fail("only value / value_float(s) / value_int(s) Constants are supported")
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.int64, torch.int32) and value.ndim <= 1 and value.numel() <= 64:
            return IntList.from_numpy(value.numpy())
        return value
    if key == "value_ints":
        return IntList(tuple(value))
    if key == "value_int":
        return IntList((value,), scalar=True)
    return torch.tensor(value, dtype=torch.float32)


@reg("ConstantOfShape")
def constant_of_shape(ctx, shape_):
    value = ctx.attr("value")
    dims = as_ints(shape_)
    if value is None:
        return torch.zeros(dims, dtype=ctx.float_dtype(torch.float32))
    dtype = ctx.float_dtype(value.dtype)
    if not dtype.is_floating_point and len(dims) <= 1 and all(isinstance(d, int) for d in dims) \
            and (not dims or dims[0] <= 64):
        return IntList(tuple([int(value.reshape(-1)[0])] * (dims[0] if dims else 1)), scalar=not dims, dtype=dtype)
    return torch.full(dims, value.reshape(-1)[0].item(), dtype=dtype)


@reg("Reshape", since=5)
def reshape(ctx, x, shape_):
    dims = as_ints(shape_)
    if isinstance(x, IntList):
        return IntList(x.values, scalar=dims == [], dtype=x.dtype) if len(dims) <= 1 else as_tensor(x).reshape(dims)
    if not ctx.attr("allowzero", 0):
        dims = [x.shape[i] if (isinstance(d, int) and d == 0) else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@reg("Flatten")
def flatten(ctx, x):
    x = as_tensor(x)
    axis = ctx.attr("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(_prod(x.shape[:axis]), _prod(x.shape[axis:]))


def _prod(dims):
    n = 1
    for d in dims:
        n = n * d
    return n


@reg("Transpose")
def transpose(ctx, x):
    x = as_tensor(x)
    perm = ctx.attr("perm") or list(reversed(range(x.ndim)))
    return x.permute(perm)


def _axes_arg(ctx, axes):
    return as_ints(axes) if axes is not None else ctx.attr("axes")


@reg("Squeeze", since=1)
@reg("Squeeze", since=13)
def squeeze(ctx, x, axes=None):
    axes = _axes_arg(ctx, axes)
    if isinstance(x, IntList):
        return IntList(x.values, scalar=True, dtype=x.dtype) if len(x.values) == 1 else x
    if axes is None:
        return torch.squeeze(x)
    return torch.squeeze(x, [a % x.ndim for a in axes]) if axes else x


@reg("Unsqueeze", since=1)
@reg("Unsqueeze", since=13)
def unsqueeze(ctx, x, axes=None):
    axes = _axes_arg(ctx, axes)
    if isinstance(x, IntList) and x.scalar and axes in ([0], [-1]):
        return IntList(x.values, scalar=False, dtype=x.dtype)
    x = as_tensor(x)
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@reg("Concat")
def concat(ctx, *xs):
    xs = [x for x in xs if x is not None]
    if all(isinstance(x, IntList) for x in xs):
        return IntList(tuple(v for x in xs for v in x.values), dtype=xs[0].dtype)
    tensors = [as_tensor(x) for x in xs]
    dtype = max((t.dtype for t in tensors), key=lambda d: (d.is_floating_point, d.itemsize))
    return torch.cat([t.to(dtype) for t in tensors], dim=ctx.attr("axis"))


@reg("Split", since=1)
@reg("Split", since=13)
def split(ctx, x, sizes=None):
    x = as_tensor(x)
    axis = ctx.attr("axis", 0) % x.ndim
    sizes = as_ints(sizes) if sizes is not None else ctx.attr("split")
    if not sizes:
        n = ctx.attr("num_outputs", ctx.num_outputs)
        chunk = -(-x.shape[axis] // n)
        return tuple(torch.split(x, chunk, dim=axis))
    return tuple(torch.split(x, sizes, dim=axis))


@reg("Slice", since=10)
def slice_(ctx, x, starts, ends, axes=None, steps=None):
    starts, ends = as_ints(starts), as_ints(ends)
    axes = as_ints(axes) if axes is not None else list(range(len(starts)))
    steps = as_ints(steps) if steps is not None else [1] * len(starts)
    if isinstance(x, IntList):
        values = list(x.values)
        (s, e, st), = [(starts[0], ends[0], steps[0])]
        return IntList(tuple(values[_clip_slice(s, e, st, len(values))]), dtype=x.dtype)
    index = [slice(None)] * x.ndim
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a % x.ndim
        if st > 0:
            index[a] = _clip_slice(s, e, st, x.shape[a])
        else:  # negative steps: flip, then slice forward
            dim = x.shape[a]
            sl = _clip_slice(s, e, st, dim)
            start, stop, _ = sl.indices(dim) if all(isinstance(v, int) for v in (dim,)) else (sl.start, sl.stop, st)
            index[a] = slice(dim - 1 - start, dim - 1 - stop if stop >= 0 else None, -st)
            flips.append(a)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


def _clip_slice(start, end, step, dim):
    big = 2 ** 62
    if isinstance(end, int) and end >= big:
        end = None
    if isinstance(end, int) and end <= -big:
        end = None
    if isinstance(start, int) and start <= -big:
        start = None
    if isinstance(start, int) and start >= big:
        start = dim
    return slice(start, end, step)


@reg("Gather")
def gather(ctx, x, indices):
    axis = ctx.attr("axis", 0)
    if isinstance(x, IntList) and isinstance(indices, IntList):
        picked = tuple(x.values[i] for i in indices.values)
        return IntList(picked, scalar=indices.scalar, dtype=x.dtype)
    x, idx = as_tensor(x), as_tensor(indices)
    axis = axis % x.ndim
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if idx.ndim == 0:
        return x.select(axis, idx) if not isinstance(indices, IntList) else x.select(axis, indices.item())
    if axis == 0 and x.ndim == 2:
        return F.embedding(idx, x)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


@reg("GatherElements")
def gather_elements(ctx, x, indices):
    x, idx = as_tensor(x), as_tensor(indices)
    axis = ctx.attr("axis", 0) % x.ndim
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


@reg("GatherND")
def gather_nd(ctx, x, indices):
    x, idx = as_tensor(x), as_tensor(indices)
    b = ctx.attr("batch_dims", 0)
    if b != 0:
        raise ctx.fail("GatherND with batch_dims != 0 is not supported")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    out = x[tuple(flat[:, i] for i in range(k))]
    return out.reshape(*idx.shape[:-1], *x.shape[k:])


@reg("ScatterND")
def scatter_nd(ctx, x, indices, updates):
    x, idx, upd = as_tensor(x).clone(), as_tensor(indices), as_tensor(updates)
    if ctx.attr("reduction", "none") != "none":
        raise ctx.fail("ScatterND reductions are not supported")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    x[tuple(flat[:, i] for i in range(k))] = upd.reshape(-1, *x.shape[k:]).to(x.dtype)
    return x


@reg("Expand")
def expand(ctx, x, shape_):
    dims = as_ints(shape_)
    x = as_tensor(x)
    rank = max(x.ndim, len(dims))
    dims = [1] * (rank - len(dims)) + dims
    xs = [1] * (rank - x.ndim) + list(x.shape)
    target = [xd if (isinstance(d, int) and d == 1) else d for d, xd in zip(dims, xs)]
    return x.reshape(xs).expand(target)


@reg("Tile")
def tile(ctx, x, repeats):
    return as_tensor(x).repeat(as_ints(repeats))


@reg("Range")
def range_(ctx, start, limit, delta):
    if all(isinstance(v, IntList) for v in (start, limit, delta)):
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)
    s, l, d = (as_tensor(v) for v in (start, limit, delta))
    dtype = s.dtype
    return torch.arange(s.item(), l.item(), d.item(), dtype=dtype)


@reg("Pad", since=11)
def pad(ctx, x, pads, value=None, axes=None):
    x = as_tensor(x)
    pads = as_ints(pads)
    axes = as_ints(axes) if axes is not None else list(range(x.ndim))
    n = len(axes)
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    axes = [a % x.ndim for a in axes]
    full = [0, 0] * x.ndim
    for j, a in enumerate(axes):
        full[2 * (x.ndim - 1 - a)] = pads[j]
        full[2 * (x.ndim - 1 - a) + 1] = pads[j + n]
    mode = ctx.attr("mode", "constant")
    if mode == "constant":
        fill = 0.0 if value is None else as_tensor(value).reshape(-1)[0].item()
        return F.pad(x, full, value=fill)
    return F.pad(x, full, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


@reg("TopK", since=10)
def topk(ctx, x, k):
    x = as_tensor(x)
    values, indices = torch.topk(x, as_ints(k)[0], dim=ctx.attr("axis", -1), largest=bool(ctx.attr("largest", 1)),
                                 sorted=bool(ctx.attr("sorted", 1)))
    return values, indices.to(torch.int64)


@reg("OneHot")
def one_hot(ctx, indices, depth, values):
    idx, vals = as_tensor(indices), as_tensor(values)
    n = as_ints(depth)[0]
    idx = torch.where(idx < 0, idx + n, idx).to(torch.int64)
    hot = F.one_hot(idx, n).to(torch.bool)
    out = torch.where(hot, vals[1], vals[0])
    axis = ctx.attr("axis", -1)
    return out if axis == -1 else torch.movedim(out, -1, axis)


@reg("EyeLike")
def eye_like(ctx, x):
    x = as_tensor(x)
    dtype = onnx_to_torch_dtype(ctx.attr("dtype")) if ctx.attr("dtype") is not None else x.dtype
    return torch.eye(x.shape[0], x.shape[1], dtype=dtype).roll(ctx.attr("k", 0), 1)
