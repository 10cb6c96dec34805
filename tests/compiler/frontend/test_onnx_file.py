"""ONNX file sources: plain, with external data, older opset; and their error messages."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import SourceError
from qcompile.frontend import load_source

from qc_testutil import ort_session


def _model(opset=21):
    """y = relu(x @ W) + gather(E, ids) summed; x [N, 32], ids [N]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W")
    e = numpy_helper.from_array(rng.standard_normal((100, 16)).astype(np.float32), "E")
    mm = helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")
    mm.metadata_props.add(key="namespace", value=": M/proj: torch.nn.Linear/linear: aten.linear.default")
    nodes = [mm, helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gather", ["E", "ids"], ["g"], name="gather"),
             helper.make_node("Add", ["r", "g"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32]),
                               helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [w, e])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset > 17 else 8)


def _check_runs(src, path):
    onnx.checker.check_model(src.model, full_check=True)
    assert src.kind == "onnx" and src.name == path.stem
    assert [(s.name, s.dtype, s.shape) for s in src.inputs] == [("x", "float32", ["N", 32]), ("ids", "int64", ["N"])]
    assert src.inputs[1].value_range == (0, 100)  # Gather indices into a 100-row table
    assert src.inputs[0].dim_ranges == {"N": (1, 4096)}
    sess = ort_session(src.model)
    for n in (1, 7):
        feeds = src.random_inputs(np.random.default_rng(n), {"N": n})
        assert sess.run(None, feeds)[0].shape == (n, 16)
    mm = next(n for n in src.model.graph.node if n.op_type == "MatMul")
    assert {p.key: p.value for p in mm.metadata_props}["qcompile.module"] == "proj"


def test_onnx_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    src = load_source(str(path))
    _check_runs(src, path)
    assert set(src.example_inputs) == {"x", "ids"}


def test_onnx_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_model(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert (tmp_path / "ext.data").stat().st_size > 8000
    src = load_source(str(path))
    _check_runs(src, path)
    assert all(not t.external_data for t in src.model.graph.initializer)  # loaded into memory
    (tmp_path / "ext.data").unlink()
    with pytest.raises(SourceError, match="ext.onnx.*external data"):
        load_source(str(path))


def test_old_opset_is_converted(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(_model(opset=17), path)
    src = load_source(str(path), opset=21)
    assert next(o.version for o in src.model.opset_import if o.domain == "") == 21
    _check_runs(src, path)


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match=r"missing\.onnx does not exist"):
        load_source(str(tmp_path / "missing.onnx"))


@pytest.mark.parametrize("data", [b"this is not a protobuf \x00\x01\x02" * 10, b"", b"\x08\x07"])
def test_corrupt_file(tmp_path, data):
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(SourceError, match=r"bad\.onnx.*re-export"):
        load_source(str(path))
