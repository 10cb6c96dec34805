"""Fixtures shared by the compiler tests, built once per run and reused: the tiny-llama source (exported once per
opset), calibration data, and the engines that several test modules check (fp16 / int8 / fp8 tiny-llama).

Each AOTInductor build of tiny-llama takes ~20-40 s on 2 CPUs and each torch export ~5-10 s, so a test that only
needs *an* engine of a recipe takes the shared one instead of building its own; a test that needs one built a
particular way (sabotaged, another recipe) still builds it.
"""
import copy

import io

import pytest

import qcompile
import qcompile.frontend
from qc_testutil import run_cli, save_samples
from qcompile.frontend import source as source_module

# built-in examples small enough to keep in memory for the run (not mlp-large / llama3-8b-layers)
_CACHED_EXAMPLES = ("tiny-llama", "small-cnn")


@pytest.fixture(scope="session", autouse=True)
def export_builtins_once():
    """`load_source` exports each small built-in example once per (name, opset) for the whole run and hands every
    caller its own deep copy (`qcompile build`, `sample-inputs` and `validate` all export the source again
    otherwise). The export itself is tested in tests/compiler/frontend."""
    real = source_module.load_source
    cache = {}

    def load_source(spec, *, opset: int = 21, work_dir=None):
        if work_dir is not None or str(spec) not in _CACHED_EXAMPLES:
            return real(spec, opset=opset, work_dir=work_dir)
        key = (str(spec), opset)
        if key not in cache:
            cache[key] = real(spec, opset=opset)
        return copy.deepcopy(cache[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(source_module, "load_source", load_source)
        mp.setattr(qcompile.frontend, "load_source", load_source)
        yield load_source


@pytest.fixture(scope="session")
def llama(export_builtins_once):
    """The tiny-llama source: its FP32 ONNX graph and input sampler."""
    return export_builtins_once("tiny-llama")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def llama_calib(workdir):
    """10 calibration samples of tiny-llama (batch 1, seq 32), written by `qcompile sample-inputs`."""
    path = workdir / "calib.npz"
    run = run_cli("sample-inputs", "tiny-llama", "-o", path, "--samples", "10", "--dim", "batch=1", "--dim", "seq=32",
                  "--seed", "1")
    assert run.code == 0, run.err
    return path


@pytest.fixture(scope="session")
def w4_calib(tmp_path_factory, llama):
    """32 calibration samples of tiny-llama (batch 1, seq 64): the INT4 (AWQ / GPTQ) recipes' data."""
    return save_samples(tmp_path_factory.mktemp("w4") / "calib.npz", llama, 32, {"batch": 1, "seq": 64}, seed=5)


class _LlamaBuilds:
    """tiny-llama built on CPU, one engine per recipe, each built the first time a test asks for it:

    - "fp16": `qcompile.build` (no calibration);
    - "int8": `qcompile build --calib llama_calib --emit-onnx` through the CLI (validated on the held-out 2 of the
      10 samples; `cli_runs["int8"]` has its exit code and output);
    - "fp8": `qcompile.build(calib=llama_calib, emit_onnx=...)`.
    `builds[recipe]` is the BuildResult; the portable Q/DQ ONNX of int8 / fp8 is `workdir / "tl-<recipe>.qdq.onnx"`.
    """

    def __init__(self, workdir, calib):
        self.workdir, self.calib = workdir, calib
        self.results, self.cli_runs = {}, {}

    def __getitem__(self, recipe):
        if recipe not in self.results:
            engine = self.workdir / f"tl-{recipe}.engine"
            emit = self.workdir / f"tl-{recipe}.qdq.onnx"
            if recipe == "int8":
                run = run_cli("build", "tiny-llama", "--recipe", "int8", "--calib", self.calib, "-o", engine,
                              "--device", "cpu", "--emit-onnx", emit)
                assert run.code == 0, run.out + run.err
                self.cli_runs[recipe], self.results[recipe] = run, run.result
            else:
                self.results[recipe] = qcompile.build(
                    "tiny-llama", recipe, output=engine, calib=str(self.calib) if recipe != "fp16" else None,
                    emit_onnx=emit if recipe != "fp16" else None, device="cpu", progress_stream=None)
        return self.results[recipe]


@pytest.fixture(scope="session")
def llama_builds(workdir, llama_calib):
    """The shared tiny-llama engines by recipe ("fp16", "int8", "fp8"), built on first use (see `_LlamaBuilds`)."""
    return _LlamaBuilds(workdir, llama_calib)


@pytest.fixture(scope="session")
def fp16_engine(llama_builds):
    """tiny-llama built with the fp16 recipe on CPU (the shared build)."""
    return llama_builds["fp16"].engine_path


@pytest.fixture(scope="session")
def int8_random_cli(tmp_path_factory):
    """`qcompile build tiny-llama --recipe int8 --calib random` (CLI, validated): the run and its engine path."""
    engine = tmp_path_factory.mktemp("int8-random") / "tl.engine"
    return run_cli("build", "tiny-llama", "--recipe", "int8", "--calib", "random", "-o", engine), engine


@pytest.fixture(scope="session")
def graph_builds():
    """`qcompile.build(..., output=None)` of tiny-llama by recipe (export, calibrate on seeded random data, quantize;
    no engine), each once per run."""
    cache, progress = {}, {}

    def get(recipe):
        if recipe not in cache:
            stream = io.StringIO()
            cache[recipe] = qcompile.build("tiny-llama", recipe, output=None, calib="random", device="cpu",
                                           progress_stream=stream)
            progress[recipe] = stream.getvalue()
        return cache[recipe]
    get.progress = progress  # what each build wrote to its progress stream
    return get


@pytest.fixture(scope="session")
def w4a16_awq(llama, w4_calib):
    """tiny-llama's w4a16_awq quantization on `w4_calib` (one AWQ calibration + search per run), a dict:
    recipe, jobs, weights / scales (AWQ results by node name), qdq (portable Q/DQ model), result (its PassResult),
    plugin (the fused plugin model)."""
    from qcompile.algorithms.plan import observers_for, plan_int4_jobs, run_jobs
    from qcompile.calibration import calibrate, load_calibration_data
    from qcompile.passes import fuse_plugins, quantize_model
    from qcompile.recipes import load_recipe

    recipe = load_recipe("w4a16_awq")
    jobs = plan_int4_jobs(llama.model, recipe)
    watch = observers_for(jobs)
    calibrate(llama.model, [], load_calibration_data(str(w4_calib), llama.inputs), recipe.calibration,
              extra_observers=watch)
    weights, scales = run_jobs(jobs, watch)
    qdq, result = quantize_model(llama.model, recipe, {}, weights, scales)
    return {"recipe": recipe, "jobs": jobs, "weights": weights, "scales": scales, "qdq": qdq, "result": result,
            "plugin": fuse_plugins(qdq)[0]}
