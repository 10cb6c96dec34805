"""SmoothQuant: factors vs the formula in float64, accuracy gain over plain int8 on a model with activation
outlier channels (fixed seed), alpha = "auto" picks a grid value no worse than 0.5 on its layer."""
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session, save_samples
from qcompile.algorithms.smoothquant import (ALPHA_GRID, observers_for, plan_smoothing, run_smoothing, smooth_model,
                                             smoothing_factors)
from qcompile.calibration import calibrate, load_calibration_data
from qcompile.frontend import load_source
from qcompile.lowering import lower_onnx
from qcompile.passes import activation_tensors, fuse_plugins, plan_quantization, quantize_model
from qcompile.recipes import load_recipe
from qcompile.validation.metrics import compare_arrays

K, N = 64, 48


def test_factors_follow_the_formula():
    rng = np.random.default_rng(0)
    a, w = rng.uniform(0.01, 50, K), rng.uniform(0.01, 2, K)
    for alpha in (0.0, 0.5, 0.85, 1.0):
        np.testing.assert_allclose(smoothing_factors(a, w, alpha), a ** alpha / w ** (1 - alpha), rtol=1e-12)
    a[3], w[5] = 0.0, 0.0  # a dead channel / an all-zero weight row keep s = 1
    s = smoothing_factors(a, w, 0.5)
    assert s[3] == 1.0 and s[5] == 1.0 and np.all(s > 0)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    """RMSNorm whose weight has 4 outlier channels (x40) -> 2 MatMuls sharing it (q/k-like) -> sum."""
    rng = np.random.default_rng(11)
    gamma = rng.uniform(0.8, 1.2, K).astype(np.float32)
    gamma[[3, 17, 30, 51]] *= 40.0
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    inits += [numpy_helper.from_array((rng.standard_normal((K, N)) / 8).astype(np.float32), n) for n in ("wa", "wb")]
    nodes = [helper.make_node("Mul", ["x", "x"], ["x2"]),
             helper.make_node("ReduceMean", ["x2", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["xn"]), helper.make_node("Mul", ["xn", "gamma"], ["h"], name="norm"),
             helper.make_node("MatMul", ["h", "wa"], ["ya"], name="mm_a"),
             helper.make_node("MatMul", ["h", "wb"], ["yb"], name="mm_b"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path_factory.mktemp("sq") / "outliers.onnx"
    onnx.save(model, path)
    src = load_source(str(path))
    calib = save_samples(path.with_suffix(".npz"), src, 16, {"b": 2, "s": 16}, seed=3)
    return src, load_calibration_data(str(calib), src.inputs)


def _recipe(alpha):
    r = load_recipe("int8_sq")
    return dataclasses.replace(r, rules=(dataclasses.replace(r.rules[0], alpha=alpha), *r.rules[1:]))


def _quantized_sqnr(src, data, recipe) -> float:
    """The pipeline's calibrate + quantize stages (smoothing first when the recipe asks), SQNR vs FP in ORT."""
    model, _, _ = smooth_model(src.model, recipe, data, recipe.calibration)
    amax = calibrate(model, activation_tensors(plan_quantization(model, recipe)), data, recipe.calibration).amax
    plugin, _ = fuse_plugins(quantize_model(model, recipe, amax)[0])
    x = {"x": np.random.default_rng(99).standard_normal((2, 24, K)).astype(np.float32)}  # fresh inputs
    want = ort_session(src.model).run(None, x)[0]
    got = lower_onnx(plugin)(torch.from_numpy(x["x"]))[0].numpy()
    return compare_arrays(want, got)["sqnr_db"]


def test_smoothquant_beats_plain_int8_on_outlier_channels(outlier_model):
    src, data = outlier_model
    plain = _quantized_sqnr(src, data, load_recipe("int8"))
    smoothed = _quantized_sqnr(src, data, _recipe(0.5))
    assert smoothed > plain + 3.0, (plain, smoothed)


def test_alpha_auto_picks_a_grid_value_not_worse_than_default(outlier_model):
    src, data = outlier_model
    recipe = _recipe("auto")
    jobs = plan_smoothing(src.model, recipe)
    assert [j.nodes for j in jobs] == [["mm_a", "mm_b"]] and jobs[0].weight.shape == (K, 2 * N)
    watch = observers_for(jobs)
    calibrate(src.model, [], data, recipe.calibration, extra_observers=watch)
    result = run_smoothing(jobs, watch)["h"]
    assert result.alpha in ALPHA_GRID and set(result.errors) == set(ALPHA_GRID)
    assert result.errors[result.alpha] <= result.errors[0.5]
    assert result.errors[result.alpha] < result.errors[0.0]  # no smoothing is worse on outlier channels
    assert _quantized_sqnr(src, data, recipe) >= _quantized_sqnr(src, data, _recipe(0.5)) - 0.5
