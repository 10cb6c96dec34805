"""ONNX Resize (opset 10-19): `F.interpolate` where its semantics match the node's exactly, else a separable
gather-and-weight resize computed from the schema's formulas, one axis at a time.

Per resized axis of input length `in`, output length `out` and scale `s` (the `scales` value, or `out / in` when
`sizes` are given), the output position y samples the input at x = coordinate_transformation_mode(y) (the
schema's formulas, where `width = s * in` is the possibly fractional output length, as in ONNX's reference);
"nearest" rounds x by `nearest_mode`, "linear" / "cubic" weigh the neighbors of x with the triangle / Keys kernel
(the kernel stretched by 1 / s when `antialias` downsamples, its weights then normalized). Neighbors outside the
input repeat its edge, or get no weight with `exclude_outside`; `tf_crop_and_resize` writes
`extrapolation_value` where x leaves [0, in - 1]. Output lengths from scales are floor(in * s).
Float `roi` and `scales` constants are read once when the graph is lowered, so exported programs keep none.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qcompile.lowering.registry import read_float_constants
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import IntList, as_ints, as_tensor

_TORCH_MODES = {("linear", 3): "linear", ("linear", 4): "bilinear", ("linear", 5): "trilinear",
                ("cubic", 4): "bicubic", ("nearest", 3): "nearest", ("nearest", 4): "nearest",
                ("nearest", 5): "nearest"}


@reg("Resize", since=10, prepare=read_float_constants((1, "scales")))
def resize_10(ctx, x, scales=None, prepared=None):
    """Opset 10: Upsample's semantics (asymmetric coordinates, nearest rounds down), scales only."""
    return resize_axes(ctx, as_tensor(x), None, _floats(ctx, scales, "scales"), None, coordinates="asymmetric",
                       nearest_mode="floor")


@reg("Resize", since=11, prepare=read_float_constants((1, "roi"), (2, "scales")))
def resize(ctx, x, roi=None, scales=None, sizes=None, prepared=None):
    sizes = as_ints(sizes) if sizes is not None else None
    return resize_axes(ctx, as_tensor(x), _floats(ctx, roi, "roi"), _floats(ctx, scales, "scales"), sizes or None,
                       coordinates=ctx.attr("coordinate_transformation_mode", "half_pixel"),
                       nearest_mode=ctx.attr("nearest_mode", "round_prefer_floor"))


def _floats(ctx, value, key: str) -> list | None:
    """A float input as Python floats: prepared at lowering, an IntList's values, or a tensor read now (outside
    export only); None when absent or empty."""
    if value is None:
        floats = ctx.extra.get(key)
    elif isinstance(value, IntList):
        floats = list(value.values)
    else:
        floats = [float(v) for v in value.double().reshape(-1).tolist()]
    return floats or None


def resize_axes(ctx, x: torch.Tensor, roi, scales, sizes, coordinates: str, nearest_mode: str) -> torch.Tensor:
    rank = x.ndim
    axes = [a % rank for a in ctx.attr("axes", range(rank))]
    if (scales is None) == (sizes is None):
        raise ctx.fail("exactly one of scales and sizes must be given")
    if coordinates == "tf_crop_and_resize" and roi is None:
        raise ctx.fail("tf_crop_and_resize needs a roi")
    given = scales if scales is not None else sizes
    if len(given) != len(axes) or (roi is not None and len(roi) != 2 * len(axes)):
        raise ctx.fail(f"scales/sizes/roi do not match the {len(axes)} resized axes")
    ins = [x.shape[a] for a in axes]
    if scales is not None:
        outs = [math.floor(n * s) for n, s in zip(ins, scales)]
    else:
        scales, outs = _sizes_geometry(ctx.attr("keep_aspect_ratio_policy", "stretch"), ins, sizes)
    spans = [(0.0, 1.0)] * len(axes)
    if coordinates == "tf_crop_and_resize":
        spans = list(zip(roi[:len(axes)], roi[len(axes):]))
    plan = [(a, n, o, s, span) for a, n, o, s, span in zip(axes, ins, outs, scales, spans)
            if not _is_identity(n, o, s, span)]
    # torch takes either the scales or the output sizes: the aspect ratio policies' scales match neither
    if sizes is None or ctx.attr("keep_aspect_ratio_policy", "stretch") == "stretch":
        fast = _interpolate(ctx, x, plan, coordinates, nearest_mode, from_scales=sizes is None)
        if fast is not None:
            return fast
    y = x if ctx.attr("mode", "nearest") == "nearest" else x.to(accumulation_dtype(x.dtype))
    for axis, length, out, scale, span in plan:
        y = _resize_axis(ctx, y, axis, length, out, scale, span, coordinates, nearest_mode)
    return _cast(y, x.dtype)


def _sizes_geometry(policy: str, ins: list, sizes: list) -> tuple[list, list]:
    """(scales, output lengths) for `sizes` under keep_aspect_ratio_policy."""
    if policy == "stretch":
        return [o / n for o, n in zip(sizes, ins)], list(sizes)
    ratios = [o / n for o, n in zip(sizes, ins)]
    scale = min(ratios) if policy == "not_larger" else max(ratios)
    return [scale] * len(ins), [math.floor(scale * n + 0.5) for n in ins]


def _is_identity(length, out, scale, span) -> bool:
    return statically_known_true(out == length) and statically_known_true(scale == 1) and tuple(span) == (0.0, 1.0)


def _interpolate(ctx, x, plan, coordinates: str, nearest_mode: str, from_scales: bool) -> torch.Tensor | None:
    """`F.interpolate` on the trailing spatial dims when it computes exactly what the node asks, else None."""
    mode = ctx.attr("mode", "nearest")
    torch_mode = _TORCH_MODES.get((mode, x.ndim))
    if torch_mode is None or not x.dtype.is_floating_point or not plan or any(p[0] < 2 for p in plan) \
            or ctx.attr("antialias", 0) or (mode == "cubic" and (ctx.attr("cubic_coeff_a", -0.75) != -0.75
                                                                 or ctx.attr("exclude_outside", 0))):
        return None
    if mode == "nearest":
        # torch floors y * (1 / scale) in float32: exact when every scale is a power of two
        if coordinates != "asymmetric" or nearest_mode != "floor" or not all(_power_of_two(p[3]) for p in plan):
            return None
        align = None
    elif coordinates == "align_corners":  # ONNX divides by width - 1, torch by out - 1
        if from_scales and not all(statically_known_true(p[1] * p[3] == p[2]) for p in plan):
            return None
        align = True
    elif coordinates == "half_pixel" or (coordinates == "pytorch_half_pixel"
                                         and all(statically_known_true(p[2] > 1) for p in plan)):
        align = False
    else:
        return None
    planned = {p[0]: p for p in plan}
    spatial = range(2, x.ndim)
    if from_scales:
        factors = [planned[a][3] if a in planned else 1.0 for a in spatial]
        return F.interpolate(x, scale_factor=factors, mode=torch_mode, align_corners=align,
                             recompute_scale_factor=False)
    return F.interpolate(x, size=[planned[a][2] if a in planned else x.shape[a] for a in spatial], mode=torch_mode,
                         align_corners=align)


def _power_of_two(scale) -> bool:
    return isinstance(scale, float) and scale > 0 and math.frexp(scale)[0] == 0.5


def _resize_axis(ctx, x: torch.Tensor, axis: int, length, out, scale, span, coordinates: str,
                 nearest_mode: str) -> torch.Tensor:
    """`x` resized along `axis` from `length` to `out` samples."""
    source = _source_coordinates(coordinates, torch.arange(out, dtype=torch.float64, device=x.device), length, out,
                                 scale, span)
    mode = ctx.attr("mode", "nearest")
    if mode == "nearest":
        index = _round(source, nearest_mode).long().clamp(0, length - 1)
        y = x.index_select(axis, index)
    elif mode in ("linear", "cubic"):
        y = _weighted(ctx, x, axis, length, source, scale, mode)
    else:
        raise ctx.fail(f"unknown mode {mode!r}")
    if coordinates == "tf_crop_and_resize":
        outside = ((source < 0) | (source > length - 1)).reshape([-1] + [1] * (x.ndim - axis - 1))
        y = torch.where(outside, y.new_full((), ctx.attr("extrapolation_value", 0.0)), y)
    return y


def _source_coordinates(coordinates: str, y: torch.Tensor, length, out, scale, span) -> torch.Tensor:
    """The input coordinate each output position samples (float64)."""
    width = scale * length
    if coordinates == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if coordinates == "half_pixel_symmetric":
        return length / 2 * (1 - out / width) + (y + 0.5) / scale - 0.5
    if coordinates == "pytorch_half_pixel":
        return _unless(out == 1, (y + 0.5) / scale - 0.5, 0.0)
    if coordinates == "asymmetric":
        return y / scale
    if coordinates == "align_corners":
        return _unless(width == 1, y * (length - 1) / (width - 1), 0.0)
    if coordinates == "tf_crop_and_resize":
        start, end = span
        stretched = y * (end - start) * (length - 1) / (width - 1)
        return _unless(width == 1, stretched, (end - start) * (length - 1) / 2) + start * (length - 1)
    raise ValueError(f"unknown coordinate_transformation_mode {coordinates!r}")


def _unless(single, coordinates: torch.Tensor, value: float) -> torch.Tensor:
    """`coordinates`, or `value` everywhere when `single` (an output of length one) holds."""
    if statically_known_true(single):
        return torch.full_like(coordinates, value)
    if statically_known_true(torch.sym_not(single)):
        return coordinates
    return torch.where(as_tensor(IntList((single,), True, torch.bool)), value, coordinates)


def _round(source: torch.Tensor, nearest_mode: str) -> torch.Tensor:
    if nearest_mode == "round_prefer_floor":
        return torch.ceil(source - 0.5)
    if nearest_mode == "round_prefer_ceil":
        return torch.floor(source + 0.5)
    if nearest_mode in ("floor", "ceil"):
        return getattr(torch, nearest_mode)(source)
    raise ValueError(f"unknown nearest_mode {nearest_mode!r}")


def _weighted(ctx, x: torch.Tensor, axis: int, length, source: torch.Tensor, scale, mode: str) -> torch.Tensor:
    """Linear or cubic resampling along `axis` of a float `x`: each output is a weighted sum of the input's samples
    near it."""
    radius = 1 if mode == "linear" else 2
    antialias = bool(ctx.attr("antialias", 0)) and not statically_known_true(scale >= 1)
    stretch = min(float(scale), 1.0) if antialias else 1.0
    first = math.floor(-radius / stretch) + 1
    offsets = torch.arange(first, 1 - first + 1, device=x.device)  # 2 - 2 * first taps
    base = torch.floor(source)
    index = base.long()[:, None] + offsets[None, :]
    distance = (index - source[:, None]) * stretch
    if mode == "linear":
        weights = (1 - distance.abs()).clamp(min=0)
    else:
        weights = keys_cubic_weights(distance.abs(), float(ctx.attr("cubic_coeff_a", -0.75)))
    if ctx.attr("exclude_outside", 0):
        weights = torch.where((index < 0) | (index >= length), 0.0, weights)
    if antialias or ctx.attr("exclude_outside", 0):
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total == 0, 1.0, total)
    taps = offsets.numel()
    gathered = x.index_select(axis, index.clamp(0, length - 1).reshape(-1))
    gathered = gathered.reshape(*x.shape[:axis], -1, taps, *x.shape[axis + 1:])
    return (gathered * weights.to(x.dtype).reshape([-1, taps] + [1] * (x.ndim - axis - 1))).sum(axis + 1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 / float64 themselves, float32 for narrower floats, float64 for integers (rounded to the nearest
    value afterwards, as the reference computing in float64 does)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype.is_floating_point else torch.float64


def keys_cubic_weights(d: torch.Tensor, a: float) -> torch.Tensor:
    """The cubic convolution kernel of Keys (1981) with coefficient `a`, at distances `d` >= 0."""
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, 0.0))


def _cast(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`y` in `dtype`, integers rounded half to even and saturated as ONNX's reference casts."""
    if dtype.is_floating_point:
        return y.to(dtype)
    info = torch.iinfo(dtype)
    return y.round().clamp(info.min, info.max).to(dtype)
