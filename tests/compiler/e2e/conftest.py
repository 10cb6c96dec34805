"""Shared builds for the end-to-end tests (each AOTInductor build takes ~10-20 s on CPU)."""
import pytest

import qcompile
from qcompile.cli import main as cli_main


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def llama_calib(workdir):
    path = workdir / "calib.npz"
    assert cli_main(["sample-inputs", "tiny-llama", "-o", str(path), "--samples", "8",
                     "--dim", "batch=1", "--dim", "seq=32", "--seed", "1"]) == 0
    return path


@pytest.fixture(scope="session")
def llama_builds(workdir, llama_calib):
    """tiny-llama built with fp16, int8 and fp8 on CPU (int8 also emits its portable Q/DQ ONNX)."""
    results = {}
    for recipe in ("fp16", "int8", "fp8"):
        emit = workdir / f"tl-{recipe}.qdq.onnx" if recipe != "fp16" else None
        results[recipe] = qcompile.build("tiny-llama", recipe, output=workdir / f"tl-{recipe}.engine",
                                         calib=str(llama_calib), emit_onnx=emit, device="cpu",
                                         progress_stream=None)
    return results
