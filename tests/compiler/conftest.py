"""Fixtures shared by the compiler tests: the tiny-llama source and its fp16 engine (built once per run)."""
import pytest

import qcompile
from qcompile.frontend import load_source


@pytest.fixture(scope="session")
def llama():
    """The tiny-llama source: its FP32 ONNX graph and input sampler."""
    return load_source("tiny-llama")


@pytest.fixture(scope="session")
def fp16_engine(tmp_path_factory):
    """tiny-llama built with the fp16 recipe on CPU (an AOTInductor compile, ~20 s)."""
    path = tmp_path_factory.mktemp("fp16") / "tl16.engine"
    qcompile.build("tiny-llama", "fp16", output=path, device="cpu", progress_stream=None)
    return path
