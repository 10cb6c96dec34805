import collections
import logging

import onnx
import pytest
from passes_testlib import graph_of, parse

from qcompile.errors import LintError, PassError
from qcompile.passes import DUMP_ENV, InPlacePass, PassManager, PassResult


def tiny():
    return graph_of(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }"""))


class CountPass(InPlacePass):
    def call(self, graph):
        return PassResult(graph, True, collections.Counter(nodes=len(graph.nodes)), [("n0", "because")])


class BoomPass(InPlacePass):
    def __init__(self, exc):
        self.exc = exc

    def call(self, graph):
        raise self.exc


class NotInPlacePass(InPlacePass):
    def call(self, graph):
        return PassResult(tiny(), False)


def test_manager_aggregates_stats_and_declines(caplog):
    with caplog.at_level(logging.DEBUG, logger="qcompile.passes.infra"):
        result = PassManager([CountPass(), CountPass()]).run(tiny())
    assert result.modified and result.stats == {"CountPass.nodes": 2}
    assert result.declined == [("n0", "CountPass: because")] * 2
    assert "CountPass declined n0: because" in caplog.text


class NotePass(InPlacePass):
    def call(self, graph):
        return PassResult(graph, False, notes=["3 things folded, 1 kept"])


def test_manager_collects_notes_prefixed_with_the_pass_name():
    result = PassManager([NotePass(), CountPass(), NotePass()]).run(tiny())
    assert result.notes == ["NotePass: 3 things folded, 1 kept"] * 2


def test_errors_name_the_pass_and_the_passes_before():
    with pytest.raises(PassError, match=r"pass 'BoomPass' failed after \[CountPass\]: bad thing"):
        PassManager([CountPass(), BoomPass(ValueError("bad thing"))]).run(tiny())


def test_lint_error_passes_through_unchanged():
    err = LintError("DequantizeLinear node 'w': bad")
    with pytest.raises(LintError) as info:
        PassManager([BoomPass(err)]).run(tiny())
    assert info.value is err


def test_in_place_contract_is_checked():
    with pytest.raises(PassError, match="declared in-place"):
        PassManager([NotInPlacePass()]).run(tiny())


def test_dump_env_writes_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_ENV, str(tmp_path))
    PassManager([CountPass()]).run(tiny())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_CountPass_after.onnx", "00_CountPass_before.onnx"]
    onnx.checker.check_model(onnx.load(str(tmp_path / files[0])))


def test_graph_surgeon_warnings_stay_off_the_terminal(capsys):
    """FP8 constants and FP8 models made graph surgeon print "[W] Could not convert: FLOAT8E4M3FN ..." (and then a
    warning about the `colored` module) during every FP8 / FP4 / FP8-block build."""
    import ml_dtypes
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnx_graphsurgeon.logger import G_LOGGER

    from qcompile.passes import _graph as G

    G_LOGGER.once_logged.clear()  # its warnings print once per process: an earlier test may have used that up
    w = np.arange(8, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).reshape(2, 4)
    const = G.make_constant("w_fp8", w)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT)], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w")]))
    graph = G.import_model(model)
    out = capsys.readouterr()
    assert "Could not convert" not in out.out + out.err and "colored" not in out.out + out.err
    assert const.values.shape == (2, 4) and graph.tensors()["w"].values.shape == (2, 4)
