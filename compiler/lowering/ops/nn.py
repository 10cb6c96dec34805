"""Neural-network converters: MatMul/Gemm, convolutions, pooling, normalizations, Einsum."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.lowering.ops.elementwise import _promote
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor


@reg("MatMul")
def matmul(ctx, a, b):
    a, b = _promote(as_tensor(a), as_tensor(b))
    return torch.matmul(a, b)


@reg("Gemm")
def gemm(ctx, a, b, c=None):
    a, b = _promote(as_tensor(a), as_tensor(b))
    if ctx.attr("transA", 0):
        a = a.t()
    if ctx.attr("transB", 0):
        b = b.t()
    y = a @ b
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        c = as_tensor(c).to(y.dtype)
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _explicit_pads(ctx, x, kernel, strides, dilations) -> list:
    """ONNX pads [begin..., end...] for `x`'s spatial dims, resolving auto_pad SAME_UPPER/SAME_LOWER/VALID."""
    spatial = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "VALID":
        return [0] * (2 * spatial)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
            total = torch.sym_max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(total - small if auto_pad == "SAME_LOWER" else small)
            end.append(small if auto_pad == "SAME_LOWER" else total - small)
        return begin + end
    return list(ctx.attr("pads") or [0] * (2 * spatial))


def _torch_pad_list(pads: list) -> list:
    """ONNX [b0, b1, ..., e0, e1, ...] -> F.pad's [b_last, e_last, ..., b0, e0]."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _symmetric(pads: list, limit: list | None = None) -> bool:
    n = len(pads) // 2
    ok = all(isinstance(p, int) for p in pads) and pads[:n] == pads[n:]
    return ok and (limit is None or all(p <= lim for p, lim in zip(pads[:n], limit)))


@reg("Conv")
def conv(ctx, x, w, b=None):
    x, w = _promote(as_tensor(x), as_tensor(w))
    spatial = w.ndim - 2
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    strides, dilations = ctx.attr("strides", [1] * spatial), ctx.attr("dilations", [1] * spatial)
    pads = _explicit_pads(ctx, x, list(w.shape[2:]), strides, dilations)
    if _symmetric(pads):
        padding = pads[:spatial]
    else:  # asymmetric (or symbolic SAME) padding: pad explicitly with zeros first
        x, padding = F.pad(x, _torch_pad_list(pads)), [0] * spatial
    return fn(x, w, None if b is None else as_tensor(b).to(x.dtype), stride=strides, padding=padding,
              dilation=dilations, groups=ctx.attr("group", 1))


@reg("ConvTranspose")
def conv_transpose(ctx, x, w, b=None):
    x, w = _promote(as_tensor(x), as_tensor(w))
    spatial = w.ndim - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    pads = ctx.attr("pads") or [0] * (2 * spatial)
    if pads[:spatial] != pads[spatial:]:
        raise ctx.fail(f"asymmetric pads {pads} are not supported")
    return fn(x, w, None if b is None else as_tensor(b).to(x.dtype), stride=ctx.attr("strides", [1] * spatial),
              padding=pads[:spatial], output_padding=ctx.attr("output_padding", [0] * spatial),
              groups=ctx.attr("group", 1), dilation=ctx.attr("dilations", [1] * spatial))


@reg("MaxPool")
def max_pool(ctx, x):
    x = as_tensor(x)
    k = ctx.attr("kernel_shape")
    spatial = len(k)
    if ctx.num_outputs > 1:
        raise ctx.fail("MaxPool with an Indices output is not supported")
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    strides, dilations = ctx.attr("strides", [1] * spatial), ctx.attr("dilations", [1] * spatial)
    pads = _explicit_pads(ctx, x, k, strides, dilations)
    if _symmetric(pads, [kk // 2 for kk in k]):
        padding = pads[:spatial]
    else:  # torch pools take symmetric pads of at most half the kernel: pad with -inf first
        x, padding = F.pad(x, _torch_pad_list(pads), value=float("-inf")), [0] * spatial
    return fn(x, k, stride=strides, padding=padding, dilation=dilations, ceil_mode=bool(ctx.attr("ceil_mode", 0)))


@reg("AveragePool")
def avg_pool(ctx, x):
    x = as_tensor(x)
    k = ctx.attr("kernel_shape")
    spatial = len(k)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    strides = ctx.attr("strides", [1] * spatial)
    if any(d != 1 for d in ctx.attr("dilations", [1] * spatial)):
        raise ctx.fail("AveragePool with dilations is not supported")
    pads = _explicit_pads(ctx, x, k, strides, [1] * spatial)
    ceil, include = bool(ctx.attr("ceil_mode", 0)), bool(ctx.attr("count_include_pad", 0))
    if _symmetric(pads, [kk // 2 for kk in k]):
        return fn(x, k, stride=strides, padding=pads[:spatial], ceil_mode=ceil, count_include_pad=include)
    # Asymmetric or large pads: pad with zeros; without count_include_pad divide by the padded mask's mean.
    torch_pads = _torch_pad_list(pads)
    y = fn(F.pad(x, torch_pads), k, stride=strides, ceil_mode=ceil)
    if include:
        return y
    mask = F.pad(torch.ones_like(x[:, :1]), torch_pads)
    return y / fn(mask, k, stride=strides, ceil_mode=ceil)


@reg("GlobalAveragePool")
def global_avg_pool(ctx, x):
    x = as_tensor(x)
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


@reg("GlobalMaxPool")
def global_max_pool(ctx, x):
    x = as_tensor(x)
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


@reg("BatchNormalization", since=9)
def batch_norm(ctx, x, scale, bias, mean, var):
    x = as_tensor(x)
    shape = [1, -1] + [1] * (x.ndim - 2)
    inv = torch.rsqrt(as_tensor(var).to(x.dtype) + ctx.attr("epsilon", 1e-5))
    return (x - as_tensor(mean).to(x.dtype).reshape(shape)) * (inv * as_tensor(scale).to(x.dtype)).reshape(shape) \
        + as_tensor(bias).to(x.dtype).reshape(shape)


@reg("InstanceNormalization")
def instance_norm(ctx, x, scale, bias):
    x = as_tensor(x)
    return F.instance_norm(x, weight=as_tensor(scale).to(x.dtype), bias=as_tensor(bias).to(x.dtype),
                           eps=ctx.attr("epsilon", 1e-5))


def _normalized_dims(ctx, x):
    axis = ctx.attr("axis", -1) % x.ndim
    return list(range(axis, x.ndim))


@reg("LayerNormalization", since=17)
def layer_norm(ctx, x, scale, bias=None):
    x = as_tensor(x)
    dims = _normalized_dims(ctx, x)
    xf = x.float()
    mean = xf.mean(dim=dims, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + ctx.attr("epsilon", 1e-5))
    y = (xf - mean) * inv_std * as_tensor(scale).float()
    if bias is not None:
        y = y + as_tensor(bias).float()
    return (y.to(x.dtype), mean, inv_std)[:ctx.num_outputs] if ctx.num_outputs > 1 else y.to(x.dtype)


@reg("RMSNormalization", since=23)
def rms_norm(ctx, x, scale):
    x = as_tensor(x)
    dims = _normalized_dims(ctx, x)
    xf = x.float()
    y = xf * torch.rsqrt((xf * xf).mean(dim=dims, keepdim=True) + ctx.attr("epsilon", 1e-5))
    return (y * as_tensor(scale).float()).to(x.dtype)


@reg("Einsum")
def einsum(ctx, *xs):
    tensors = [as_tensor(x) for x in xs]
    dtype = max((t.dtype for t in tensors), key=lambda d: d.itemsize)
    return torch.einsum(ctx.attr("equation"), *[t.to(dtype) for t in tensors])
