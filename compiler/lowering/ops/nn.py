"""Neural-network converters: MatMul/Gemm, convolutions, pooling, normalizations, LRN, Einsum."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.lowering.ops.dtypes import onnx_to_torch_dtype
from qcompile.lowering.ops.elementwise import promote
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor


@reg("MatMul")
def matmul(ctx, a, b):
    a, b = promote(as_tensor(a), as_tensor(b))
    return torch.matmul(a, b)


@reg("Gemm")
def gemm(ctx, a, b, c=None):
    a, b = promote(as_tensor(a), as_tensor(b))
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


def torch_pad_list(pads: list) -> list:
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
    x, w = promote(as_tensor(x), as_tensor(w))
    spatial = w.ndim - 2
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    strides, dilations = ctx.attr("strides", [1] * spatial), ctx.attr("dilations", [1] * spatial)
    pads = _explicit_pads(ctx, x, list(w.shape[2:]), strides, dilations)
    if _symmetric(pads):
        padding = pads[:spatial]
    else:  # asymmetric (or symbolic SAME) padding: pad explicitly with zeros first
        x, padding = F.pad(x, torch_pad_list(pads)), [0] * spatial
    return fn(x, w, None if b is None else as_tensor(b).to(x.dtype), stride=strides, padding=padding,
              dilation=dilations, groups=ctx.attr("group", 1))


@reg("ConvTranspose")
def conv_transpose(ctx, x, w, b=None):
    """torch's transposed convolution without padding, then the ONNX pads cropped off (negative ones zero-padded):
    asymmetric pads, `output_shape` and SAME auto_pad all come down to (begin, end) pads per axis."""
    x, w = promote(as_tensor(x), as_tensor(w))
    spatial = w.ndim - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    strides, dilations = ctx.attr("strides", [1] * spatial), ctx.attr("dilations", [1] * spatial)
    extra = ctx.attr("output_padding", [0] * spatial)
    y = fn(x, w, None if b is None else as_tensor(b).to(x.dtype), stride=strides, output_padding=extra,
           groups=ctx.attr("group", 1), dilation=dilations)
    pads = _transposed_pads(ctx, x.shape[2:], list(y.shape[2:]), spatial)
    return F.pad(y, [-p for p in torch_pad_list(pads)]) if any(p != 0 for p in pads) else y


def _transposed_pads(ctx, sizes, full: list, spatial: int) -> list:
    """ONNX [begin..., end...] pads of a transposed convolution whose unpadded output has lengths `full`."""
    auto_pad = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    wanted = ctx.attr("output_shape")
    if wanted is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [size * s for size, s in zip(sizes, ctx.attr("strides", [1] * spatial))]
    if wanted is None:
        return list(ctx.attr("pads") or [0] * (2 * spatial))
    totals = [length - target for length, target in zip(full, wanted[-spatial:])]
    small = [t // 2 for t in totals]
    if auto_pad == "SAME_UPPER":
        return small + [t - h for t, h in zip(totals, small)]
    return [t - h for t, h in zip(totals, small)] + small


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
        x, padding = F.pad(x, torch_pad_list(pads), value=float("-inf")), [0] * spatial
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
    torch_pads = torch_pad_list(pads)
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


def normalized_dims(ctx, x):
    axis = ctx.attr("axis", -1) % x.ndim
    return list(range(axis, x.ndim))


@reg("LayerNormalization", since=17)
def layer_norm(ctx, x, scale, bias=None):
    x = as_tensor(x)
    dims = normalized_dims(ctx, x)
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
    return rms_normalize(x, scale, normalized_dims(ctx, x), ctx.attr("epsilon", 1e-5), x.dtype)[0]


def rms_normalize(x: torch.Tensor, scale, dims: list, epsilon: float, dtype: torch.dtype):
    """RMS normalization over `dims` in float32: (y in `dtype`, inv_std_var with `dims` kept)."""
    xf = x.float()
    inv_std = torch.rsqrt((xf * xf).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * inv_std * as_tensor(scale).float()).to(dtype), inv_std


@reg("Einsum")
def einsum(ctx, *xs):
    tensors = [as_tensor(x) for x in xs]
    dtype = max((t.dtype for t in tensors), key=lambda d: d.itemsize)
    return torch.einsum(ctx.attr("equation"), *[t.to(dtype) for t in tensors])


@reg("GroupNormalization", since=18)
def group_norm(ctx, x, scale, bias):
    """Opset 18: `scale` and `bias` hold one value per group; opset 21 (`group_norm_21`): one per channel."""
    x = as_tensor(x)
    groups = ctx.attr("num_groups")
    per_channel = x.shape[1] // groups
    return _group_norm(ctx, x, as_tensor(scale).repeat_interleave(per_channel),
                       as_tensor(bias).repeat_interleave(per_channel))


@reg("GroupNormalization", since=21)
def group_norm_21(ctx, x, scale, bias):
    return _group_norm(ctx, as_tensor(x), as_tensor(scale), as_tensor(bias))


def _group_norm(ctx, x, scale, bias):
    """Normalize per instance and group in the `stash_type` precision (float32 by default), then scale and shift
    per channel in X's type."""
    stash = onnx_to_torch_dtype(ctx.attr("stash_type", 1))
    normalized = F.group_norm(x.to(stash), ctx.attr("num_groups"), eps=ctx.attr("epsilon", 1e-5)).to(x.dtype)
    shape = [1, -1] + [1] * (x.ndim - 2)
    return normalized * scale.to(x.dtype).reshape(shape) + bias.to(x.dtype).reshape(shape)


@reg("LRN")
def lrn(ctx, x):
    """Each element over (bias + alpha / size * the sum of squares of channels c - floor((size - 1) / 2) ..
    c + ceil((size - 1) / 2)) ** beta."""
    x = as_tensor(x)
    size = ctx.attr("size")
    before = (size - 1) // 2
    squares = F.pad((x * x).transpose(1, -1), [before, size - 1 - before])
    square_sum = squares.unfold(-1, size, 1).sum(-1).transpose(1, -1)
    return x / (ctx.attr("bias", 1.0) + ctx.attr("alpha", 1e-4) / size * square_sum) ** ctx.attr("beta", 0.75)


@reg("LpPool")
def lp_pool(ctx, x):
    """(sum of |x| ** p over each window, pads counting as zeros) ** (1 / p), as a depthwise convolution with ones."""
    x = as_tensor(x)
    k = ctx.attr("kernel_shape")
    spatial = len(k)
    strides, dilations = ctx.attr("strides", [1] * spatial), ctx.attr("dilations", [1] * spatial)
    pads = _explicit_pads(ctx, x, k, strides, dilations)
    if ctx.attr("ceil_mode", 0):
        pads = _ceil_mode_pads(x, pads, k, strides, dilations)
    p = ctx.attr("p", 2)
    powered = F.pad(x.abs() ** p, torch_pad_list(pads))
    ones = torch.ones(x.shape[1], 1, *k, dtype=x.dtype, device=x.device)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(powered, ones, stride=strides, dilation=dilations, groups=x.shape[1]) ** (1.0 / p)


def _ceil_mode_pads(x, pads: list, kernel, strides, dilations) -> list:
    """`pads` with end pads grown so that a floor-mode window count gives ceil mode's output length (the last
    window starting inside the input or its begin pad, as torch and ONNX Runtime count)."""
    spatial = len(kernel)
    ends = []
    for i, (size, k, s, d) in enumerate(zip(x.shape[2:], kernel, strides, dilations)):
        span, padded = (k - 1) * d + 1, size + pads[i] + pads[i + spatial]
        out = -(-(padded - span) // s) + 1
        if (out - 1) * s >= size + pads[i]:
            out -= 1
        ends.append(pads[i + spatial] + torch.sym_max((out - 1) * s + span - padded, 0))
    return pads[:spatial] + ends


@reg("GlobalLpPool")
def global_lp_pool(ctx, x):
    x = as_tensor(x)
    p = ctx.attr("p", 2)
    return (x.abs() ** p).sum(dim=tuple(range(2, x.ndim)), keepdim=True) ** (1.0 / p)


@reg("LpNormalization")
def lp_normalization(ctx, x):
    """x over its L1 or L2 norm along `axis`; 0 where the norm is 0 (ONNX's reference)."""
    x = as_tensor(x)
    norm = torch.linalg.vector_norm(x, ord=ctx.attr("p", 2), dim=ctx.attr("axis", -1), keepdim=True)
    return torch.where(norm == 0, torch.zeros((), dtype=x.dtype), x / norm)


@reg("MeanVarianceNormalization", since=9)
def mean_variance_normalization(ctx, x):
    """(x - mean) / (std + 1e-9) over `axes` (default 0, 2, 3), std from E[x^2] - E[x]^2 as the op's definition."""
    x = as_tensor(x)
    axes = [a % x.ndim for a in ctx.attr("axes", [0, 2, 3])]
    mean = x.mean(axes, keepdim=True)
    std = torch.sqrt((x * x).mean(axes, keepdim=True) - mean * mean)
    return (x - mean) / (std + 1e-9)
