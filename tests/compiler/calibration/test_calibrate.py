"""calibrate(): amax of captured intermediate tensors equals an independent computation.

The reference exposes the intermediates as extra graph outputs and runs ONNX Runtime. One test
drives calibrate() with an ORT-backed stand-in for the lowered program (the calibrate logic on
its own); the other uses the real lowering, `qcompile.lowering.lower_onnx`.
"""
import importlib
import json

import numpy as np
import onnx
import pytest
import torch

from qcompile.calibration import calibrate, load_calibration_data
from qcompile.errors import CalibrationError
from qcompile.recipes.schema import CalibrationOptions

from qc_testutil import ort_session

calibrate_mod = importlib.import_module("qcompile.calibration.calibrate")  # the attribute is the function
TENSORS = ["x", "h", "r"]


def _exposed(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        if n not in {o.name for o in m.graph.output}:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def _reference(model, data, names):
    """tensor -> list of per-sample arrays, from ORT with the intermediates as outputs."""
    sess = ort_session(_exposed(model, [n for n in names if n != "x"]))
    per = {n: [] for n in names}
    for sample in data:
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, sample)))
        for n in names:
            per[n].append(sample[n] if n in sample else outs[n])
    return per


class OrtProgram:
    """Stand-in with the lowering's `run(feeds, capture=...)` API."""

    def __init__(self, model):
        self.model = model

    def run(self, feeds, capture=()):
        sess = ort_session(_exposed(self.model, capture))
        names = [o.name for o in sess.get_outputs()]
        outs = dict(zip(names, sess.run(None, {k: v.numpy() for k, v in feeds.items()})))
        return ([torch.from_numpy(outs[o.name]) for o in self.model.graph.output],
                {n: torch.from_numpy(outs[n]) for n in capture})


@pytest.fixture
def calib_data(tmp_path, mlp_source):
    x = np.random.default_rng(5).standard_normal((6, 3, 8)).astype(np.float32) * np.linspace(0.5, 3, 6)[:, None, None]
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return load_calibration_data(str(path), mlp_source.inputs)


def _check(result, per, method, pct=None, samples=6):
    assert result.num_samples == samples and result.method == method
    for name in TENSORS:
        arrays = per[name][:samples]
        true_max = float(np.abs(np.concatenate([a.ravel() for a in arrays])).max())
        assert result.stats[name]["max"] == pytest.approx(true_max, rel=1e-5)
        if method == "max":
            assert result.amax[name] == pytest.approx(true_max, rel=1e-5)
        else:
            want = np.mean([np.percentile(np.abs(a), pct) for a in arrays])
            assert result.amax[name] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_calibrate_logic_with_ort_program(monkeypatch, mlp_source, calib_data, method):
    monkeypatch.setattr(calibrate_mod, "_lower", lambda model, device: OrtProgram(model))
    ticks = []
    options = CalibrationOptions(method, 90.0)
    result = calibrate(mlp_source.model, TENSORS, calib_data, options, progress=lambda d, t: ticks.append((d, t)))
    assert ticks == [(i, 6) for i in range(1, 7)]
    _check(result, _reference(mlp_source.model, calib_data, TENSORS), method, 90.0)
    assert result.description == "calib.npz (6 samples)" and not result.is_random
    assert json.loads(result.to_json())["amax"] == result.amax


def test_max_samples(monkeypatch, mlp_source, calib_data):
    monkeypatch.setattr(calibrate_mod, "_lower", lambda model, device: OrtProgram(model))
    result = calibrate(mlp_source.model, TENSORS, calib_data, CalibrationOptions("max", max_samples=2))
    _check(result, _reference(mlp_source.model, calib_data, TENSORS), "max", samples=2)


def test_unknown_tensor(mlp_source, calib_data):
    with pytest.raises(CalibrationError, match="'nope'"):
        calibrate(mlp_source.model, ["h", "nope"], calib_data, CalibrationOptions())


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_calibrate_with_real_lowering(mlp_source, calib_data, method):
    if not hasattr(pytest.importorskip("qcompile.lowering"), "lower_onnx"):
        pytest.skip("qcompile.lowering.lower_onnx is not written yet")
    options = CalibrationOptions(method, 99.0)
    result = calibrate(mlp_source.model, TENSORS, calib_data, options, device="cpu")
    _check(result, _reference(mlp_source.model, calib_data, TENSORS), method, 99.0)
