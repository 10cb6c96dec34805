"""The engine's one-row model (`engine/one_row.py`): the program exported a second time with every dynamic dim at 1,
in one package with the engine's model, on one copy of the weights."""
from __future__ import annotations

import copy
import json
import logging
import zipfile

import numpy as np
import pytest
import torch

from qcompile.engine import IOSpec, build_engine, load
from qcompile.engine import build as build_mod
from qcompile.engine.manifest import merge_dim_ranges
from qcompile.engine.one_row import ONE_ROW_MODEL, allows_one_row_model
from qcompile.errors import EngineError

from qc_testutil import ScaledGemmNet

INPUTS = [
    IOSpec("x", "float32", ["batch", "seq", 32], {"batch": (1, 16), "seq": (1, 64)}),
    IOSpec("y", "float32", ["batch", "seq", 8]),
]
OUTPUTS = [IOSpec("out", "float32", ["batch", "seq", 16])]


def _feeds(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, 32, generator=g), torch.randn(batch, seq, 8, generator=g)


@pytest.mark.parametrize("inputs, outputs, expected", [
    (INPUTS, OUTPUTS, True),
    ([IOSpec("x", "float32", ["batch", 4], {"batch": (2, 8)})], [IOSpec("o", "float32", ["batch"])], False),
    ([IOSpec("x", "float32", [3, 4])], [IOSpec("o", "float32", [3])], False),
    ([IOSpec("x", "float32", ["batch", 4], {"batch": (1, 8)})],
     [IOSpec("o", "float32", ["tokens"], {"tokens": (1, 64)})], False),
], ids=["batch-and-seq", "range-excludes-1", "static", "output-dim-not-an-input-dim"])
def test_allows_one_row_model(inputs, outputs, expected):
    assert allows_one_row_model(inputs, outputs, merge_dim_ranges(inputs + outputs)) is expected


def _plugin_input_shape(ep) -> tuple:
    [gemm] = [n for n in ep.graph.nodes if "scaled_gemm" in str(n.target)]
    return tuple(gemm.args[0].meta["val"].shape)


def test_one_row_model_is_the_program_with_static_rows():
    """The one-row export holds the plugin with x [1, 1, 32] (static: no dispatch by row count); the engine's export
    holds it with the symbolic dims."""
    net = ScaledGemmNet()
    ep, ep_one = build_mod._export_program(net, INPUTS, OUTPUTS, _feeds(2, 3), merge_dim_ranges(INPUTS + OUTPUTS),
                                           one_row_model=True)
    assert ep_one is not None
    assert _plugin_input_shape(ep_one) == (1, 1, 32)
    assert not any(isinstance(d, int) for d in _plugin_input_shape(ep)[:2])
    x, y = _feeds(1, 1, seed=5)
    torch.testing.assert_close(ep_one.module()(x, y), net(x, y), rtol=0, atol=0)


class CountingRunner:
    """Wraps an AOTInductor runner and counts its calls."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def __call__(self, *args):
        self.calls += 1
        return self.runner(*args)


def test_engine_runs_its_one_row_model_at_one_row_and_matches_float64(tmp_path):
    net = ScaledGemmNet()
    path = tmp_path / "one_row.engine"
    man = build_engine(net, inputs=INPUTS, outputs=OUTPUTS, example_inputs=_feeds(2, 3), manifest={},
                       output_path=path, device="cpu", one_row_model=True)
    assert man.extra["one_row_model"] is True
    engine = load(path)
    assert engine.manifest.extra["one_row_model"] is True
    engine._runner, engine._one_row_runner = CountingRunner(engine._runner), CountingRunner(engine._one_row_runner)
    reference = copy.deepcopy(net).double()  # float64 math around the same int8 plugin
    for batch, seq in [(1, 1), (1, 9), (2, 1), (5, 3), (1, 1)]:
        x, y = _feeds(batch, seq, seed=100 + batch * 10 + seq)
        with torch.no_grad():
            want = reference(x.double(), y.double()).numpy()
        got = engine.run({"x": x.numpy(), "y": y.numpy()})["out"]
        assert got.shape == (batch, seq, 16)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (engine._one_row_runner.calls, engine._runner.calls) == (2, 3)


def test_package_stores_each_weight_once(tmp_path):
    """Both models' weight configs point into one set of weight files: the one-row model adds none of its own."""
    path = tmp_path / "one_row.engine"
    build_engine(ScaledGemmNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_feeds(2, 3), manifest={},
                 output_path=path, device="cpu", one_row_model=True)
    package = tmp_path / "model.pt2"
    with zipfile.ZipFile(path) as engine_zip:
        package.write_bytes(engine_zip.read("model.pt2"))
    with zipfile.ZipFile(package) as z:
        names = z.namelist()
        configs = {model: json.loads(z.read(next(n for n in names if n.endswith(f"/{model}/weights_config.json"))))
                   for model in ("model", ONE_ROW_MODEL)}
    weight_files = {n.rsplit("/", 1)[1] for n in names if "/data/weights/" in n}
    used = {model: {entry[0] for entry in config.values()} for model, config in configs.items()}
    assert used["model"] == weight_files
    assert used[ONE_ROW_MODEL] <= used["model"] and used[ONE_ROW_MODEL]
    assert len(weight_files) < len(configs["model"]) + len(configs[ONE_ROW_MODEL])


class Doubles(torch.nn.Module):
    """Returns 2 * batch rows while its output spec says batch: at one row it returns 2 rows, not 1."""

    def forward(self, x):
        return torch.cat([x, x], 0) * 2


def test_one_row_model_with_other_output_shapes_is_left_out(caplog):
    inputs = [IOSpec("x", "float32", ["batch", 4], {"batch": (1, 8)})]
    outputs = [IOSpec("o", "float32", ["batch", 4])]
    ranges = merge_dim_ranges(inputs + outputs)
    with caplog.at_level(logging.WARNING, logger="qcompile.engine.build"):
        ep, ep_one = build_mod._export_program(Doubles(), inputs, outputs, (torch.randn(3, 4),), ranges, True)
    assert ep_one is None
    assert "without the one-row model: at one row the program returns shapes [[2, 4]]" in caplog.text
    x = torch.randn(1, 4)
    torch.testing.assert_close(ep.module()(x), Doubles()(x))


def test_no_one_row_model_where_no_dim_can_be_1(caplog):
    inputs = [IOSpec("x", "float32", ["batch", 4], {"batch": (2, 8)})]
    with caplog.at_level(logging.WARNING, logger="qcompile.engine.build"):
        _, ep_one = build_mod._export_program(Doubles(), inputs, [IOSpec("o", "float32", ["batch", 4])],
                                              (torch.randn(3, 4),), {"batch": (2, 8)}, True)
    assert ep_one is None and "without the one-row model: the engine has no dynamic dim, one whose range" in caplog.text


def test_one_row_model_that_does_not_compile_is_left_out(tmp_path, monkeypatch, caplog):
    """Where AOTInductor fails on the one-row model, the engine is compiled without it and loads as a plain one."""
    real, compiled = build_mod._aoti_files, []

    def one_row_fails(ep, configs):
        compiled.append(configs["aot_inductor.model_name_for_generated_files"])
        if compiled[-1].endswith(ONE_ROW_MODEL):
            raise RuntimeError("InductorError: AssertionError: ps0")
        return real(ep, configs)

    monkeypatch.setattr(build_mod, "_aoti_files", one_row_fails)
    net, path = ScaledGemmNet(), tmp_path / "fallback.engine"
    with caplog.at_level(logging.WARNING, logger="qcompile.engine.build"):
        man = build_engine(net, inputs=INPUTS, outputs=OUTPUTS, example_inputs=_feeds(2, 3), manifest={},
                           output_path=path, device="cpu", one_row_model=True)
    assert man.extra["one_row_model"] is False
    assert "the one-row model did not compile (RuntimeError: InductorError: AssertionError: ps0)" in caplog.text
    assert compiled == [f"{build_mod.MODEL_NAME}_{ONE_ROW_MODEL}"]  # the engine's model compiled once, after it
    engine = load(path)
    assert engine._one_row_runner is None
    x, y = _feeds(1, 1, seed=7)
    with torch.no_grad():
        want = net(x, y).numpy()
    np.testing.assert_allclose(engine.run({"x": x.numpy(), "y": y.numpy()})["out"], want, rtol=1e-5, atol=1e-5)


def test_engine_model_that_does_not_compile_fails_the_build(tmp_path, monkeypatch):
    """Where the one-row model compiles but the engine's own model does not, the build fails as it would without
    the one-row model: an EngineError naming AOTInductor's failure, and no engine file."""
    def engine_model_fails(ep, configs):
        if not configs["aot_inductor.model_name_for_generated_files"].endswith(ONE_ROW_MODEL):
            raise RuntimeError("InductorError: LoweringException")
        return []

    monkeypatch.setattr(build_mod, "_aoti_files", engine_model_fails)
    with pytest.raises(EngineError, match="AOTInductor compile failed: RuntimeError: InductorError"):
        build_engine(ScaledGemmNet(), inputs=INPUTS, outputs=OUTPUTS, example_inputs=_feeds(2, 3), manifest={},
                     output_path=tmp_path / "e.engine", device="cpu", one_row_model=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_runs_its_one_row_model_also_from_a_cuda_graph(tmp_path):
    """On CUDA: both models match the eager module, the one-row model runs at one row, and a decode step captured
    as a CUDA graph (the engine loaded single-threaded) replays the one-row model on new feeds."""
    from qcompile.engine.graph_replay import GraphReplay

    net = ScaledGemmNet().cuda()
    path = tmp_path / "one_row_cuda.engine"
    examples = tuple(t.cuda() for t in _feeds(2, 3))
    man = build_engine(net, inputs=INPUTS, outputs=OUTPUTS, example_inputs=examples, manifest={},
                       output_path=path, device="cuda", one_row_model=True)
    assert man.extra["one_row_model"] is True
    engine = load(path, run_single_threaded=True)
    engine._one_row_runner = CountingRunner(engine._one_row_runner)
    for batch, seq in [(1, 1), (3, 5)]:
        x, y = (t.cuda() for t in _feeds(batch, seq, seed=batch + seq))
        with torch.no_grad():
            torch.testing.assert_close(engine.run_torch({"x": x, "y": y})["out"], net(x, y), rtol=1e-4, atol=1e-4)
    assert engine._one_row_runner.calls == 1
    x, y = (t.cuda() for t in _feeds(1, 1, seed=11))
    replay = GraphReplay(engine, {"x": x, "y": y})
    for seed in (12, 13):
        x, y = (t.cuda() for t in _feeds(1, 1, seed=seed))
        with torch.no_grad():
            torch.testing.assert_close(replay.run({"x": x, "y": y})["out"], net(x, y), rtol=1e-4, atol=1e-4)
