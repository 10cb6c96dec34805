"""What a build tells the user about its passes, read off graph-level builds of tiny-llama
(`qcompile.build(..., output=None)`: export, calibrate, quantize and fuse; no lowering, no compile)."""
import json

import pytest

import qcompile
from qcompile.cli import format_build_summary
from qcompile.report import write_json_atomic

pytestmark = pytest.mark.slow

AWQ_NOTE = ("FoldAwqScalesPass: AWQ scales: 10 folded into previous ops, 2 kept as Mul "
            "(layers.0.attn.o_proj, layers.1.attn.o_proj)")


@pytest.fixture(scope="module")
def graph_builds():
    """`qcompile.build(..., output=None)` of tiny-llama by recipe (calibrated on seeded random data), once each."""
    cache = {}

    def get(recipe):
        if recipe not in cache:
            cache[recipe] = qcompile.build("tiny-llama", recipe, output=None, calib="random", device="cpu",
                                           progress_stream=None)
        return cache[recipe]
    return get


def test_a_graph_level_build_stops_before_the_engine(graph_builds):
    result = graph_builds("w4a16_awq")
    assert result.engine_path is None and list(result.stage_seconds) == ["export", "calibrate", "quantize"]
    assert len(result.layers) == 12 and result.plugin_model is not None
    assert any(line.split() == ["engine", "(not", "built)"] for line in format_build_summary(result).splitlines())


def test_awq_fold_note_reaches_the_report_and_the_terminal_summary(graph_builds, tmp_path):
    """FoldAwqScalesPass's summary: in the build report JSON (as the CLI writes it) and in the terminal summary
    table, through the pass-notes mechanism every pass shares (SmoothQuant's note takes the same way)."""
    result = graph_builds("w4a16_awq")
    assert result.pass_notes == [AWQ_NOTE]
    report = json.loads(write_json_atomic(tmp_path / "build.json", result.summary()).read_text())
    assert report["pass_notes"] == [AWQ_NOTE]
    summary = format_build_summary(result).splitlines()
    table = summary[summary.index("Build summary"):]
    notes = [line for line in table if line.startswith("pass note")]
    assert len(notes) == 1 and notes[0].endswith(AWQ_NOTE)

