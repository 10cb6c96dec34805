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
