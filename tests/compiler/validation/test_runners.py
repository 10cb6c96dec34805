"""Polygraphy runners (engine, ONNX Runtime reference, float64 lowering), exact output matching, and the
`polygraphy run --qcompile` plugin end to end.

Reference numbers are computed with ONNX Runtime directly (qc_testutil.ort_session), not through our code.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import gc
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import polygraphy.config
import pytest
from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
from polygraphy.comparator.struct import IterationResult
from polygraphy.datatype import DataType
from polygraphy.exception import PolygraphyException
from qc_testutil import ort_session

from qcompile.validation import runners
from qcompile.validation.runners import LoweringRunner, QcompileRunner, exact_output_match, onnxrt_reference

POLYGRAPHY = Path(sys.executable).parent / "polygraphy"
SHAPE = {"batch": 2, "seq": 16}  # inside the engines' dim ranges (batch [1, 64], seq [1, 2048])
# tiny-llama's vocab is 512; Polygraphy's integer --val-range is inclusive at both ends
CLI_DATA = ["--input-shapes", "input_ids:[2,16]", "--val-range", "input_ids:[0,511]"]


@pytest.fixture(scope="module")
def feeds(llama):
    return [llama.random_inputs(np.random.default_rng(seed), SHAPE) for seed in (0, 1)]


@pytest.fixture(scope="module")
def ort_logits(llama, feeds):
    """logits of the FP32 graph from ONNX Runtime itself (graph optimizations off), per feed."""
    sess = ort_session(llama.model)
    return [sess.run(["logits"], f)[0] for f in feeds]


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory, llama):
    path = tmp_path_factory.mktemp("onnx") / "tiny_llama.onnx"
    onnx.save(llama.model, str(path))
    return path


@pytest.fixture(scope="module")
def int8_engine(int8_random_cli):
    """An int8 tiny-llama engine (calibrated on random data): the one `test_cli` builds through the CLI."""
    run, path = int8_random_cli
    assert run.code == 0, run.out + run.err
    return path


def polygraphy_run(*argv):
    assert POLYGRAPHY.is_file(), f"no polygraphy executable next to {sys.executable}"
    return subprocess.run([str(POLYGRAPHY), "run", *map(str, argv)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_comparator_fp16_engine_matches_ort(llama, feeds, ort_logits, fp16_engine):
    ref, eng = onnxrt_reference(llama.model), QcompileRunner(fp16_engine, name="engine")
    results = Comparator.run([ref, eng], data_loader=feeds)

    assert [name for name, _ in results.items()] == ["onnxrt-reference", "engine"]
    for ref_iter, eng_iter, expected in zip(results["onnxrt-reference"], results["engine"], ort_logits, strict=True):
        assert list(eng_iter.keys()) == ["logits"]
        np.testing.assert_allclose(ref_iter["logits"], expected, rtol=0, atol=1e-6)  # the same ORT numbers
        assert eng_iter["logits"].dtype == np.float32 and eng_iter["logits"].shape == (2, 16, 512)
        np.testing.assert_allclose(eng_iter["logits"], expected, rtol=0, atol=1e-3)
        assert eng_iter.runtime is not None and eng_iter.runtime > 0
    assert bool(Comparator.compare_accuracy(
        results, compare_func=SimpleCompareFunc(atol=1e-3, rtol=1e-3, find_output_func=exact_output_match)))


@pytest.mark.slow
def test_qcompile_runner_metadata_and_state(fp16_engine, feeds, monkeypatch):
    monkeypatch.setattr(polygraphy.config, "INTERNAL_CORRECTNESS_CHECKS", True)  # checks the state on deactivate
    runner = QcompileRunner(fp16_engine)
    assert runner.name.startswith("qcompile-runner") and not hasattr(runner, "engine")  # nothing loaded yet
    before = set(vars(runner))
    with runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        assert list(meta.keys()) == ["input_ids"]
        assert meta["input_ids"].dtype == DataType.INT64
        assert list(meta["input_ids"].shape) == ["batch", "seq"]  # dynamic dims keep their names
        out = runner.infer(feeds[0])
        assert list(out) == ["logits"] and runner.last_inference_time() > 0
    assert set(vars(runner)) == before  # deactivate restores the pre-activate state


def test_onnxrt_reference_disables_graph_optimizations(llama):
    with onnxrt_reference(llama.model) as runner:
        level = runner.sess.get_session_options().graph_optimization_level
        assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert runner.sess.get_providers() == ["CPUExecutionProvider"]
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        assert list(meta["input_ids"].shape) == ["batch", "seq"]


def test_onnxrt_reference_large_model_goes_through_a_file(llama, feeds, ort_logits, monkeypatch, tmp_path):
    monkeypatch.setattr(runners, "PROTOBUF_LIMIT", 1000)  # treat tiny-llama as over the 2 GB protobuf limit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runner = onnxrt_reference(llama.model)
    [folder] = tmp_path.glob("qcompile-reference-*")
    assert (folder / "model.onnx.data").is_file()
    with runner:
        np.testing.assert_allclose(runner.infer(feeds[0])["logits"], ort_logits[0], rtol=0, atol=1e-6)
    del runner
    gc.collect()
    assert not folder.exists()  # the temp dir goes with the runner


def test_lowering_runner_matches_ort(llama, feeds, ort_logits, monkeypatch):
    monkeypatch.setattr(polygraphy.config, "INTERNAL_CORRECTNESS_CHECKS", True)
    runner = LoweringRunner(llama.model)
    assert runner.name == "lowering-float64"
    with runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        assert meta["input_ids"].dtype == DataType.INT64 and list(meta["input_ids"].shape) == ["batch", "seq"]
    results = Comparator.run([onnxrt_reference(llama.model), runner], data_loader=feeds)
    for iteration, expected in zip(results["lowering-float64"], ort_logits, strict=True):
        assert list(iteration.keys()) == ["logits"]
        assert iteration["logits"].dtype == np.float32  # the graph's declared dtype
        np.testing.assert_allclose(iteration["logits"], expected, rtol=1e-4, atol=1e-5)
        assert iteration.runtime > 0


def _results(name0, name1):
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    results = RunResults()
    results.add([{name0: x}], runner_name="a")
    results.add([{name1: x}], runner_name="b")
    return results


def test_exact_output_match_does_not_pair_near_names():
    other = IterationResult({"logits_quant": np.zeros(2)}, runner_name="b")
    assert exact_output_match("logits", 0, other) is None
    assert exact_output_match("logits_quant", 0, other) == ["logits_quant"]

    # Polygraphy's default pairs "logits" with "logits_quant" (substring match) and the arrays agree...
    paired = Comparator.compare_accuracy(_results("logits", "logits_quant"), compare_func=SimpleCompareFunc())
    assert bool(paired) and list(paired[0][("a", "b")][0]) == ["logits"]  # [func][runner pair][iteration]
    # ... exact matching pairs nothing, which Polygraphy reports as an error
    with pytest.raises(PolygraphyException, match="no common outputs"):
        Comparator.compare_accuracy(_results("logits", "logits_quant"),
                                    compare_func=SimpleCompareFunc(find_output_func=exact_output_match))
    # same names are still compared
    assert bool(Comparator.compare_accuracy(_results("logits", "logits"),
                                            compare_func=SimpleCompareFunc(find_output_func=exact_output_match)))


def test_plugin_registered():
    eps = importlib.metadata.entry_points().select(group="polygraphy.run.plugins")
    assert "qcompile.validation.polygraphy_ext:export_argument_groups" in [ep.value for ep in eps]
    proc = polygraphy_run("-h")
    assert proc.returncode == 0 and "--qcompile-engine" in proc.stdout and "Run inference using qcompile" in proc.stdout


def test_cli_needs_engine_option(onnx_path, tmp_path):
    proc = polygraphy_run(onnx_path, "--onnxrt", "--qcompile", *CLI_DATA)
    assert proc.returncode != 0 and "--qcompile-engine" in proc.stdout + proc.stderr
    not_an_engine = tmp_path / "x.engine"
    not_an_engine.write_text("nope")
    proc = polygraphy_run(onnx_path, "--onnxrt", "--qcompile", "--qcompile-engine", not_an_engine, *CLI_DATA)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--qcompile-engine" in out and "x.engine" in out and "Traceback" not in out


@pytest.mark.slow
def test_cli_fp16_engine_passes(onnx_path, fp16_engine):
    proc = polygraphy_run(onnx_path, "--onnxrt", "--qcompile", "--qcompile-engine", fp16_engine, *CLI_DATA,
                          "--atol", "1e-3", "--rtol", "1e-3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "PASSED" in out and "qcompile-runner" in out


@pytest.mark.slow
def test_cli_int8_engine_fails_tight_tolerances(onnx_path, int8_engine):
    proc = polygraphy_run(onnx_path, "--onnxrt", "--qcompile", "--qcompile-engine", int8_engine, *CLI_DATA,
                          "--atol", "1e-7", "--rtol", "1e-7")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Difference exceeds tolerance" in out and "FAILED" in out
