"""Calibration data loaders (.npz, directory, file.py:fn, random) and every error case."""
import textwrap
import zipfile

import numpy as np
import pytest

from qcompile.calibration import check_calibration_spec, load_calibration_data
from qcompile.errors import CalibrationError


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def _samples(data):
    return list(data)


def test_npz_stacked_samples(tmp_path, specs):
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    ids = np.arange(6).reshape(3, 2).astype(np.int32)
    data = load_calibration_data(str(_save(tmp_path / "calib.npz", x=x, ids=ids)), specs)
    assert data.description == "calib.npz (3 samples)" and len(data) == 3 and not data.is_random
    samples = _samples(data)
    assert len(samples) == 3
    np.testing.assert_array_equal(samples[1]["x"], x[1])
    assert samples[2]["ids"].dtype == np.int64 and samples[2]["ids"].tolist() == [4, 5]


def test_npz_rows_are_batch_one_samples(tmp_path, specs):
    x = np.random.default_rng(0).standard_normal((5, 4))  # float64: converted to float32
    data = load_calibration_data(str(_save(tmp_path / "rows.npz", x=x, ids=np.arange(5))), specs)
    samples = _samples(data)
    assert len(samples) == 5 and samples[0]["x"].shape == (1, 4) and samples[0]["x"].dtype == np.float32
    np.testing.assert_allclose(samples[4]["x"][0], x[4].astype(np.float32))


def test_directory_streams_files_in_order(tmp_path, specs, monkeypatch):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _save(folder / "b.npz", x=rng.standard_normal((3, 1, 4)).astype(np.float32), ids=np.full((3, 1), 7))
    _save(folder / "a.npz", x=rng.standard_normal((2, 1, 4)).astype(np.float32), ids=np.full((2, 1), 3))
    (folder / "notes.txt").write_text("ignored")
    data = load_calibration_data(str(folder), specs)
    assert data.description == "calib/ (2 files, 5 samples)" and len(data) == 5
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda p, *a, **k: opened.append(str(p)) or real_load(p, *a, **k))
    it = iter(data)
    assert next(it)["ids"].tolist() == [3]
    assert [p.rsplit("/", 1)[1] for p in opened] == ["a.npz"]  # b.npz not opened yet
    assert [s["ids"][0] for s in it] == [3, 7, 7, 7]


def test_python_function(tmp_path, specs):
    path = tmp_path / "gen.py"
    path.write_text(textwrap.dedent('''
        import numpy as np, torch
        def batches():
            for i in range(4):
                yield {"x": torch.full((2, 4), float(i)), "ids": np.array([i, i])}
    '''))
    data = load_calibration_data(f"{path}:batches", specs)
    assert data.description == "gen.py:batches" and data.num_samples is None
    with pytest.raises(TypeError):
        len(data)
    samples = _samples(data)
    assert [s["x"][0, 0] for s in samples] == [0, 1, 2, 3]
    assert all(s["x"].dtype == np.float32 and isinstance(s["x"], np.ndarray) for s in samples)
    assert _samples(data)[3]["ids"].tolist() == [3, 3]  # re-iterable: fn is called again


def test_random(mlp_source):
    data = load_calibration_data("random", mlp_source.inputs, source=mlp_source, random_samples=5, seed=3)
    assert data.is_random and len(data) == 5
    assert data.description == "random (5 samples, seed 3) — not representative data"
    a, b = _samples(data), _samples(data)
    assert len(a) == 5 and all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["x"], a[1]["x"])
    other = load_calibration_data("random", mlp_source.inputs, source=mlp_source, random_samples=5, seed=4)
    assert other.content_hash() != data.content_hash()
    with pytest.raises(CalibrationError, match="source"):
        load_calibration_data("random", mlp_source.inputs)


def test_content_hash_follows_bytes(tmp_path, specs):
    path = _save(tmp_path / "c.npz", x=np.zeros((2, 1, 4), np.float32), ids=np.zeros((2, 1), np.int64))
    h1 = load_calibration_data(str(path), specs).content_hash()
    assert h1 == load_calibration_data(str(path), specs).content_hash() and len(h1) == 64
    _save(path, x=np.ones((2, 1, 4), np.float32), ids=np.zeros((2, 1), np.int64))
    assert load_calibration_data(str(path), specs).content_hash() != h1


def test_split(mlp_source):
    data = load_calibration_data("random", mlp_source.inputs, source=mlp_source, random_samples=16)
    calib, hold = data.split(0.25)
    assert (len(calib), len(hold)) == (12, 4) and hold.is_random
    assert "held-out part (4 of 16)" in hold.description
    full = [s["x"].tobytes() for s in data]
    c, h = [s["x"].tobytes() for s in calib], [s["x"].tobytes() for s in hold]
    assert len(c) == 12 and len(h) == 4 and sorted(c + h) == sorted(full) and not set(c) & set(h)
    with pytest.raises(CalibrationError, match="hold out"):
        load_calibration_data("random", mlp_source.inputs, source=mlp_source, random_samples=2).split(0.25)


def _bad(tmp_path, specs, name="calib.npz", **arrays):
    return load_calibration_data(str(_save(tmp_path / name, **arrays)), specs)


X, IDS = np.zeros((2, 1, 4), np.float32), np.zeros((2, 1), np.int64)


@pytest.mark.parametrize("arrays, needles", [
    ({"x": X}, ["'ids'", "missing", "calib.npz"]),
    ({"x": X, "ids": IDS, "mask": IDS}, ["'mask'", "not a model input"]),
    ({"x": np.zeros((2, 1, 1, 4), np.float32), "ids": IDS}, ["'x'", "rank 4"]),
    ({"x": X, "ids": IDS.astype(np.float32)}, ["'ids'", "float32", "int64"]),
    ({"x": X, "ids": np.zeros((3, 1), np.int64)}, ["different numbers of samples"]),
    ({"x": X[:0], "ids": IDS[:0]}, ["no samples"]),
])
def test_load_time_errors(tmp_path, specs, arrays, needles):
    with pytest.raises(CalibrationError) as info:
        _bad(tmp_path, specs, **arrays)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("change, needle", [
    (lambda x, ids: x.__setitem__((1, 0, 2), np.nan), "input 'x' in calib.npz sample 1 contains NaN"),
    (lambda x, ids: x.__setitem__((0, 0, 0), np.inf), "input 'x' in calib.npz sample 0 contains Inf"),
    (lambda x, ids: ids.__setitem__((1, 0), 10), "input 'ids' in calib.npz sample 1 has values in [10, 10]"),
])
def test_streaming_errors(tmp_path, specs, change, needle):
    x, ids = X.copy(), IDS.copy()
    change(x, ids)
    data = _bad(tmp_path, specs, x=x, ids=ids)
    with pytest.raises(CalibrationError) as info:
        _samples(data)
    assert needle in str(info.value)


def test_dim_errors(tmp_path, specs):
    with pytest.raises(CalibrationError, match=r"'x' in calib.npz sample 0: dim 'batch' = 9 .*\[1, 8\]"):
        _samples(_bad(tmp_path, specs, x=np.zeros((1, 9, 4), np.float32), ids=np.zeros((1, 9), np.int64)))
    with pytest.raises(CalibrationError, match=r"'ids' in calib.npz sample 0: dim 'batch' = 3, but input 'x'"):
        _samples(_bad(tmp_path, specs, x=np.zeros((1, 2, 4), np.float32), ids=np.zeros((1, 3), np.int64)))
    with pytest.raises(CalibrationError, match=r"'x' in calib.npz sample 0 has shape \[2, 5\]"):
        _samples(_bad(tmp_path, specs, x=np.zeros((1, 2, 5), np.float32), ids=np.zeros((1, 2), np.int64)))


def test_missing_spec(specs):
    with pytest.raises(CalibrationError, match="calibration data is required.*--calib data.npz.*--calib random"):
        load_calibration_data(None, specs)


def test_missing_and_corrupt_files(tmp_path, specs):
    with pytest.raises(CalibrationError, match=r"nope\.npz does not exist"):
        load_calibration_data(str(tmp_path / "nope.npz"), specs)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match=r"bad\.npz is not an \.npz file \(a zip archive"):
        load_calibration_data(str(tmp_path / "bad.npz"), specs)
    with zipfile.ZipFile(tmp_path / "notnpy.npz", "w") as zf:  # a zip archive whose .npy member is not an array
        zf.writestr("x.npy", b"garbage")
    with pytest.raises(CalibrationError, match=r"notnpy\.npz is not a readable \.npz file"):
        load_calibration_data(str(tmp_path / "notnpy.npz"), specs)
    (tmp_path / "data.txt").write_text("1 2 3")
    with pytest.raises(CalibrationError, match=r"data\.txt is not an \.npz"):
        load_calibration_data(str(tmp_path / "data.txt"), specs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"empty has no \.npz files"):
        load_calibration_data(str(tmp_path / "empty"), specs)


def test_spec_checked_without_the_model(tmp_path):
    """`check_calibration_spec` (run before the export) rejects what `load_calibration_data` would, from the spec
    alone, and accepts every kind of spec that names data."""
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    for spec, needle in (("nope.npz", r"nope\.npz does not exist"), ("bad.npz", r"bad\.npz is not an \.npz file"),
                         ("empty", r"empty has no \.npz files"), ("gen.py:fn", r"gen\.py does not exist"),
                         ("neither", r"'.*neither' not found")):
        with pytest.raises(CalibrationError, match=needle):
            check_calibration_spec(str(tmp_path / spec))
    (tmp_path / "data").mkdir()
    _save(tmp_path / "data" / "a.npz", x=X, ids=IDS)
    (tmp_path / "gen.py").write_text("def fn():\n    return []\n")
    for spec in ("random", tmp_path / "data", tmp_path / "data" / "a.npz", f"{tmp_path / 'gen.py'}:fn"):
        check_calibration_spec(str(spec))


def test_directory_file_errors_name_the_file(tmp_path, specs):
    folder = tmp_path / "d"
    folder.mkdir()
    _save(folder / "a.npz", x=X, ids=IDS)
    _save(folder / "b.npz", x=X)
    with pytest.raises(CalibrationError, match=r"'ids' is missing from calibration file d/b\.npz"):
        load_calibration_data(str(folder), specs)


@pytest.mark.parametrize("body, needle", [
    ("def gen():\n    return iter([])\n", "holds no samples"),
    ("def gen():\n    raise ValueError('no data today')\n", "raised ValueError: no data today"),
    ("def gen():\n    yield [1, 2]\n", "gen.py:gen sample 0 is a list"),
    ("def gen():\n    yield {'x': __import__('numpy').zeros((1, 4), 'f4')}\n", "'ids' is missing from gen.py:gen sample 0"),
    ("def other():\n    pass\n", "no function 'gen'"),
    ("import not_a_module_xyz\n", "ModuleNotFoundError"),
])
def test_python_function_errors(tmp_path, specs, body, needle):
    path = tmp_path / "gen.py"
    path.write_text(body)
    with pytest.raises(CalibrationError) as info:
        _samples(load_calibration_data(f"{path}:gen", specs))
    assert needle in str(info.value) and "gen.py" in str(info.value)
