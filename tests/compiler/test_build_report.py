"""What a build tells the user about its passes, read off graph-level builds of tiny-llama
(`qcompile.build(..., output=None)`: export, calibrate, quantize and fuse; no lowering, no compile)."""
import json

import pytest

from qcompile.cli import format_build_summary
from qcompile.report import write_json_atomic

pytestmark = pytest.mark.slow

AWQ_NOTE = ("FoldAwqScalesPass: AWQ scales: 10 folded into previous ops, 2 kept as Mul "
            "(layers.0.attn.o_proj, layers.1.attn.o_proj)")


def test_a_graph_level_build_stops_before_the_engine(graph_builds):
    result = graph_builds("w4a16_awq")
    assert result.engine_path is None and list(result.stage_seconds) == ["export", "calibrate", "quantize"]
    assert len(result.layers) == 12 and result.plugin_model is not None
    assert any(line.split() == ["engine", "(not", "built)"] for line in format_build_summary(result).splitlines())


def test_progress_stage_lines_of_a_weight_only_fp4_build(graph_builds):
    """The stage lines name each stage's subject; the quantize line names the recipe (it once counted only the Q/DQ
    targets: "0 layers selected" for FP4 and INT4 recipes that quantize every linear layer)."""
    result = graph_builds("nvfp4")
    stages = [line for line in graph_builds.progress["nvfp4"].splitlines() if line.startswith("[")]
    assert stages == ["[1/3] export tiny-llama ...", "[2/3] calibrate max ...", "[3/3] quantize nvfp4 ..."]
    assert len(result.layers) == 14


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


# ---------------------------------------------------------------- declines: only the pass that owns a layer declines it

# the passes of each recipe that may decline its layers: those that quantize or fuse them (passes/_forms.py)
OWNERS = {"w8a16": {"InsertQDQPass"},  # attention's Q @ K^T and P @ V: no constant weight
          "fp8_block": {"QuantizeFp8BlockPass"},  # those, and gate / up / down (688 is not a multiple of 128)
          "nvfp4": {"QuantizeWeightsFp4Pass"}}


@pytest.mark.parametrize("name", list(OWNERS))
def test_layers_another_pass_handles_are_not_declined(graph_builds, name):
    """InsertQDQPass leaves FP4 and FP8-block layers to their passes, SinkDequantizePass leaves FP4's weight
    Transpose, FuseScaledGemmPass leaves weight-only INT8 and FP8-block GEMMs to their fusions: none of them
    declines those layers. Every declined layer really stays unquantized (no plugin node has its name)."""
    result = graph_builds(name)
    report = result.summary()["declined"]
    assert report and {d["reason"].split(":")[0] for d in report} == OWNERS[name], report
    fused = {n.name for n in result.plugin_model.graph.node if n.domain == "qcompile"}
    assert fused and not fused & {d["node"] for d in report}


def test_the_recipe_is_what_keeps_the_scaled_gemm_fusion_off_other_fusions_layers(graph_builds):
    """Without the recipe, FuseScaledGemmPass tries every DQ-fed GEMM (a Q/DQ model from elsewhere) and says why
    it did not fuse the weight-only ones; with it, it leaves them to FuseInt8WoGemmPass. Same plugin graph."""
    from qcompile.passes import fuse_plugins

    result = graph_builds("w8a16")
    bare, without = fuse_plugins(result.qdq_model)
    keyed, with_recipe = fuse_plugins(result.qdq_model, recipe=result.recipe)
    assert sum(r.startswith("FuseScaledGemmPass") for _, r in without.declined) == 14
    assert not with_recipe.declined
    assert bare.SerializeToString() == keyed.SerializeToString()


@pytest.mark.parametrize("recipe, count", [("w4a16_awq", 12), ("nvfp4", 14), ("fp8", 0)])
def test_fp8_large_m_note_counts_the_gemms_it_changes(graph_builds, recipe, count, monkeypatch):
    """`--fp8-large-m`'s line in the build summary: the INT4 / FP4 GEMM layers it moves to FP8 above 128 rows (the
    recipe's 4-bit layers, as the layer table counts them) and what it does on the device (CPU: emulated; a GPU
    without FP8 tensor cores: nothing), or that it changes nothing (an fp8 recipe has none)."""
    import torch

    from qcompile.pipeline import _fp8_large_m_note

    model = graph_builds(recipe).plugin_model
    notes = {}
    for device, capability in (("cpu", None), ("cuda", (9, 0)), ("cuda", (8, 0))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_, c=capability: c)
        notes[device, capability] = _fp8_large_m_note(model, device)
    if not count:
        assert set(notes.values()) == {"--fp8-large-m: the engine has no INT4 or FP4 GEMM; the flag changes nothing"}
        return
    layers = f"--fp8-large-m: {count} INT4/FP4 GEMM layer(s)"
    assert notes == {("cpu", None): f"{layers} emulate the FP8 path above 128 rows (cpu: its numerics, no speed-up)",
                     ("cuda", (9, 0)): f"{layers} run on FP8 tensor cores above 128 rows",
                     ("cuda", (8, 0)): f"{layers} keep the exact path: this GPU (sm_80) has no FP8 tensor cores"}
