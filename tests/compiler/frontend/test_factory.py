"""`file.py:factory` sources: dict and tuple forms, dynamic dims, module names; every error case."""
import textwrap

import numpy as np
import onnx
import pytest
import torch

from qcompile.errors import SourceError
from qcompile.frontend import load_source

from qc_testutil import ort_session

MODEL_PY = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.gate = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Sigmoid())
        def forward(self, x):
            return x + self.proj(x) * self.gate(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(16, 4)
        def forward(self, tokens, scale):
            x = tokens * scale
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    def make():
        torch.manual_seed(0)
        return {"module": Net(), "inputs": {"tokens": torch.randn(2, 5, 16), "scale": torch.ones(1)},
                "dynamic_dims": {"tokens": {0: "batch", 1: "seq"}}, "dim_ranges": {"seq": (1, 128)},
                "output_names": ["out"]}

    def make_one_token():  # a decode-sized example: batch 1, seq 1
        torch.manual_seed(0)
        return {"module": Net(), "inputs": {"tokens": torch.randn(1, 1, 16), "scale": torch.ones(1)},
                "dynamic_dims": {"tokens": {0: "batch", 1: "seq"}}, "dim_ranges": {"seq": (1, 128)}}

    def make_tuple():
        torch.manual_seed(1)
        batch = torch.export.Dim("rows", min=1, max=32)
        return nn.Linear(8, 16), (torch.randn(3, 8),), {"input": {0: batch}}

    def boom():
        raise RuntimeError("no weights here")

    def not_a_module():
        return "model", (torch.randn(1),)

    def wrong_inputs():
        return nn.Linear(2, 2), [1, 2]

    def bad_dict():
        return {"module": nn.Linear(2, 2)}

    def bad_number():
        return 42

    def wrong_kwarg():  # Sequential.forward takes `input`
        return {"module": nn.Sequential(nn.Linear(2, 2)), "inputs": {"x": torch.randn(2, 2)}}

    def bad_dims():
        return nn.Linear(2, 2), (torch.randn(1, 2),), {"nope": {0: "batch"}}
''')


@pytest.fixture(scope="module")
def model_py(tmp_path_factory):
    path = tmp_path_factory.mktemp("factory") / "model.py"
    path.write_text(MODEL_PY)
    return path


@pytest.fixture(scope="module")
def net(model_py):
    return load_source(f"{model_py}:make")


def test_dict_factory(net):
    onnx.checker.check_model(net.model, full_check=True)
    assert net.kind == "torch" and net.name == "make"
    assert [(s.name, s.shape) for s in net.inputs] == [("tokens", ["batch", "seq", 16]), ("scale", [1])]
    assert net.inputs[0].dim_ranges == {"batch": (1, 64), "seq": (1, 128)}
    assert net.output_names == ["out"] and net.outputs[0].shape == ["batch", "seq", 4]
    dims = [d.dim_param for d in net.model.graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "seq"]
    sess = ort_session(net.model)
    for sizes in ({"batch": 1, "seq": 1}, {"batch": 4, "seq": 9}):
        feeds = net.random_inputs(np.random.default_rng(0), sizes)
        with torch.no_grad():
            want = net.torch_module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        np.testing.assert_allclose(sess.run(["out"], feeds)[0], want, atol=1e-4, rtol=1e-4)


def test_engine_example_raises_dims_of_size_one_to_two(model_py, net):
    """torch.export specializes sizes 0 and 1, so an engine's export gets 2 where the example has 1 (and the
    example itself where every dynamic dim is already >= 2)."""
    src = load_source(f"{model_py}:make_one_token")
    assert src.example_inputs["tokens"].shape == (1, 1, 16)
    feed = src.engine_example()
    assert feed["tokens"].shape == (2, 2, 16) and feed["scale"].shape == (1,)
    assert net.engine_example() is net.example_inputs


def test_dict_factory_module_stamps(net):
    stamps = {next(p.value for p in n.metadata_props if p.key == "qcompile.module")
              for n in net.model.graph.node if n.op_type in ("MatMul", "Gemm")}
    assert stamps == {"blocks.0.proj", "blocks.0.gate.0", "blocks.1.proj", "blocks.1.gate.0", "head"}


def test_tuple_factory_with_torch_dims(model_py):
    src = load_source(f"{model_py}:make_tuple")
    assert [(s.name, s.shape, s.dim_ranges) for s in src.inputs] == [("input", ["rows", 8], {"rows": (1, 32)})]
    feeds = src.random_inputs(np.random.default_rng(0), {"rows": 6})
    with torch.no_grad():
        want = src.torch_module(torch.from_numpy(feeds["input"])).numpy()
    np.testing.assert_allclose(ort_session(src.model).run(None, feeds)[0], want, atol=1e-5)


@pytest.mark.parametrize("fn, needle", [
    ("missing_fn", "no function 'missing_fn'"),
    ("boom", "raised RuntimeError: no weights here"),
    ("not_a_module", "expected a torch.nn.Module"),
    ("wrong_inputs", "every input must be a torch.Tensor"),
    ("bad_dict", "without 'inputs'"),
    ("bad_number", "returned int"),
    ("bad_dims", "input 'nope'"),
])
def test_factory_errors(model_py, fn, needle):
    with pytest.raises(SourceError, match="model.py") as info:
        load_source(f"{model_py}:{fn}")
    assert needle in str(info.value)


def test_export_error_names_the_real_cause(model_py):
    """torch.onnx's own first line is generic ("Failed to export the model with torch.export"); the error shows the
    exception it summarizes."""
    with pytest.raises(SourceError, match=r"wrong_kwarg failed: .*TypeError.*missing a required argument: 'input'"):
        load_source(f"{model_py}:wrong_kwarg")


def test_factory_file_missing(tmp_path):
    with pytest.raises(SourceError, match=r"nothere\.py does not exist"):
        load_source(f"{tmp_path / 'nothere.py'}:make")


def test_factory_file_does_not_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_module_xyz\n")
    with pytest.raises(SourceError, match=r"broken\.py.*ModuleNotFoundError"):
        load_source(f"{path}:make")


def test_unknown_builtin_lists_builtins():
    with pytest.raises(SourceError, match="tiny-lama") as info:
        load_source("tiny-lama")
    assert "tiny-llama" in str(info.value) and "small-cnn" in str(info.value)


def test_large_model_export_leaves_no_temporary_files(model_py, monkeypatch, tmp_path):
    """A model over LARGE_MODEL_BYTES goes through an ONNX file with external data (lowered here to 0 bytes); that
    folder is removed once the model is back in memory (it held 1.7 GB per llama3-8b-layers load before), and a
    given work_dir keeps its files."""
    import tempfile

    from qcompile.frontend import export

    monkeypatch.setattr(export, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    src = load_source(f"{model_py}:make")
    assert list(tmp_path.glob("qcompile-export-*")) == []
    assert {t.name for t in src.model.graph.initializer} and all(
        t.data_location != onnx.TensorProto.EXTERNAL for t in src.model.graph.initializer)
    kept = tmp_path / "work"
    load_source(f"{model_py}:make", work_dir=kept)
    assert (kept / "make.onnx").is_file()
