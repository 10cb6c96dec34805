"""Validation end to end: engines against their FP16 graph through Polygraphy, the CLI, reports, per-layer.

The sabotaged engine is built by the real pipeline with one layer's activation scale made badly wrong
(as a bad calibration would), so validation must fail and the per-layer ranking must name that layer.
"""
import json

import numpy as np
import onnx
import pytest

import qcompile
import qcompile.passes
from qcompile.cli import main
from qcompile.engine import read_manifest
from qcompile.validation.report import report_path_for
from qcompile.validation.validate import validate_engine

pytestmark = pytest.mark.slow

SABOTAGED_MODULE = "layers.1.mlp.gate_proj"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _sabotage(model: onnx.ModelProto, module: str, factor: float) -> str:
    """Divide the activation scale of the ScaledGemm node of `module` by `factor`; returns the node name."""
    from qcompile.layers import layer_table

    node = next(r.node for r in layer_table(model) if r.module == module)
    plugin = next(n for n in model.graph.node if n.name == node)
    scale_name = plugin.input[1]
    for init in model.graph.initializer:
        if init.name == scale_name:
            value = onnx.numpy_helper.to_array(init) / factor
            init.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), scale_name))
            return node
    raise AssertionError(f"no initializer {scale_name}")


@pytest.fixture(scope="module")
def sabotaged_engine(tmp_path_factory, llama_calib):
    path = tmp_path_factory.mktemp("bad") / "bad.engine"
    real = qcompile.passes.fuse_plugins
    names = []

    def fuse_and_break(model, **kwargs):
        plugin_model, result = real(model, **kwargs)
        names.append(_sabotage(plugin_model, SABOTAGED_MODULE, 40.0))
        return plugin_model, result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qcompile.passes, "fuse_plugins", fuse_and_break)
        qcompile.build("tiny-llama", "int8", output=path, calib=str(llama_calib), device="cpu", progress_stream=None)
    return path, names[0]


def test_fp16_engine_passes_tight_thresholds(fp16_engine, llama):
    from qcompile.recipes.schema import ValidationThresholds

    feeds = [llama.random_inputs(np.random.default_rng(i), {"batch": 2, "seq": 12}) for i in range(3)]
    report = validate_engine(fp16_engine, llama.model, data=feeds, data_description="3 random feeds",
                             thresholds=ValidationThresholds(min_cosine=0.9999, min_sqnr_db=40.0, min_top1=0.95),
                             progress_stream=None)
    assert report.passed, report.to_dict()
    (logits,) = report.outputs
    assert logits.name == "logits" and logits.metrics["cosine"] > 0.9999 and logits.metrics["top1"] >= 0.95
    assert report.reference["precision"] == "fp16" and "ONNX Runtime" in report.reference["runtime"]
    assert report.data["iterations"] == 3 and report.data["random"] is False
    # the FP16 reference is not the engine's own numbers: the CPU engine computes in FP32
    assert 0 < logits.metrics["max_abs"] < 0.05
    # report saved next to the engine, summarised in the manifest
    saved = json.loads(report_path_for(fp16_engine).read_text())
    assert saved["passed"] is True and saved["outputs"]["logits"]["cosine"] == pytest.approx(logits.metrics["cosine"])
    entry = read_manifest(fp16_engine).extra["validation"]
    assert entry["passed"] is True and entry["report"] == report_path_for(fp16_engine).name
    # the engine still loads and runs after its manifest was rewritten
    out = qcompile.load(fp16_engine).run(feeds[0])["logits"]
    assert out.shape == (2, 12, 512)


def test_random_data_comes_from_polygraphy_with_manifest_ranges(fp16_engine, llama, monkeypatch, capfd):
    import qcompile.validation.validate as v

    seen = []
    real = v._random_feeds

    def spy(manifest):
        feeds = real(manifest)
        seen.extend(feeds)
        return feeds

    monkeypatch.setattr(v, "_random_feeds", spy)
    capfd.readouterr()
    report = validate_engine(fp16_engine, llama.model, save=False, progress_stream=None)
    printed = capfd.readouterr()
    assert "[I]" not in printed.out + printed.err  # Polygraphy's INFO lines (the reference session) stay quiet
    assert report.data["random"] is True and "Polygraphy" in report.data["description"]
    assert len(seen) == report.data["iterations"] >= 2
    ids = np.concatenate([f["input_ids"].ravel() for f in seen])
    assert ids.min() >= 0 and ids.max() <= 511 and len(np.unique(ids)) > 50  # within the vocab, varied
    assert not np.array_equal(seen[0]["input_ids"], seen[1]["input_ids"])  # seeded per iteration


def test_mismatched_output_names_are_caught(fp16_engine, llama, capsys, tmp_path):
    renamed = onnx.ModelProto()
    renamed.CopyFrom(llama.model)
    old = renamed.graph.output[0].name
    for node in renamed.graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = "scores"
    renamed.graph.output[0].name = "scores"
    path = tmp_path / "renamed.onnx"
    onnx.save(renamed, str(path))
    code, out, err = run_cli(capsys, "validate", fp16_engine, "--reference", path)
    assert code == 2
    assert "engine output 'logits' is not an output of the reference graph" in err and "scores" in err
    assert "Traceback" not in err


def test_build_validates_on_held_out_data_and_inspect_shows_it(llama_builds, capsys):
    # the shared int8 engine: `qcompile build tiny-llama --recipe int8 --calib CALIB (10 samples) --device cpu`
    engine = llama_builds["int8"].engine_path
    build = llama_builds.cli_runs["int8"]
    code, out, err = build.code, build.out, build.err
    assert code == 0, out + err
    assert "Validation vs the fp16 graph" in out and "validation PASSED" in out
    assert "held-out part (2 of 10)" in out  # 20% of the calibration samples, kept out of calibration
    report = json.loads(report_path_for(engine).read_text())
    assert report["passed"] and report["data"]["iterations"] == 2 and report["outputs"]["logits"]["cosine"] >= 0.99
    build = json.loads((engine.parent / f"{engine.name}.build.json").read_text())
    assert build["calibration"]["samples"] == 8
    code, out, _ = run_cli(capsys, "inspect", engine)
    assert code == 0 and "last validation" in out and "PASSED vs fp16 graph" in out

    # thresholds from the command line override the recipe's: an impossible one fails with exit 1
    code, out, _ = run_cli(capsys, "validate", engine, "--min-cosine", "1.0")
    assert code == 1 and "validation FAILED" in out and "cosine < 1" in out
    assert json.loads(report_path_for(engine).read_text())["passed"] is False  # the report was replaced
    code, out, _ = run_cli(capsys, "inspect", engine)
    assert "FAILED vs fp16 graph" in out


def test_sabotaged_layer_fails_and_is_ranked_first(sabotaged_engine, capsys):
    engine, node = sabotaged_engine
    code, out, err = run_cli(capsys, "validate", engine, "--per-layer")
    assert code == 1, out + err
    assert "validation FAILED" in out
    report = json.loads(report_path_for(engine).read_text())
    assert report["passed"] is False
    layers = report["layers"]
    assert layers[0]["node"] == node and layers[0]["module"] == SABOTAGED_MODULE
    assert layers[0]["rank"] == 1 and layers[0]["clip_rate"] > 0.1
    assert layers[0]["contribution_db"] > max(r["contribution_db"] or 0 for r in layers[1:]) + 3
    assert node in out  # the top-offenders table names it


def test_report_round_trip(fp16_engine, llama):
    feeds = [llama.random_inputs(np.random.default_rng(7), {"batch": 2, "seq": 10})]
    report = validate_engine(fp16_engine, llama.model, data=feeds, precision="fp32", progress_stream=None)
    saved = json.loads(report_path_for(fp16_engine).read_text())
    assert saved == json.loads(json.dumps(report.to_dict(), default=str))
    assert saved["reference"]["precision"] == "fp32"
    assert set(saved["versions"]) >= {"qcompile", "torch", "onnxruntime", "polygraphy"}
    assert saved["thresholds"]["min_cosine"] == 0.999  # the fp16 recipe's


def test_lowering_reference_when_onnx_runtime_cannot_run_the_graph(fp16_engine, llama, monkeypatch):
    from qcompile.validation import runners

    def ort_cannot(model, name=None):
        raise RuntimeError("NOT_IMPLEMENTED: DequantizeLinear(23)")

    monkeypatch.setattr(runners, "onnxrt_reference", ort_cannot)
    feeds = [llama.random_inputs(np.random.default_rng(8), {"batch": 2, "seq": 9})]
    report = validate_engine(fp16_engine, llama.model, data=feeds, save=False, progress_stream=None)
    assert report.reference["runtime"] == "qcompile lowering, float64"
    assert "NOT_IMPLEMENTED" in report.reference["note"]
    assert report.passed and report.outputs[0].metrics["cosine"] > 0.99999  # FP32 engine vs float64 graph


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_fp8_engine_validates(tmp_path, llama_calib, capsys):
    engine = tmp_path / "tl-fp8.engine"
    code, out, err = run_cli(capsys, "build", "tiny-llama", "--recipe", "fp8", "--calib", llama_calib, "-o", engine,
                             "--device", "cuda")
    assert code == 0, out + err
    report = json.loads(report_path_for(engine).read_text())
    assert report["passed"] and report["outputs"]["logits"]["cosine"] >= 0.99
    code, out, err = run_cli(capsys, "validate", engine, "--per-layer", "--top", "3")
    assert code == 0, out + err
    assert len(json.loads(report_path_for(engine).read_text())["layers"]) == 15
