"""GridSample, AffineGrid, Upsample, Col2Im, CenterCropPad, MaxUnpool and RoiAlign through the lowering, against ONNX's
reference evaluator (ONNX Runtime where the reference lacks a mode) on fresh random data; and a lowered GridSample
exported by torch.export with symbolic batch and image sizes. ONNX's own node cases of these ops run in
test_conformance.py."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from qc_testutil import ort_session

from qcompile.lowering import lower_onnx

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(op: str, inputs: list, opset: int, constants: dict | None = None, **attrs):
    """One `op` node reading graph `inputs` ((name, type, shape), a str entry of a shape symbolic), then the
    `constants` (initializers)."""
    constants = constants or {}
    node = helper.make_node(op, [name for name, _, _ in inputs] + list(constants), ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*spec) for spec in inputs],
                              [helper.make_tensor_value_info("y", F32, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _check(model, feeds: dict, reference: str = "onnx", atol=1e-5):
    if reference == "onnx":
        want = ReferenceEvaluator(model).run(None, feeds)[0]
    else:
        want = ort_session(model).run(None, feeds)[0]
    got = lower_onnx(model)(*[torch.from_numpy(feeds[v.name]) for v in model.graph.input])[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)


def _grid_sample_case(rng, x_shape, out_shape, opset=20, **attrs):
    """A GridSample model and feeds whose grid reaches past the input's border (to -1.8 .. 1.8)."""
    grid_shape = [x_shape[0], *out_shape, len(x_shape) - 2]
    model = _model("GridSample", [("x", F32, x_shape), ("grid", F32, grid_shape)], opset, **attrs)
    feeds = {"x": rng.standard_normal(x_shape).astype(np.float32),
             "grid": rng.uniform(-1.8, 1.8, grid_shape).astype(np.float32)}
    return model, feeds


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
def test_grid_sample_4d_matches_the_reference(mode, padding, align):
    """Every mode x padding mode on 4-D input, points inside, near and far outside the border."""
    rng = np.random.default_rng(1)
    _check(*_grid_sample_case(rng, [2, 3, 5, 6], [4, 7], mode=mode, padding_mode=padding, align_corners=align))


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_grid_sample_opset_16_mode_names(mode):
    """Opset 16's bilinear / bicubic are opset 20's linear / cubic (the reference knows only the latter)."""
    rng = np.random.default_rng(2)
    model, feeds = _grid_sample_case(rng, [1, 2, 4, 5], [3, 3], opset=16, mode=mode, padding_mode="border")
    renamed = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    want = ReferenceEvaluator(_grid_sample_case(rng, [1, 2, 4, 5], [3, 3], mode=renamed, padding_mode="border")[0])
    got = lower_onnx(model)(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["grid"]))[0].numpy()
    np.testing.assert_allclose(got, want.run(None, feeds)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,padding", [("linear", "border"), ("nearest", "reflection"), ("cubic", "zeros"),
                                          ("cubic", "reflection")])
def test_grid_sample_5d_matches_the_reference(mode, padding):
    """Volumetric sampling (opset 20), by torch (linear) and by the explicit math (the others)."""
    rng = np.random.default_rng(3)
    _check(*_grid_sample_case(rng, [1, 2, 3, 4, 5], [2, 3, 4], mode=mode, padding_mode=padding, align_corners=0))


@pytest.mark.parametrize("mode", ["nearest", "cubic"])
def test_grid_sample_one_spatial_axis_matches_the_reference(mode):
    """Opset 20's N-D sampling on a rank-3 input (torch has no such grid_sample)."""
    rng = np.random.default_rng(13)
    _check(*_grid_sample_case(rng, [2, 3, 7], [5], mode=mode, padding_mode="border", align_corners=1))


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_grid_sample_nearest_rounds_exact_halves_to_even(padding, align):
    """Points exactly between two pixels (inside and outside the input): rounded half to even before the padding
    mode moves them (torch rounds after reflecting)."""
    size = 8
    half_pixels = np.arange(-2.5, size + 2, 1.0)
    scale = size - 1 if align else size
    normalized = ((2 * half_pixels + (0 if align else 1)) / scale - 1).astype(np.float32)
    x = np.random.default_rng(4).standard_normal((1, 1, 1, size)).astype(np.float32)
    grid = np.stack([normalized, np.zeros_like(normalized)], -1)[None, None]
    model = _model("GridSample", [("x", F32, x.shape), ("grid", F32, grid.shape)], 20, mode="nearest",
                   padding_mode=padding, align_corners=align)
    _check(model, {"x": x, "grid": grid})


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("size", [[2, 3, 5, 7], [2, 3, 4, 5, 6]], ids=["2d", "3d"])
def test_affine_grid_matches_the_reference(size, align):
    rng = np.random.default_rng(5)
    spatial = len(size) - 2
    theta = rng.standard_normal((size[0], spatial, spatial + 1)).astype(np.float32)
    model = _model("AffineGrid", [("theta", F32, theta.shape)], 20, {"size": np.array(size, np.int64)},
                   align_corners=align)
    _check(model, {"theta": theta})


def test_upsample_nearest_matches_the_reference():
    """Opset 9, integer scales (the only ones the reference implements)."""
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 5)).astype(np.float32)
    model = _model("Upsample", [("x", F32, x.shape)], 9, {"scales": np.array([1, 2, 3, 2], np.float32)})
    _check(model, {"x": x})


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_with_fractional_scales_matches_onnx_runtime(mode, opset):
    """Asymmetric coordinates: nearest rounds y / scale down, linear weighs its two neighbors (the last repeated)."""
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 5)).astype(np.float32)
    scales = [1.0, 1.0, 2.5, 1.6]
    if opset == 7:
        model = _model("Upsample", [("x", F32, x.shape)], 7, mode=mode, scales=scales)
    else:
        model = _model("Upsample", [("x", F32, x.shape)], 9, {"scales": np.array(scales, np.float32)}, mode=mode)
    _check(model, {"x": x}, reference="ort")


@pytest.mark.parametrize("image,block,attrs", [
    ([9, 10], [2, 3], dict(dilations=[2, 1], pads=[1, 0, 2, 3], strides=[2, 3])),
    ([5, 6, 4], [2, 2, 3], dict(dilations=[1, 2, 1], pads=[0, 1, 1, 1, 0, 2], strides=[1, 2, 2])),
], ids=["2d", "3d"])
def test_col2im_with_dilations_pads_and_strides_matches_the_reference(image, block, attrs):
    rank = len(image)
    padded = [i + attrs["pads"][d] + attrs["pads"][d + rank] for d, i in enumerate(image)]
    counts = [(p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(padded, block, attrs["strides"], attrs["dilations"])]
    x = np.random.default_rng(8).standard_normal((2, 3 * np.prod(block), np.prod(counts))).astype(np.float32)
    model = _model("Col2Im", [("x", F32, x.shape)], 18, {"image_shape": np.array(image, np.int64),
                                                         "block_shape": np.array(block, np.int64)}, **attrs)
    _check(model, {"x": x})


@pytest.mark.parametrize("shape,axes", [([3, 2, 5], None), ([6, 9], [0, -1]), ([2, 8], [1, 2])],
                         ids=["crop", "pad", "crop_and_pad"])
def test_center_crop_pad_matches_the_reference(shape, axes):
    """Odd and even differences, cropping and padding, a subset of (negative) axes."""
    x = np.random.default_rng(9).standard_normal((4, 5, 6)).astype(np.float32)
    attrs = {"axes": axes} if axes else {}
    model = _model("CenterCropPad", [("x", F32, x.shape)], 18, {"shape": np.array(shape, np.int64)}, **attrs)
    _check(model, {"x": x})


def test_max_unpool_with_output_shape_matches_the_reference():
    """Values scattered to distinct random flat indices of the unpooled (2, 3, 7, 7) tensor (kernel 3x2, strides
    2x3, pads), which is then padded to output_shape."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    unpooled = 2 * 3 * 7 * 7  # (3 - 1) * 2 + 3 rows, (3 - 1) * 3 - 1 + 2 columns
    indices = rng.choice(unpooled, size=x.size, replace=False).reshape(x.shape).astype(np.int64)
    model = _model("MaxUnpool", [("x", F32, x.shape), ("i", I64, x.shape)], 11,
                   {"output_shape": np.array([2, 3, 9, 10], np.int64)}, kernel_shape=[3, 2], strides=[2, 3],
                   pads=[0, 0, 0, 1])
    _check(model, {"x": x, "i": indices})


def _roi_align_case(rng, images: int, height: int, width: int, rois: int, opset=16, **attrs):
    """A RoiAlign model (3 channels; symbolic sizes) and feeds: rois of various sizes, partly outside the image, one
    degenerate."""
    inputs = [("x", F32, ["n", 3, "h", "w"]), ("rois", F32, ["r", 4]), ("b", I64, ["r"])]
    model = _model("RoiAlign", inputs, opset, output_height=3, output_width=4, spatial_scale=0.5, **attrs)
    corner = rng.uniform(-6, 2 * width - 4, (rois, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.2, 3 * width, (rois, 2))], 1).astype(np.float32)
    boxes[0, 2:] = boxes[0, :2]
    return model, {"x": rng.standard_normal((images, 3, height, width)).astype(np.float32), "rois": boxes,
                   "b": rng.integers(0, images, rois).astype(np.int64)}


@pytest.mark.parametrize("coordinates", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("ratio", [2, 0])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_matches_the_reference(mode, ratio, coordinates):
    """Over a batch of 3 images (ratio 0: 1 to 6 sampling points per bin and axis)."""
    rng = np.random.default_rng(11)
    _check(*_roi_align_case(rng, 3, 10, 12, 7, mode=mode, sampling_ratio=ratio,
                            coordinate_transformation_mode=coordinates))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_opset_10_uses_output_half_pixel_coordinates(mode):
    """Opset 10 had no coordinate_transformation_mode and behaves as output_half_pixel: ONNX Runtime's result (ONNX's
    reference evaluator applies opset 16's half_pixel default)."""
    rng = np.random.default_rng(14)
    _check(*_roi_align_case(rng, 2, 9, 8, 5, opset=10, mode=mode, sampling_ratio=2), reference="ort")


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_adaptive_sampling_exports_with_a_data_dependent_grid(mode):
    """Sampling ratio 0 under torch.export: the point count becomes an unbacked size; the program matches the
    reference on other images and rois."""
    rng = np.random.default_rng(15)
    model, example = _roi_align_case(rng, 2, 8, 9, 5, mode=mode, sampling_ratio=0)
    dim, rois = torch.export.Dim, torch.export.Dim("r", min=1, max=64)
    shapes = ({0: dim("n", min=1, max=8), 2: dim("h", min=2, max=64), 3: dim("w", min=2, max=64)}, {0: rois},
              {0: rois})
    exported = torch.export.export(lower_onnx(model), tuple(torch.from_numpy(example[k]) for k in ("x", "rois", "b")),
                                   dynamic_shapes=(shapes,)).module()
    for sizes in ((3, 10, 7, 4), (1, 12, 12, 6)):
        _, feeds = _roi_align_case(rng, *sizes, mode=mode, sampling_ratio=0)
        want = ReferenceEvaluator(model).run(None, feeds)[0]
        got = exported(*[torch.from_numpy(feeds[k]) for k in ("x", "rois", "b")])[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,padding", [("linear", "zeros"), ("cubic", "border")], ids=["torch", "explicit"])
def test_grid_sample_exports_with_symbolic_batch_and_sizes(mode, padding):
    """Exported once with symbolic batch, image and grid sizes; the program matches the reference at two other
    sizes."""
    inputs = [("x", F32, ["n", 3, "h", "w"]), ("grid", F32, ["n", "gh", "gw", 2])]
    model = _model("GridSample", inputs, 20, mode=mode, padding_mode=padding)
    rng = np.random.default_rng(12)
    _, example = _grid_sample_case(rng, [2, 3, 6, 7], [4, 5])
    dim = torch.export.Dim
    batch = dim("n", min=1, max=16)
    shapes = ({0: batch, 2: dim("h", min=2, max=256), 3: dim("w", min=2, max=256)},
              {0: batch, 1: dim("gh", min=2, max=256), 2: dim("gw", min=2, max=256)})
    exported = torch.export.export(lower_onnx(model), (torch.from_numpy(example["x"]),
                                                       torch.from_numpy(example["grid"])), dynamic_shapes=(shapes,))
    for x_shape, out_shape in (([3, 3, 9, 5], [3, 8]), ([1, 3, 4, 11], [6, 2])):
        _, feeds = _grid_sample_case(rng, x_shape, out_shape)
        want = ReferenceEvaluator(model).run(None, feeds)[0]
        got = exported.module()(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["grid"]))[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
