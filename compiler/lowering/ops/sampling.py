"""Sampling and rearranging converters: GridSample (opset 16-22), AffineGrid (20), Upsample (7, 9), Col2Im (18),
CenterCropPad (18), MaxUnpool (9-22) and RoiAlign (10-22), following the schemas and ONNX's reference.

GridSample runs `F.grid_sample` where it computes exactly what the schema does (4-D/5-D linear; nearest, save
reflection without align_corners; 4-D cubic, save border padding), else explicit math on any rank: each
spatial coordinate is denormalized, rounded half to even for "nearest", clamped to [0, size - 1] by "border" when it
leaves the border ([-0.5, size - 0.5], or [0, size - 1] with align_corners), and weighs 1, 2 or 4 neighbors per axis
(nearest, triangle, Keys kernel with a = -0.75), neighbors outside the input being zeros, clamped or reflected.
RoiAlign averages (or, as ONNX's reference, takes the max of the weighted corner values of) bilinear samples on a
grid of `sampling_ratio` points per bin and axis; ratio 0 means ceil(roi size / output size) points per roi, a
data-dependent count: the grid is sized by the largest roi's count (read with `.item()`) and the other rois' extra
points are masked out; eager runs read a Python int, torch.export traces an unbacked size (checked >= 1 at run
time), so exported programs stay exact for any rois.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qcompile.lowering.ops.nn import torch_pad_list
from qcompile.lowering.ops.resize import accumulation_dtype, keys_cubic_weights, resize_10, resize_axes
from qcompile.lowering.registry import read_float_constants
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_ints, as_tensor

_GRID_MODES = {"bilinear": "linear", "bicubic": "cubic", "linear": "linear", "cubic": "cubic", "nearest": "nearest"}
_TAP_OFFSETS = {"nearest": (0,), "linear": (0, 1), "cubic": (-1, 0, 1, 2)}
_CUBIC_A = -0.75


@reg("GridSample", since=16)
def grid_sample(ctx, x, grid):
    """Opset 16: 4-D, modes bilinear / nearest / bicubic; opset 20 on: N-D, modes linear / nearest / cubic."""
    x, grid = as_tensor(x), as_tensor(grid)
    mode = _GRID_MODES.get(ctx.attr("mode", "linear"))
    padding, align = ctx.attr("padding_mode", "zeros"), bool(ctx.attr("align_corners", 0))
    if mode is None or padding not in ("zeros", "border", "reflection"):
        raise ctx.fail(f"unknown mode {ctx.attr('mode')!r} or padding_mode {padding!r}")
    if grid.shape[-1] != x.ndim - 2:
        raise ctx.fail(f"a grid of {grid.shape[-1]}-D points cannot sample a rank-{x.ndim} input")
    if mode != "nearest" and not x.dtype.is_floating_point:
        raise ctx.fail(f"{mode} sampling of {x.dtype} data is not supported")
    if _torch_grid_sample_matches(x, mode, padding, align):
        dtype = accumulation_dtype(x.dtype)
        y = F.grid_sample(x.to(dtype), grid.to(dtype), mode={"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode),
                          padding_mode=padding, align_corners=align)
        return y.to(x.dtype)
    return _grid_sample_explicit(x, grid, mode, padding, align)


def _torch_grid_sample_matches(x, mode: str, padding: str, align: bool) -> bool:
    """Whether `F.grid_sample` computes exactly the schema's result. Its reflection moves the neighbors (cubic) or
    rounds after reflecting (nearest): the same as reflecting the coordinate first where reflections map the pixel
    centers onto themselves and keep ties to even (about the integer borders of align_corners for nearest)."""
    if x.ndim not in (4, 5) or not x.dtype.is_floating_point:
        return False
    if mode == "cubic":  # torch clamps the neighbors, not the coordinate, for border padding
        return x.ndim == 4 and padding != "border"
    return mode == "linear" or padding != "reflection" or align


def _grid_sample_explicit(x, grid, mode: str, padding: str, align: bool) -> torch.Tensor:
    """GridSample on any rank as the schema computes it: per spatial axis the neighbors' indices and weights, then
    one gather of the neighbors' tensor product."""
    n, channels, sizes = x.shape[0], x.shape[1], x.shape[2:]
    coordinates = grid.to(torch.float64 if grid.dtype == torch.float64 else torch.float32)
    flat_index, weight, inside = 0, 1, True
    for axis, size in enumerate(sizes):
        position = _denormalize(coordinates[..., len(sizes) - 1 - axis], size, align)
        if mode == "nearest":
            position = torch.round(position)  # half to even
        index, tap_weight, tap_inside = _axis_taps(position, size, mode, padding, align)
        shape = [*index.shape[:-1]] + [1] * len(sizes)
        shape[index.ndim - 1 + axis] = index.shape[-1]
        flat_index = flat_index * size + index.reshape(shape)
        weight = weight * tap_weight.reshape(shape)
        inside = inside & tap_inside.reshape(shape)
    out_shape = grid.shape[1:-1]
    flat_index, weight, inside = (t.reshape(n, 1, -1) for t in (flat_index, weight, inside))
    values = x.reshape(n, channels, -1).gather(2, flat_index.expand(n, channels, -1))
    values = torch.where(inside, values, torch.zeros((), dtype=x.dtype, device=x.device))
    if mode == "nearest":
        return values.reshape(n, channels, *out_shape)
    dtype = accumulation_dtype(x.dtype)
    weighted = values.to(dtype) * weight.to(dtype)
    return weighted.reshape(n, channels, math.prod(out_shape), -1).sum(-1).reshape(n, channels, *out_shape).to(x.dtype)


def _denormalize(normalized: torch.Tensor, size, align: bool) -> torch.Tensor:
    """A [-1, 1] coordinate in pixels: -1 and 1 are the corner pixels' centers with align_corners, else their outer
    edges."""
    if align:
        return (normalized + 1) / 2 * (size - 1)
    return ((normalized + 1) * size - 1) / 2


def _border(size, align: bool) -> tuple:
    """The interval the padding modes keep coordinates in."""
    return (0.0, size - 1) if align else (-0.5, size - 0.5)


def _axis_taps(position: torch.Tensor, size, mode: str, padding: str, align: bool):
    """(index, weight, inside) of the neighbors `position` weighs along one axis, each with a trailing taps axis;
    indices are valid (clamped) even where `inside` is False (zeros padding). "border" clamps a coordinate that
    leaves the border to [0, size - 1] and then each neighbor; "reflection" reflects each neighbor, the same as
    reflecting the coordinate first (the reflections map pixel centers onto pixel centers)."""
    low, high = _border(size, align)
    if padding == "border":
        position = torch.where((position < low) | (position > high), position.clamp(0, size - 1), position)
    neighbors = torch.floor(position)[..., None] + position.new_tensor(_TAP_OFFSETS[mode])
    distance = (neighbors - position[..., None]).abs()
    kernels = {"nearest": torch.ones_like, "linear": lambda d: 1 - d,
               "cubic": lambda d: keys_cubic_weights(d, _CUBIC_A)}
    weight = kernels[mode](distance)
    inside = (neighbors >= 0) & (neighbors <= size - 1)
    if padding == "reflection":
        neighbors = _reflect(neighbors, low, high)
    index = neighbors.clamp(0, size - 1).long()
    return index, weight, inside if padding == "zeros" else torch.ones_like(inside)


def _reflect(position: torch.Tensor, low, high) -> torch.Tensor:
    """`position` reflected by the near border until it lies in [low, high] (ONNX's `_gs_reflect`)."""
    span = torch.sym_max(high - low, 1e-30)
    below = position < low
    distance = torch.where(below, low - position, position - high)
    turns = torch.floor(distance / span)
    rest = distance - turns * span
    even = torch.remainder(turns, 2) == 0
    reflected = torch.where(below == even, low + rest, high - rest)
    return torch.where(below | (position > high), reflected, position)


@reg("AffineGrid", since=20)
def affine_grid(ctx, theta, size):
    """The sampling grid of `theta` (N, 2, 3) or (N, 3, 4) over `size` (N, C, H, W) or (N, C, D, H, W):
    `F.affine_grid`, whose base grid is the schema's."""
    theta, size = as_tensor(theta), as_ints(size)
    if (theta.ndim, len(size)) not in ((3, 4), (3, 5)) or tuple(theta.shape[1:]) != (len(size) - 2, len(size) - 1):
        raise ctx.fail(f"theta of shape {tuple(theta.shape)} does not fit a size of {len(size)} values")
    dtype = accumulation_dtype(theta.dtype)
    return F.affine_grid(theta.to(dtype), size, align_corners=bool(ctx.attr("align_corners", 0))).to(theta.dtype)


@reg("Upsample", since=7)
def upsample_7(ctx, x):
    """Resize-10's semantics (asymmetric coordinates, nearest rounds down) with the `scales` attribute."""
    return resize_axes(ctx, as_tensor(x), None, [float(s) for s in ctx.attr("scales")], None, coordinates="asymmetric",
                       nearest_mode="floor")


@reg("Upsample", since=9, prepare=read_float_constants((1, "scales")))
def upsample_9(ctx, x, scales=None, prepared=None):
    """Opset 9 on: `scales` is an input; Resize-10 is the same op."""
    return resize_10(ctx, x, scales, prepared=prepared)


@reg("Col2Im", since=18)
def col2im(ctx, x, image_shape, block_shape):
    """Sums the blocks (N, C * prod(block_shape), L) into images (N, C, *image_shape): each block element adds to the
    padded image at block position * stride + kernel offset * dilation, and the pads are cropped off."""
    x, image, block = as_tensor(x), as_ints(image_shape), as_ints(block_shape)
    rank = len(image)
    strides, dilations = ctx.attr("strides") or [1] * rank, ctx.attr("dilations") or [1] * rank
    pads = ctx.attr("pads") or [0] * (2 * rank)
    padded = [size + pads[i] + pads[i + rank] for i, size in enumerate(image)]
    counts = [(p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(padded, block, strides, dilations)]
    kernel_size = math.prod(block)
    if math.prod(counts) != x.shape[2] or x.shape[1] % kernel_size:
        raise ctx.fail(f"input of shape {tuple(x.shape)} does not hold blocks {block} over image {image}")
    index = x.new_zeros((), dtype=torch.long)
    for i in range(rank):
        offsets = torch.arange(block[i], device=x.device)[:, None] * dilations[i]
        position = offsets + torch.arange(counts[i], device=x.device)[None, :] * strides[i]
        shape = [1] * (2 * rank)
        shape[i], shape[rank + i] = block[i], counts[i]
        index = index * padded[i] + position.reshape(shape)
    n, channels = x.shape[0], x.shape[1] // kernel_size
    images = x.new_zeros(n, channels, math.prod(padded)).index_add(2, index.reshape(-1), x.reshape(n, channels, -1))
    return F.pad(images.reshape(n, channels, *padded), torch_pad_list([-p for p in pads]))


@reg("CenterCropPad", since=18)
def center_crop_pad(ctx, x, shape):
    """Each of `axes` cropped or zero-padded to `shape` around its center (the extra element of an odd difference
    goes to the end)."""
    x, target = as_tensor(x), as_ints(shape)
    axes = [a % x.ndim for a in (ctx.attr("axes") or range(x.ndim))]
    if len(axes) != len(target):
        raise ctx.fail(f"shape has {len(target)} values for {len(axes)} axes")
    pads = [0] * (2 * x.ndim)
    for axis, length in zip(axes, target):
        difference = length - x.shape[axis]
        begin = torch.sym_max(difference, 0) // 2 - torch.sym_max(-difference, 0) // 2  # negative: cropped
        pads[axis], pads[axis + x.ndim] = begin, difference - begin
    return F.pad(x, torch_pad_list(pads))


@reg("MaxUnpool", since=9)
def max_unpool(ctx, x, indices, output_shape=None):
    """X's values written at `indices` (flat over the whole unpooled tensor, as MaxPool's Indices) of zeros of the
    shape pooling inverts; with `output_shape`, that tensor padded at the end to it (ONNX's reference; repeated
    indices keep an unspecified one of their values)."""
    x, indices = as_tensor(x), as_tensor(indices)
    kernel = ctx.attr("kernel_shape")
    spatial = len(kernel)
    strides, pads = ctx.attr("strides") or [1] * spatial, ctx.attr("pads") or [0] * (2 * spatial)
    unpooled = [x.shape[0], x.shape[1]] + [(size - 1) * s - pads[i] - pads[i + spatial] + k
                                           for i, (size, s, k) in enumerate(zip(x.shape[2:], strides, kernel))]
    y = x.new_zeros(math.prod(unpooled)).scatter(0, indices.reshape(-1).long(), x.reshape(-1)).reshape(unpooled)
    if output_shape is None:
        return y
    target = as_ints(output_shape)
    if len(target) != x.ndim:
        raise ctx.fail(f"output_shape {target} does not have rank {x.ndim}")
    return F.pad(y, torch_pad_list([0] * x.ndim + [t - u for t, u in zip(target, unpooled)]))


@reg("RoiAlign", since=10)
def roi_align_10(ctx, x, rois, batch_indices):
    """Opset 10: output_half_pixel coordinates (the attribute came with opset 16)."""
    return _roi_align(ctx, as_tensor(x), as_tensor(rois), as_tensor(batch_indices), half_pixel=False)


@reg("RoiAlign", since=16)
def roi_align(ctx, x, rois, batch_indices):
    coordinates = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if coordinates not in ("half_pixel", "output_half_pixel"):
        raise ctx.fail(f"unknown coordinate_transformation_mode {coordinates!r}")
    return _roi_align(ctx, as_tensor(x), as_tensor(rois), as_tensor(batch_indices),
                      half_pixel=coordinates == "half_pixel")


def _roi_align(ctx, x, rois, batch_indices, half_pixel: bool) -> torch.Tensor:
    """Per roi and bin, bilinear samples on a grid of points: their average, or the max of their weighted corner
    values; samples more than a pixel outside the input count as 0."""
    mode = ctx.attr("mode", "avg")
    if mode not in ("avg", "max"):
        raise ctx.fail(f"unknown mode {mode!r}")
    dtype = accumulation_dtype(x.dtype)
    boxes = rois.to(dtype) * float(ctx.attr("spatial_scale", 1.0)) - (0.5 if half_pixel else 0.0)
    starts, ends = boxes[:, [1, 0]], boxes[:, [3, 2]]  # (y, x) of each roi's corners
    extents = ends - starts if half_pixel else (ends - starts).clamp(min=1.0)  # legacy: malformed rois are 1x1
    bins = (ctx.attr("output_height", 1), ctx.attr("output_width", 1))
    ratio = ctx.attr("sampling_ratio", 0)
    points = (torch.full_like(extents, ratio) if ratio > 0 else torch.ceil(extents / extents.new_tensor(bins))).long()
    samples = [_roi_axis_samples(starts[:, a], extents[:, a], points[:, a], bins[a], x.shape[2 + a], ratio)
               for a in range(2)]
    if mode == "avg":
        y = _roi_average(x, batch_indices.long(), *samples)
    else:
        y = _roi_max(x, batch_indices.long(), *samples)
    return y.to(x.dtype)


def _roi_axis_samples(start, extent, points, bins: int, size, ratio: int):
    """One axis's bilinear samples of each roi: (index, weight) of shape (rois, bins, grid, 2) for the low and high
    neighbors (weight 0 for samples beyond the grid of `points` or more than a pixel outside the input) and the
    per-roi point counts. The grid has `ratio` points, or, adaptively, the largest count (data dependent)."""
    grid = ratio if ratio > 0 else _largest_count(points)
    step = (extent / bins)[:, None, None]
    slot = torch.arange(grid, device=start.device, dtype=start.dtype)
    position = start[:, None, None] + torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None] * step \
        + (slot + 0.5)[None, None, :] * step / points.clamp(min=1)[:, None, None].to(start.dtype)
    used = (slot[None, None, :] < points[:, None, None]) & (position >= -1.0) & (position <= size)
    position = position.clamp(min=0)
    at_edge = position >= size - 1
    low = torch.where(at_edge, size - 1, torch.floor(position))
    fraction = torch.where(at_edge, 0.0, position - low)
    index = torch.stack([low, torch.where(at_edge, low, low + 1)], -1).long()
    weight = torch.stack([1 - fraction, fraction], -1) * used[..., None]
    return index, weight, points


def _largest_count(points: torch.Tensor):
    """The largest adaptive point count (at least 1): a Python int eagerly, an unbacked size under torch.export."""
    largest = points.max().clamp(min=1).item()
    torch._check(largest >= 1)
    return largest


def _roi_average(x, batch, y_samples, x_samples) -> torch.Tensor:
    """Separable: each roi's bins are rows(y) @ image @ rows(x)^T, a row holding the sampling weights per pixel over
    the axis's point count."""
    rows = [_sampling_matrix(index, weight, points, length)
            for (index, weight, points), length in zip((y_samples, x_samples), x.shape[2:])]
    n, channels, height, width = x.shape
    rois, bins_y = rows[0].shape[:2]
    by_image = torch.zeros(rois, bins_y, n, height, dtype=rows[0].dtype, device=x.device)
    by_image[torch.arange(rois, device=x.device), :, batch] = rows[0]
    image_rows = x.to(rows[0].dtype).permute(0, 2, 1, 3).reshape(n * height, channels * width)
    columns = (by_image.reshape(rois * bins_y, n * height) @ image_rows).reshape(rois, bins_y, channels, width)
    return torch.einsum("rpcw,rqw->rcpq", columns, rows[1])


def _sampling_matrix(index, weight, points, length) -> torch.Tensor:
    """(rois, bins, length): the weight of each pixel in a bin's mean over `points` samples."""
    pixels = torch.arange(length, device=index.device)
    hits = (index[..., None] == pixels).to(weight.dtype) * weight[..., None]
    return hits.sum((2, 3)) / points.clamp(min=1)[:, None, None].to(weight.dtype)


def _roi_max(x, batch, y_samples, x_samples) -> torch.Tensor:
    """Per bin the max over its samples of the max of the four weighted corner values (ONNX's reference), 0 for a
    bin without samples."""
    (y_index, y_weight, y_points), (x_index, x_weight, x_points) = y_samples, x_samples
    channels, height, width = x.shape[1:]
    grid_y, grid_x = y_index.shape[2], x_index.shape[2]
    # axes: roi, bin y, point y, bin x, point x, corner y, corner x
    flat = (batch[:, None, None, None, None, None, None] * height + y_index[:, :, :, None, None, :, None]) * width \
        + x_index[:, None, None, :, :, None, :]
    weight = y_weight[:, :, :, None, None, :, None] * x_weight[:, None, None, :, :, None, :]
    values = x.permute(1, 0, 2, 3).reshape(channels, -1).to(weight.dtype).index_select(1, flat.reshape(-1))
    corners = (values.reshape(channels, *flat.shape) * weight).amax((-2, -1))
    used = (torch.arange(grid_y, device=x.device) < y_points[:, None])[:, None, :, None, None] \
        & (torch.arange(grid_x, device=x.device) < x_points[:, None])[:, None, None, None, :]
    best = torch.where(used, corners, float("-inf")).amax((3, 5))
    sampled = ((y_points > 0) & (x_points > 0))[:, None, None]
    return torch.where(sampled, best, 0.0).permute(1, 0, 2, 3)
