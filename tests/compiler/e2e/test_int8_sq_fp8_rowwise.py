"""The int8_sq and fp8_rowwise recipes on tiny-llama: the portable Q/DQ ONNX (per-token dynamic form) runs in
ONNX Runtime and agrees with the plugin graph (ORT function bodies and our lowering), and `qcompile build`
builds, validates and runs both engines on CPU."""
import json

import numpy as np
import pytest
import torch

from qc_testutil import ort_session, save_samples
from qcompile.cli import main
from qcompile.layers import layer_table
from qcompile.lowering import lower_onnx
from qcompile.passes import fuse_plugins, quantize_model
from qcompile.recipes import list_recipes, load_recipe


def test_recipes_are_listed():
    names = {r.name for r in list_recipes()}
    assert {"int8_sq", "fp8_rowwise"} <= names
    sq = load_recipe("int8_sq")
    assert sq.needs_calibration and sq.rules[0].algorithm == "smoothquant" and sq.rules[0].alpha == 0.5
    fr = load_recipe("fp8_rowwise")
    assert not fr.needs_calibration and fr.rules[0].activation.granularity == "token"


def test_fp8_rowwise_portable_qdq_runs_in_ort_and_matches_the_plugin_graph(llama):
    qdq, result = quantize_model(llama.model, load_recipe("fp8_rowwise"), {})
    assert result.stats["InsertQDQPass.dynamic_activation_qdq"] == 9  # 15 GEMMs: q/k/v and gate/up share x
    q_nodes = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes and all({a.name for a in n.attribute} >= {"block_size", "output_dtype", "axis"} for n in q_nodes)
    plugin, fused = fuse_plugins(qdq)
    rows = layer_table(plugin)
    assert len(rows) == 15 and {(r.plugin, r.format, r.granularity) for r in rows} == {
        ("qcompile::DynamicScaledGemm", "fp8/fp8", "channel/token")}
    assert not any(n.op_type in ("QuantizeLinear", "ReduceMax") for n in plugin.graph.node)
    feeds = llama.random_inputs(np.random.default_rng(5), {"batch": 2, "seq": 12})
    want = ort_session(llama.model).run(None, feeds)[0]
    portable = ort_session(qdq).run(None, feeds)[0]
    bodies = ort_session(plugin).run(None, feeds)[0]
    ours = lower_onnx(plugin)(torch.from_numpy(feeds["input_ids"]))[0].numpy()
    np.testing.assert_array_equal(bodies, portable)  # the function body is the portable form, bit for bit
    np.testing.assert_allclose(ours, portable, rtol=1e-4, atol=1e-4 * np.abs(portable).max())
    cos = float((want * portable).sum() / np.linalg.norm(want) / np.linalg.norm(portable))
    assert cos > 0.995


@pytest.mark.slow
@pytest.mark.parametrize("recipe,kernel", [("int8_sq", "ScaledGemm"), ("fp8_rowwise", "DynamicScaledGemm")])
def test_cli_build_validates_and_runs(tmp_path, llama, capsys, recipe, kernel):
    calib = save_samples(tmp_path / "calib.npz", llama, 8, {"batch": 1, "seq": 32}, seed=5)
    engine = tmp_path / f"{recipe}.engine"
    code = main(["build", "tiny-llama", "--recipe", recipe, "--calib", str(calib), "-o", str(engine),
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "validation PASSED" in out and f"qcompile::{kernel}" in out
    report = json.loads((tmp_path / f"{recipe}.engine.validation.json").read_text())
    assert report["outputs"]["logits"]["cosine"] >= 0.99
    build = json.loads((tmp_path / f"{recipe}.engine.build.json").read_text())
    fused = [n for n in build["pass_notes"] if n.startswith("FuseAttentionPass")]  # the engine's attention, 2 layers
    assert len(fused) == 1 and "2 softmax attentions fused" in fused[0]
    notes = [n for n in build["pass_notes"] if n not in fused]
    if recipe == "int8_sq":
        groups = build["calibration"]["smoothquant"]
        assert len(groups) == 9 and sum(g["inverse_scale"] == "folded into the producer" for g in groups) == 7
        assert all("Reshape" in g["inverse_scale"] for g in groups if "o_proj" in str(g) or "linear_3" in str(g)
                   or "linear_10" in str(g))
        # SmoothQuant's fold summary: a pass note in the terminal summary and the report
        note = ("SmoothQuantPass: SmoothQuant: 9 groups (15 layers), 1/s folded into the producer for 7, an explicit "
                "Mul kept for 2 (layers.0.attn.o_proj, layers.1.attn.o_proj)")
        assert notes == [note]
        assert any(line.startswith("pass note") and line.endswith(note) for line in out.splitlines())
    else:
        assert build["calibration"] is None  # dynamic activations: nothing to calibrate
        assert notes == [] and not any(line.startswith("pass note") and "FuseAttentionPass" not in line
                                       for line in out.splitlines())
    inputs = tmp_path / "in.npz"
    assert main(["sample-inputs", "tiny-llama", "-o", str(inputs), "--dim", "batch=2", "--dim", "seq=8"]) == 0
    assert main(["run", str(engine), "--inputs", str(inputs)]) == 0
