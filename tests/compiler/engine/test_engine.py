"""Engine files: build with dynamic dims, load, run, manifest round-trip, mismatch and input errors, atomic write."""
from __future__ import annotations

import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

import qcompile
from qcompile.engine import GraphReplay, IOSpec, Manifest, build_engine, load, read_manifest
from qcompile.engine import build as build_mod
from qcompile.errors import EngineError
from qcompile.plugins.scaled_gemm import register

from qc_testutil import ScaledGemmNet as TinyNet

register()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

INPUTS = [
    IOSpec("x", "float32", ["batch", 32], {"batch": (1, 64)}),
    IOSpec("y", "float32", ["batch", 8]),
]
OUTPUTS = [IOSpec("out", "float32", ["batch", 16])]
CALLER = {
    "recipe": {"name": "int8", "weight": "int8"},
    "layers": [{"node": "fc2", "op": "MatMul", "format": "int8", "granularity": "channel",
                "bytes_before": 2048, "bytes_after": 576, "plugin": "qcompile::ScaledGemm"}],
    "content_hash": "sha256:abc",
    "calibration": {"source": "random", "samples": 4},
    "team_note": "kept in extra",
}


def _examples(batch=4, device="cpu"):
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 32, generator=g).to(device), torch.randn(batch, 8, generator=g).to(device)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One engine (an AOTI compile, ~10-30 s) shared by the module's tests."""
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path_factory.mktemp("engine") / "tiny.qengine"
    man = build_engine(net, inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(),
                       manifest=CALLER, output_path=path, device="cpu")
    return net, path, man


@pytest.fixture(scope="module")
def engine(built):
    return load(built[1])


@pytest.mark.slow
def test_same_architecture_other_constants_gets_its_own_constants(built, engine, tmp_path):
    """A second build of the same graph with other weights and scales must not reuse the first build's
    compiled constants (Inductor's caches key on the graph, not on constant values)."""
    net, _, _ = built
    other = TinyNet().eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        other.fc1.weight.mul_(-2.0)
        other.x_scale.mul_(7.0)
    path = tmp_path / "other.qengine"
    build_engine(other, inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(), manifest={},
                 output_path=path, device="cpu")
    x, y = _examples(batch=5)
    with torch.no_grad():
        want_other, want_first = other(x, y), net(x, y)
    got_other = load(path).run_torch({"x": x, "y": y})["out"]
    assert not torch.allclose(want_other, want_first, atol=1e-3)
    torch.testing.assert_close(got_other, want_other, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(engine.run_torch({"x": x, "y": y})["out"], want_first, rtol=1e-4, atol=1e-4)


def _rewrite(src, dst, **changes):
    """Copy engine `src` to `dst` with manifest fields changed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "manifest.json":
                d = json.loads(data)
                d.update(changes)
                data = json.dumps(d)
            zout.writestr(item, data)
    return dst


# ---------------------------------------------------------------- build / file format

def test_engine_file_layout(built):
    _, path, _ = built
    with zipfile.ZipFile(path) as z:
        assert z.namelist() == ["manifest.json", "model.pt2"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind


@pytest.mark.slow
def test_runs_at_two_batch_sizes_like_eager(built, engine):
    net = built[0]
    for batch in (3, 50):
        x, y = _examples(batch)
        got = engine.run({"x": x.numpy(), "y": y.numpy()})
        assert list(got) == ["out"] and isinstance(got["out"], np.ndarray)
        np.testing.assert_allclose(got["out"], net(x, y).detach().numpy(), rtol=1e-5, atol=1e-5)
    out = engine.run_torch({"x": x, "y": y})["out"]
    assert isinstance(out, torch.Tensor) and out.shape == (50, 16)


def test_manifest_contents_and_round_trip(built, engine):
    _, path, man = built
    assert read_manifest(path) == man == engine.manifest
    assert Manifest.from_json(man.to_json()) == man
    assert man.format_version == 1 and man.qcompile_version == qcompile.__version__
    assert man.torch_version == torch.__version__ and man.device == "cpu" and man.cpu_isa
    assert man.dim_ranges == {"batch": (1, 64)}
    assert [s.shape for s in man.inputs] == [["batch", 32], ["batch", 8]]
    assert man.recipe["name"] == "int8" and man.layers[0]["plugin"] == "qcompile::ScaledGemm"
    assert man.content_hash == "sha256:abc" and man.calibration["samples"] == 4
    assert man.extra == {"team_note": "kept in extra"}
    assert {"export_s", "compile_s"} <= set(man.timings)
    assert engine.input_names == ["x", "y"] and engine.output_names == ["out"]
    meta = engine._runner.get_metadata()
    assert meta["qcompile.version"] == qcompile.__version__ and meta["qcompile.content_hash"] == "sha256:abc"


def test_manifest_keeps_unknown_keys():
    d = json.loads(Manifest("0", "2.13.0", None, "cpu", "x86", None, "AVX2", [], []).to_json())
    d["future_field"] = 1
    assert Manifest.from_dict(d).extra == {"future_field": 1}


def test_layer_rows_need_all_columns(tmp_path):
    with pytest.raises(EngineError, match=r"layers\[0\].*bytes_after"):
        build_engine(TinyNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(),
                     manifest={"layers": [{"node": "a", "op": "MatMul", "format": "int8", "granularity": "channel",
                                           "bytes_before": 1, "plugin": "x"}]},
                     output_path=tmp_path / "e", device="cpu")


# ---------------------------------------------------------------- version / device mismatch

def test_torch_version_mismatch(built, tmp_path):
    bad = _rewrite(built[1], tmp_path / "e", torch_version="1.99.0+cu999")
    with pytest.raises(EngineError, match=r"torch version: engine built with 1\.99\.0\+cu999, this is " + torch.__version__.split("+")[0]):
        load(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_engine_without_cuda(built, tmp_path):
    bad = _rewrite(built[1], tmp_path / "e", device="cuda", device_name="NVIDIA H200", compute_capability="9.0")
    with pytest.raises(EngineError, match=r"built for cuda \(NVIDIA H200, compute capability 9\.0\) but CUDA is not available"):
        load(bad)


def test_all_mismatches_are_listed(built, tmp_path):
    bad = _rewrite(built[1], tmp_path / "e", torch_version="1.0.0", device="cuda", compute_capability="1.0")
    with pytest.raises(EngineError) as err:
        load(bad, device="cpu")
    assert "torch version" in str(err.value) and "engine built for cuda, asked to run on cpu" in str(err.value)


def test_format_version_mismatch(built, tmp_path):
    bad = _rewrite(built[1], tmp_path / "e", format_version=99)
    with pytest.raises(EngineError, match="format version 99, this qcompile reads version 1"):
        read_manifest(bad)


def test_corrupt_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.qengine"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(EngineError, match="junk.qengine.*not a readable qcompile engine"):
        load(junk)
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(EngineError, match="foreign.zip.*not a qcompile engine"):
        read_manifest(foreign)
    with pytest.raises(EngineError, match="missing.qengine.*does not exist"):
        load(tmp_path / "missing.qengine")


def test_truncated_engine(built, tmp_path):
    data = built[1].read_bytes()
    cut = tmp_path / "cut.qengine"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="cut.qengine"):
        load(cut)


def test_broken_manifest(built, tmp_path):
    bad = tmp_path / "e"
    shutil.copy(built[1], bad)
    bad = _rewrite(built[1], tmp_path / "e2", inputs="oops")
    with pytest.raises(EngineError, match="e2.*invalid manifest"):
        read_manifest(bad)


# ---------------------------------------------------------------- input checks

@pytest.mark.parametrize("feeds, message", [
    (lambda x, y: {"x": x}, r"missing \['y'\]"),
    (lambda x, y: {"x": x, "y": y, "z": y}, r"unexpected \['z'\]"),
    (lambda x, y: {"x": x.astype(np.float64), "y": y}, "input 'x': expected dtype float32, got float64"),
    (lambda x, y: {"x": x[None], "y": y}, r"input 'x': expected rank 2 \(shape \['batch', 32\]\), got rank 3"),
    (lambda x, y: {"x": x[:, :30], "y": y}, "input 'x': expected dim 1 = 32.*got 30"),
    (lambda x, y: {"x": np.zeros((65, 32), np.float32), "y": np.zeros((65, 8), np.float32)},
     r"input 'x': dim 0 \('batch'\) must be in \[1, 64\], got 65"),
    (lambda x, y: {"x": x, "y": y[:2]}, "input 'y': dim 0 \\('batch'\\) is 2, but input 'x' has 'batch' = 4"),
    (lambda x, y: {"x": x.tolist(), "y": y}, "input 'x': expected a numpy array or torch tensor, got list"),
])
def test_input_errors(engine, feeds, message):
    x, y = (t.numpy() for t in _examples())
    with pytest.raises(EngineError, match=message):
        engine.run(feeds(x, y))


def test_torch_feed_dtype_error(engine):
    x, y = _examples()
    with pytest.raises(EngineError, match="input 'y': expected dtype float32, got float16"):
        engine.run_torch({"x": x, "y": y.half()})


# ---------------------------------------------------------------- build-time errors and atomic write

def _no_compile(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("must fail before exporting / compiling")
    monkeypatch.setattr(torch.export, "export", boom)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", boom)


def test_unwritable_path_fails_before_compile(tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    target = tmp_path / "no" / "such" / "dir" / "e.qengine"
    with pytest.raises(EngineError, match=f"cannot write engine '{target}'.*does not exist"):
        build_engine(TinyNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(), manifest={},
                     output_path=target, device="cpu")
    with pytest.raises(EngineError, match="is a directory"):
        build_engine(TinyNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(), manifest={},
                     output_path=tmp_path, device="cpu")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_folder_fails_before_compile(tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(EngineError, match="no write permission"):
        build_engine(TinyNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(), manifest={},
                     output_path=ro / "e", device="cpu")


@pytest.mark.parametrize("examples, specs, message", [
    (lambda: _examples(1), INPUTS, "dynamic dim 'batch' .* is 1; it must lie in \\[2, 64\\]"),
    (lambda: (_examples()[0].double(), _examples()[1]), INPUTS, "example input 'x': dtype float64, spec says float32"),
    (lambda: _examples()[:1], INPUTS, "1 example inputs given for 2 input specs"),
    (lambda: _examples(), [INPUTS[0], IOSpec("y", "float32", ["batch", 8], {"batch": (1, 8)})],
     "dim 'batch' has range"),
    (lambda: _examples(), [INPUTS[0], IOSpec("y", "float32", ["rows", 8])], "dynamic dim 'rows' has no"),
    (lambda: _examples(), [INPUTS[0], IOSpec("y", "complex64", ["batch", 8])], "'y': dtype 'complex64' is not one"),
    (lambda: _examples(), [INPUTS[0], IOSpec("y", "float32", ["class", 8], {"class": (1, 64)})],
     "'y': dynamic dim name 'class' must be a Python identifier"),
])
def test_bad_specs_fail_before_compile(tmp_path, monkeypatch, examples, specs, message):
    _no_compile(monkeypatch)
    with pytest.raises(EngineError, match=message):
        build_engine(TinyNet(), inputs=specs, outputs=OUTPUTS, example_inputs=examples(), manifest={},
                     output_path=tmp_path / "e", device="cpu")


@pytest.mark.parametrize("exc", [RuntimeError("compiler crashed"), KeyboardInterrupt()])
def test_failed_compile_leaves_nothing(tmp_path, monkeypatch, exc):
    def fail(ep, package_path, inductor_configs):
        open(package_path, "wb").write(b"partial")  # a half-written package in the scratch folder
        raise exc
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    out = tmp_path / "e.qengine"
    out.write_bytes(b"previous engine")
    expected, match = ((EngineError, "AOTInductor compile failed: RuntimeError: compiler crashed")
                       if isinstance(exc, Exception) else (KeyboardInterrupt, None))
    with pytest.raises(expected, match=match):
        build_engine(TinyNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(), manifest={},
                     output_path=out, device="cpu")
    assert os.listdir(tmp_path) == ["e.qengine"] and out.read_bytes() == b"previous engine"


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, exc, built):
    def fake_compile(ep, package_path, inductor_configs):
        with zipfile.ZipFile(built[1]) as z:
            open(package_path, "wb").write(z.read("model.pt2"))
        return package_path
    real_replace = os.replace

    def fail_replace(src, dst):
        raise exc
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    monkeypatch.setattr(build_mod.os, "replace", fail_replace)
    with pytest.raises(type(exc)):
        build_engine(TinyNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(), manifest={},
                     output_path=tmp_path / "e.qengine", device="cpu")
    monkeypatch.setattr(build_mod.os, "replace", real_replace)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.slow
@cuda
def test_cuda_engine_round_trip(tmp_path):
    net = TinyNet().cuda().eval()
    path = tmp_path / "gpu.qengine"
    man = build_engine(net, inputs=INPUTS, outputs=OUTPUTS, example_inputs=_examples(device="cuda"),
                       manifest=CALLER, output_path=path, device="cuda")
    major, minor = torch.cuda.get_device_capability()
    assert man.device == "cuda" and man.compute_capability == f"{major}.{minor}" and man.cuda_version
    eng = load(path)
    for batch in (3, 50):
        x, y = _examples(batch, device="cuda")
        got = eng.run_torch({"x": x, "y": y})["out"]
        assert got.is_cuda
        torch.testing.assert_close(got, net(x, y), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eng.run({"x": x.cpu().numpy(), "y": y.cpu().numpy()})["out"],
                               net(x, y).detach().cpu().numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(EngineError, match="compute capability: engine built for 1.0"):
        load(_rewrite(path, tmp_path / "cc.qengine", compute_capability="1.0"))
    # replayed from a CUDA graph: new feeds of the captured shape give the eager results
    with pytest.raises(EngineError, match="run_single_threaded=True"):
        GraphReplay(eng, {"x": x, "y": y})
    replay = GraphReplay(load(path, run_single_threaded=True), {"x": x, "y": y})
    for seed in (1, 2):
        torch.manual_seed(seed)
        x2, y2 = torch.randn_like(x), torch.randn_like(y)
        torch.testing.assert_close(replay.run({"x": x2, "y": y2})["out"], net(x2, y2), rtol=1e-4, atol=1e-4)
    with pytest.raises(EngineError, match="captured with shape"):
        replay.run({"x": x[:2], "y": y[:2]})


def test_graph_replay_needs_a_cuda_engine(engine):
    x, y = _examples()
    with pytest.raises(EngineError, match="needs a CUDA engine"):
        GraphReplay(engine, {"x": x, "y": y})


class _Spec:
    def __init__(self, *shape):
        self.shape = shape


def test_export_falls_back_to_dim_hints_only_when_ranges_hold(monkeypatch):
    """A constraint violation on a guard that holds over the requested ranges is retried with Dim.DYNAMIC
    hints (torch 2.11 rejects such a guard from grouped-query attention); a guard that narrows a range keeps
    the error."""
    from qcompile.engine import build as engine_build

    class Narrowing(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] > 5 else x

    with pytest.raises(EngineError, match="Constraints violated"):
        engine_build._export(Narrowing(), [_Spec("batch", 3)], (torch.randn(8, 3),), {"batch": (1, 64)})

    real = engine_build._export_once
    calls = []

    def first_call_rejects(program, examples, dynamic_shapes):
        calls.append(dynamic_shapes)
        if len(calls) == 1:
            raise RuntimeError("Constraints violated (batch)! (a guard the solver cannot prove)")
        return real(program, examples, dynamic_shapes)

    class Double(torch.nn.Module):
        def forward(self, x):
            return x.reshape(-1, 3) * 2

    monkeypatch.setattr(engine_build, "_export_once", first_call_rejects)
    ep = engine_build._export(Double(), [_Spec("batch", 3)], (torch.randn(8, 3),), {"batch": (1, 64)})
    assert len(calls) == 2
    for rows in (2, 64):
        x = torch.randn(rows, 3)
        torch.testing.assert_close(ep.module()(x), x * 2)
