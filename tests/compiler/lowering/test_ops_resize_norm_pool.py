"""Resize, GroupNormalization and LpPool through the lowering, against ONNX's reference evaluator on fresh random
data; and a lowered Resize exported by torch.export with symbolic image sizes. ONNX's own node cases of these ops
run in test_conformance.py."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompile.lowering import lower_onnx

F32 = TensorProto.FLOAT


def _model(op: str, x_shape, constants: dict, opset: int, **attrs):
    """One `op` node reading graph input x (`x_shape`, None entries symbolic) and then the `constants`
    (initializers; a None value leaves its input slot empty)."""
    names = ["x", *constants]
    node = helper.make_node(op, names, ["y"], **attrs)
    inits = [numpy_helper.from_array(v, k) for k, v in constants.items() if k and v is not None]
    x_dims = [d if d is not None else f"d{i}" for i, d in enumerate(x_shape)]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F32, x_dims)],
                              [helper.make_tensor_value_info("y", F32, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _check(model, x, atol=1e-5):
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = lower_onnx(model)(torch.from_numpy(x))[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)


def _resize(x_shape, roi=None, scales=None, sizes=None, opset=19, **attrs):
    constants = {"roi": roi if roi is not None else np.zeros(0, np.float32),
                 "scales" if scales is not None else "": scales, "sizes" if sizes is not None else "": sizes}
    return _model("Resize", x_shape, constants, opset, **attrs)


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_resize_nearest_asymmetric_floor_upsampling_by_scales(rng):
    """Scales 2 x 3: torch's nearest for the power of two, the gather path for the factor 3."""
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    model = _resize(x.shape, scales=np.array([1, 1, 2, 3], np.float32), mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    _check(model, x)


def test_resize_linear_pytorch_half_pixel_downsampling_by_sizes(rng):
    x = rng.standard_normal((1, 2, 9, 13)).astype(np.float32)
    model = _resize(x.shape, sizes=np.array([1, 2, 4, 5], np.int64), mode="linear",
                    coordinate_transformation_mode="pytorch_half_pixel")
    _check(model, x)


@pytest.mark.parametrize("scales", [[1, 1, 1.7, 2.5], [1, 1, 0.6, 0.8]], ids=["up", "down"])
def test_resize_cubic_align_corners(rng, scales):
    """Align_corners divides by the fractional output width less one (ONNX's reference), so non-integer widths
    take the gather path."""
    x = rng.standard_normal((2, 2, 6, 7)).astype(np.float32)
    model = _resize(x.shape, scales=np.array(scales, np.float32), mode="cubic",
                    coordinate_transformation_mode="align_corners")
    _check(model, x)


def test_resize_tf_crop_and_resize_with_extrapolation(rng):
    """A roi reaching past the image on both spatial axes: the outside samples get extrapolation_value."""
    x = rng.standard_normal((1, 3, 8, 6)).astype(np.float32)
    roi = np.array([0.2, -0.3, 0.9, 1.25], np.float32)
    model = _resize(x.shape, roi=roi, sizes=np.array([5, 7], np.int64), mode="linear", axes=[2, 3],
                    coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=3.5)
    _check(model, x)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization(rng, opset):
    """Opset 18's scale and bias are per group, opset 21's per channel."""
    c, groups = 6, 3
    x = rng.standard_normal((2, c, 4, 5)).astype(np.float32) * 3 + 1
    per = groups if opset == 18 else c
    scale, bias = rng.standard_normal(per).astype(np.float32), rng.standard_normal(per).astype(np.float32)
    model = _model("GroupNormalization", x.shape, {"scale": scale, "bias": bias}, opset, num_groups=groups,
                   epsilon=1e-3)
    _check(model, x, atol=1e-4)


def test_lp_pool_p2_with_strides_and_pads(rng):
    """Asymmetric pads count as zeros in the norm."""
    x = rng.standard_normal((2, 3, 11, 10)).astype(np.float32)
    model = _model("LpPool", x.shape, {}, 18, kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 2, 1], p=2)
    _check(model, x)


def test_exported_resize_with_symbolic_image_size_matches_the_reference(rng):
    """Nearest 2x by scales on an image of symbolic height and width: torch.export keeps H and W symbolic (output
    floor(H * 2)), and the exported program is right at image sizes other than the traced one."""
    model = _resize((1, 3, None, None), scales=np.array([1, 1, 2, 2], np.float32), mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    program = lower_onnx(model)
    height, width = torch.export.Dim("height", min=2, max=512), torch.export.Dim("width", min=2, max=512)
    example = torch.randn(1, 3, 8, 10)
    exported = torch.export.export(program, (example,), dynamic_shapes=(({2: height, 3: width},),))
    for shape in [(1, 3, 5, 17), (1, 3, 32, 9)]:
        x = rng.standard_normal(shape).astype(np.float32)
        want = ReferenceEvaluator(model).run(None, {"x": x})[0]
        got = exported.module()(torch.from_numpy(x))[0].numpy()
        assert got.shape == (1, 3, 2 * shape[2], 2 * shape[3])
        np.testing.assert_array_equal(got, want)
