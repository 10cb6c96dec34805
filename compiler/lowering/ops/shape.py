"""Shape and data-movement converters. Shapes flow as `IntList`s so dynamic dims stay SymInts."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from onnx import numpy_helper

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
        return IntList(tuple([ctx.extra["fill"]] * (dims[0] if dims else 1)), scalar=not dims, dtype=dtype)
    return torch.full(dims, ctx.extra["fill"], dtype=dtype)


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
        else:  # negative step: flip the axis, then slice forward
            index[a] = _flipped_slice(s, e, st, x.shape[a])
            flips.append(a)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


_BIG = 2 ** 62


def _clip_slice(start, end, step, dim):
    """A positive-step Python slice for ONNX starts/ends (INT64_MAX/MIN mean 'to the end')."""
    if isinstance(end, int) and abs(end) >= _BIG:
        end = None if end > 0 else 0
    if isinstance(start, int) and abs(start) >= _BIG:
        start = None if start < 0 else dim
    return slice(start, end, step)


def _flipped_slice(start, end, step, dim):
    """The forward slice over flip(x) that equals ONNX's x[start:end:step] for step < 0."""
    # Normalize as ONNX does for negative steps: start in [-1, dim-1], end in [-1, dim-1].
    if isinstance(start, int) and start >= _BIG:
        start = dim - 1
    elif isinstance(start, int) and start < 0:
        start = start + dim
    if isinstance(end, int) and end <= -_BIG:
        end = -1
    elif isinstance(end, int) and end < 0:
        end = end + dim
    start = torch.sym_max(torch.sym_min(start, dim - 1), -1)
    end = torch.sym_max(torch.sym_min(end, dim - 1), -1)
    # element i of x is element dim-1-i of flip(x)
    return slice(dim - 1 - start, torch.sym_max(dim - 1 - end, dim - 1 - start), -step)


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
    k = idx.shape[-1]
    batch = _prod(x.shape[:b])
    xf = x.reshape(batch, *x.shape[b:])
    flat = idx.reshape(batch, -1, k)
    coords = [torch.arange(batch, device=x.device).unsqueeze(1).expand(batch, flat.shape[1])]
    coords += [flat[..., i] for i in range(k)]
    out = xf[tuple(coords)]
    return out.reshape(*idx.shape[:-1], *x.shape[b + k:])


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@reg("ScatterND")
def scatter_nd(ctx, x, indices, updates):
    """Linearizes the index tuples over the leading k dims, then one index_{copy,add,reduce}."""
    x, idx, upd = as_tensor(x), as_tensor(indices), as_tensor(updates)
    k = idx.shape[-1]
    lead, rest = x.shape[:k], x.shape[k:]
    linear = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=x.device)
    for i in range(k):
        j = idx[..., i].to(torch.int64)
        linear = linear * lead[i] + torch.where(j < 0, j + lead[i], j)
    xf = x.reshape(_prod(lead), *rest)
    linear, upd = linear.reshape(-1), upd.reshape(-1, *rest).to(x.dtype)
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        out = xf.index_copy(0, linear, upd)
    elif reduction == "add":
        out = xf.index_add(0, linear, upd)
    elif reduction in _SCATTER_REDUCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "index_reduce() is in beta"
            out = xf.index_reduce(0, linear, upd, _SCATTER_REDUCE[reduction], include_self=True)
    else:
        raise ctx.fail(f"unknown reduction {reduction!r}")
    return out.reshape(x.shape)


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


def _scalar(ctx, index: int, value):
    """A Python scalar for a Range operand: IntList values, constant initializers, else `.item()`."""
    if isinstance(value, IntList):
        return value.item()
    proto = ctx.extra.get("initializers", {}).get(index)
    if proto is not None:
        return numpy_helper.to_array(proto).reshape(-1)[0].item()
    return as_tensor(value).item()  # data-dependent: works eagerly, not under torch.export


@reg("Range")
def range_(ctx, start, limit, delta):
    dtype = next(v.dtype for v in (start, limit, delta) if isinstance(v, (IntList, torch.Tensor)))
    s, l, d = (_scalar(ctx, i, v) for i, v in enumerate((start, limit, delta)))
    if all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) or isinstance(v, torch.SymInt)
           for v in (s, l, d)):  # integral bounds: an integer arange keeps SymInt lengths exact
        s, l, d = (int(v) if isinstance(v, float) else v for v in (s, l, d))
        return torch.arange(s, l, d, dtype=torch.int64).to(ctx.float_dtype(dtype))
    return torch.arange(s, l, d, dtype=ctx.float_dtype(dtype))


@reg("Pad", since=11)
def pad(ctx, x, pads, value=None, axes=None):
    x = as_tensor(x)
    pads = as_ints(pads)
    axes = as_ints(axes) if axes is not None else list(range(x.ndim))
    n = len(axes)
    axes = [a % x.ndim for a in axes]
    full = [0, 0] * x.ndim
    for j, a in enumerate(axes):
        full[2 * (x.ndim - 1 - a)] = pads[j]
        full[2 * (x.ndim - 1 - a) + 1] = pads[j + n]
    while len(full) > 2 and full[-2:] == [0, 0]:  # torch's non-constant modes pad only trailing dims
        full = full[:-2]
    mode = ctx.attr("mode", "constant")
    if mode == "constant":
        fill = 0.0 if value is None else as_tensor(value).reshape(-1)[0].item()
        return F.pad(x, full, value=fill)
    return F.pad(x, full, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


@reg("TopK", since=10)
def topk(ctx, x, k):
    """Stable sort + narrow: among equal values ONNX returns the lower index first (torch.topk may not)."""
    x = as_tensor(x)
    axis = ctx.attr("axis", -1) % x.ndim
    largest = bool(ctx.attr("largest", 1))
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    k = as_ints(k)[0]
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k).to(torch.int64)


@reg("OneHot")
def one_hot(ctx, indices, depth, values):
    idx, vals = as_tensor(indices), as_tensor(values)
    n = as_ints(depth)[0]
    n = int(n) if isinstance(n, float) else n
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + n, idx)
    hot = idx.unsqueeze(-1) == torch.arange(n, device=idx.device)
    out = torch.where(hot, vals[1], vals[0])
    axis = ctx.attr("axis", -1)
    return out if axis == -1 else torch.movedim(out, -1, axis % out.ndim)


@reg("EyeLike")
def eye_like(ctx, x):
    x = as_tensor(x)
    dtype = onnx_to_torch_dtype(ctx.attr("dtype")) if ctx.attr("dtype") is not None else x.dtype
    return torch.eye(x.shape[0], x.shape[1], dtype=dtype).roll(ctx.attr("k", 0), 1)


def _wrap_negative(indices: torch.Tensor, dim) -> torch.Tensor:
    """Indices in [-dim, dim) as int64 in [0, dim)."""
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + dim, indices)


@reg("ScatterElements", since=11)
def scatter_elements(ctx, x, indices, updates):
    """torch's scatter / scatter_reduce (include_self: the reduction starts from x's values). With reduction 'none',
    duplicate indices are undefined in ONNX; one of the updates wins."""
    x, upd = as_tensor(x), as_tensor(updates)
    axis = ctx.attr("axis", 0) % x.ndim
    idx = _wrap_negative(as_tensor(indices), x.shape[axis])
    upd = upd.to(x.dtype)
    reduction = ctx.attr("reduction", "none")
    if reduction == "none":
        return torch.scatter(x, axis, idx, upd)
    if reduction != "add" and reduction not in _SCATTER_REDUCE:
        raise ctx.fail(f"unknown reduction {reduction!r}")
    return torch.scatter_reduce(x, axis, idx, upd, _SCATTER_REDUCE.get(reduction, "sum"), include_self=True)


@reg("TensorScatter", since=24)
def tensor_scatter(ctx, past, update, write_indices=None):
    """A KV-cache write: batch b's update rows go to `write_indices[b] + i` along `axis` (modulo the cache length in
    'circular' mode), one scatter over the update's shape."""
    past, update = as_tensor(past), as_tensor(update)
    axis = ctx.attr("axis", -2) % past.ndim
    if axis == 0:
        raise ctx.fail("axis cannot be the batch axis 0")
    mode = ctx.attr("mode", "linear")
    if mode not in ("linear", "circular"):
        raise ctx.fail(f"unknown mode {mode!r}")
    ones = [1] * past.ndim
    offsets = torch.arange(update.shape[axis], device=past.device).reshape(ones[:axis] + [-1] + ones[axis + 1:])
    start = 0 if write_indices is None else as_tensor(write_indices).to(torch.int64).reshape([-1] + ones[1:])
    positions = start + offsets
    if mode == "circular":
        positions = positions % past.shape[axis]
    return torch.scatter(past, axis, positions.expand(update.shape), update.to(past.dtype))


@reg("DepthToSpace")
def depth_to_space(ctx, x):
    """[n, c * b * b, h, w] -> [n, c, h * b, w * b]; the channel splits as (b, b, c) in DCR mode, (c, b, b) in CRD."""
    x, block = as_tensor(x), ctx.attr("blocksize")
    n, channels, h, w = x.shape
    c = channels // (block * block)
    if _block_mode(ctx) == "DCR":
        blocks, order = x.reshape(n, block, block, c, h, w), (0, 3, 4, 1, 5, 2)
    else:
        blocks, order = x.reshape(n, c, block, block, h, w), (0, 1, 4, 2, 5, 3)
    return blocks.permute(order).reshape(n, c, h * block, w * block)


@reg("SpaceToDepth")
def space_to_depth(ctx, x):
    """The inverse of DepthToSpace: [n, c, h * b, w * b] -> [n, c * b * b, h, w] (DCR: (b, b, c) channels)."""
    x, block = as_tensor(x), ctx.attr("blocksize")
    n, c, height, width = x.shape
    h, w = height // block, width // block
    order = (0, 3, 5, 1, 2, 4) if _block_mode(ctx) == "DCR" else (0, 1, 3, 5, 2, 4)
    return x.reshape(n, c, h, block, w, block).permute(order).reshape(n, c * block * block, h, w)


def _block_mode(ctx) -> str:
    mode = ctx.attr("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise ctx.fail(f"unknown mode {mode!r} (DCR or CRD)")
    return mode
