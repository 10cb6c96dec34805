"""Signal ops (DFT, STFT, the cosine windows, MelWeightMatrix) and data-dependent-shape ops (NonZero, Compress,
Unique) through the lowering on fresh random data, against numpy's FFT, ONNX's reference evaluator or ONNX Runtime;
and torch.export of a DFT graph with a symbolic batch and of a graph of data-dependent sizes. ONNX's own node cases
for these ops run in test_conformance.py."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from qc_testutil import ort_session

from qcompile.lowering import lower_onnx

F32 = TensorProto.FLOAT


def _model(op, inputs, outputs, constants=None, opset=20, **attrs):
    """One `op` node; `inputs` are (name, elem_type, shape) graph inputs, `constants` name -> array initializers,
    node inputs in the order given (graph inputs first; "" marks an absent optional input)."""
    constants = constants or {}
    names = [spec[0] if spec else "" for spec in inputs] + list(constants)
    node = helper.make_node(op, names, outputs, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*spec) for spec in inputs if spec],
                              [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _run(model, *feeds):
    return [t.numpy() for t in lower_onnx(model)(*[torch.from_numpy(np.asarray(f)) for f in feeds])]


def _onnx_complex(z: np.ndarray) -> np.ndarray:
    return np.stack([z.real, z.imag], -1).astype(np.float32)


@pytest.mark.parametrize("complex_input, inverse, onesided, length", [
    (False, 0, 0, None), (True, 0, 0, 5), (True, 1, 0, 10), (False, 0, 1, 10), (True, 1, 1, 9), (False, 1, 0, 4)],
    ids=["real", "complex-shorter", "complex-inverse-longer", "rfft-longer", "irfft-odd", "real-inverse-shorter"])
def test_dft_on_a_middle_axis_matches_numpy(complex_input, inverse, onesided, length):
    rng = np.random.default_rng()
    z = rng.standard_normal((2, 7, 3)) + (1j * rng.standard_normal((2, 7, 3)) if complex_input else 0)
    x = _onnx_complex(z) if complex_input else z[..., None].astype(np.float32)
    constants = {"axis": np.array(1)} if length is None else {"n": np.array(length), "axis": np.array(1)}
    model = _model("DFT", [("x", F32, x.shape), *([None] if length is None else [])], ["y"], constants,
                   inverse=inverse, onesided=onesided)
    fft = {(0, 0): np.fft.fft, (1, 0): np.fft.ifft, (0, 1): np.fft.rfft, (1, 1): np.fft.irfft}[(inverse, onesided)]
    want = fft(z, n=length, axis=1)
    want = want[..., None] if inverse and onesided else _onnx_complex(want)
    (got,) = _run(model, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_dft_opset17_takes_its_axis_from_the_attribute():
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 6, 5, 1)).astype(np.float32)
    model = _model("DFT", [("x", F32, x.shape)], ["y"], opset=17, axis=-3)
    (got,) = _run(model, x)
    np.testing.assert_allclose(got, _onnx_complex(np.fft.fft(x[..., 0], axis=1)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("complex_input, onesided", [(False, 1), (True, 0)], ids=["real-onesided", "complex"])
def test_stft_with_a_hann_window_matches_numpy_frames(complex_input, onesided):
    rng = np.random.default_rng()
    step, length = 6, 16
    z = rng.standard_normal((2, 64)) + (1j * rng.standard_normal((2, 64)) if complex_input else 0)
    signal = _onnx_complex(z) if complex_input else z[..., None].astype(np.float32)
    window = np.sin(np.pi * np.arange(length) / length) ** 2
    model = _model("STFT", [("signal", F32, signal.shape)], ["y"],
                   {"step": np.array(step), "window": window.astype(np.float32)}, opset=17, onesided=onesided)
    starts = range(0, 64 - length + 1, step)
    frames = np.stack([z[:, s:s + length] * window for s in starts], 1)
    want = _onnx_complex((np.fft.rfft if onesided else np.fft.fft)(frames, axis=-1))
    (got,) = _run(model, signal)
    assert got.shape == want.shape == (2, len(starts), length // 2 + 1 if onesided else length, 2)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("periodic", [1, 0])
def test_windows_match_the_reference(op, periodic):
    size = int(np.random.default_rng().integers(2, 40))
    model = _model(op, [], ["w"], {"size": np.array(size)}, opset=17, periodic=periodic,
                   output_datatype=TensorProto.DOUBLE)
    (want,) = ReferenceEvaluator(model).run(None, {})
    (got,) = _run(model)
    assert got.dtype == np.float64 and got.shape == (size,)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_mel_weight_matrix_matches_the_reference():
    rng = np.random.default_rng()
    bands, length, rate = int(rng.integers(4, 24)), int(rng.integers(128, 1024)), 16000
    low, high = float(rng.uniform(0, 300)), float(rng.uniform(4000, 8000))
    model = _model("MelWeightMatrix", [], ["m"], {"bands": np.array(bands), "length": np.array(length),
                                                  "rate": np.array(rate), "low": np.array(low, np.float32),
                                                  "high": np.array(high, np.float32)}, opset=17)
    (want,) = ReferenceEvaluator(model).run(None, {})
    (got,) = _run(model)
    assert got.shape == (length // 2 + 1, bands) and want.max() == 1
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_nonzero_matches_numpy():
    x = np.random.default_rng().integers(-1, 2, (3, 4, 5)).astype(np.float32)
    (got,) = _run(_model("NonZero", [("x", F32, x.shape)], ["y"], opset=13), x)
    np.testing.assert_array_equal(got, np.array(np.nonzero(x)))


@pytest.mark.parametrize("axis", [None, 1, -1])
def test_compress_matches_numpy(axis):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 5)).astype(np.float32)
    condition = rng.random(4 if axis is None else 3) < 0.6  # shorter than the axis / the flattened input
    attrs = {} if axis is None else {"axis": axis}
    model = _model("Compress", [("x", F32, x.shape), ("c", TensorProto.BOOL, condition.shape)], ["y"], **attrs)
    (got,) = _run(model, x, condition)
    np.testing.assert_array_equal(got, np.compress(condition, x, axis=axis))


def test_unique_sorted_along_an_axis_matches_the_reference():
    rng = np.random.default_rng()
    slices = rng.integers(0, 3, (3, 4, 2)).astype(np.float32)
    x = slices[:, rng.permutation(np.r_[0:4, rng.integers(0, 4, 3)])]  # 7 slices along axis 1, some repeated
    model = _model("Unique", [("x", F32, x.shape)], ["y", "indices", "inverse", "counts"], opset=11, axis=1)
    want = ReferenceEvaluator(model).run(None, {"x": x})
    got = _run(model, x)
    assert want[0].shape[1] < 7
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_unique_unsorted_flattened_matches_onnxruntime():
    x = np.random.default_rng().integers(0, 6, (4, 5)).astype(np.float32)
    model = _model("Unique", [("x", F32, x.shape)], ["y", "indices", "inverse", "counts"], opset=11, sorted=0)
    want = ort_session(model).run(None, {"x": x})
    got = _run(model, x)
    assert not np.all(np.diff(want[0]) > 0)  # first-occurrence order, not ascending
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_dft_with_a_symbolic_batch_exports_and_matches_at_two_batch_sizes():
    model = _model("DFT", [("x", F32, ["batch", 12, 1]), None], ["y"], {"axis": np.array(1)}, onesided=1)
    batch = torch.export.Dim("batch", min=1, max=64)
    rng = np.random.default_rng()
    example = torch.from_numpy(rng.standard_normal((3, 12, 1)).astype(np.float32))
    exported = torch.export.export(lower_onnx(model), (example,), dynamic_shapes=(({0: batch},),)).module()
    for size in (2, 5):
        x = rng.standard_normal((size, 12, 1)).astype(np.float32)
        (got,) = exported(torch.from_numpy(x))
        np.testing.assert_allclose(got.numpy(), _onnx_complex(np.fft.rfft(x[..., 0], axis=1)), atol=1e-5)


def test_unique_of_compressed_data_exports_with_data_dependent_sizes():
    """Compress then Unique (all outputs): two unbacked sizes; the exported program runs on other data."""
    nodes = [helper.make_node("Compress", ["x", "c"], ["kept"]),
             helper.make_node("Unique", ["kept"], ["y", "indices", "inverse", "counts"], sorted=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [12]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [12])],
                              [helper.make_empty_tensor_value_info(o)
                               for o in ("y", "indices", "inverse", "counts")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    rng = np.random.default_rng()
    feeds = [(rng.integers(0, 5, 12), rng.random(12) < 0.7) for _ in range(2)]
    exported = torch.export.export(lower_onnx(model), tuple(torch.from_numpy(a) for a in feeds[0])).module()
    want = ort_session(model).run(None, {"x": feeds[1][0], "c": feeds[1][1]})
    got = exported(*(torch.from_numpy(a) for a in feeds[1]))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)
