"""Per-layer localization of INT4 plugin layers (`qcompile::Int4GroupwiseGemm`).

A w4a16_rtn tiny-llama engine is built through the real pipeline with one INT4 layer sabotaged (its group
scales times 3, in the plugin graph that is compiled and stored in the engine); `qcompile validate --per-layer`
must rank it first. On a w4a16_awq graph, whose AWQ scales are partly folded into the RMSNorm weights and partly
kept as Muls, every layer must be analysed from its FP input and reverting every layer gives the FP outputs.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qcompile
import qcompile.passes
from qcompile.cli import main
from qcompile.lowering import lower_onnx
from qcompile.validation.localize import localize_layers, revert_layer

pytestmark = pytest.mark.slow

SABOTAGED = "layers.0.mlp.up_proj"


def int4_nodes(model):
    return [n for n in model.graph.node if n.domain == "qcompile" and n.op_type == "Int4GroupwiseGemm"]


def module(node):
    return next((p.value for p in node.metadata_props if p.key == "qcompile.module"), None)


def _sabotage(model):
    """Multiply the group scales of SABOTAGED's INT4 weight by 3 (in place)."""
    node = next(n for n in int4_nodes(model) if module(n) == SABOTAGED)
    init = next(t for t in model.graph.initializer if t.name == node.input[2])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(3), init.name))
    return node.name


def test_validate_per_layer_ranks_a_sabotaged_int4_layer_first(tmp_path, monkeypatch):
    sabotaged = []
    real_fuse = qcompile.passes.fuse_plugins

    def fuse_and_sabotage(model, **kwargs):
        fused, result = real_fuse(model, **kwargs)
        sabotaged.append(_sabotage(fused))
        return fused, result

    monkeypatch.setattr(qcompile.passes, "fuse_plugins", fuse_and_sabotage)
    engine = tmp_path / "w4.engine"
    result = qcompile.build("tiny-llama", "w4a16_rtn", output=engine, device="cpu", progress_stream=None)
    monkeypatch.undo()
    assert len(sabotaged) == 1 and len(int4_nodes(result.plugin_model)) == 12

    code = main(["validate", str(engine), "--per-layer", "--min-cosine", "0", "--min-sqnr-db", "-100",
                 "--min-top1", "0"])
    assert code == 0
    rows = json.loads((tmp_path / "w4.engine.validation.json").read_text())["layers"]
    assert len(rows) == 12 and all(r["format"] == "int4/fp16" and r["revertible"] for r in rows)
    worst, others = rows[0], rows[1:]
    assert worst["node"] == sabotaged[0] and worst["module"] == SABOTAGED and worst["rank"] == 1
    assert worst["local_sqnr_db"] < min(r["local_sqnr_db"] for r in others) - 10
    assert worst["contribution_db"] > max(r["contribution_db"] for r in others) + 3
    assert all(r["clip_rate"] is None and r["x_scale"] is None for r in rows)  # weight-only: no activation scale
    assert all(0 < r["w_scale_min"] <= r["w_scale_max"] for r in rows)


@pytest.fixture(scope="module")
def awq(llama, graph_builds):
    """(FP model, w4a16_awq plugin model, 2 feeds), AWQ calibrated on seeded random data (the shared graph-level
    build: export, calibrate, quantize_model, fuse_plugins; no engine)."""
    plugin = graph_builds("w4a16_awq").plugin_model
    rng = np.random.default_rng(9)
    return llama.model, plugin, [llama.random_inputs(rng, {"batch": 2, "seq": 16}) for _ in range(2)]


def test_awq_layers_folded_or_not_are_analysed_from_their_fp_input(awq):
    reference, plugin, feeds = awq
    muls = [n for n in plugin.graph.node if n.op_type == "Mul" and n.name.endswith("/awq_scale")]
    assert len(muls) == 2  # o_proj's scales stay a Mul, the others are folded into the RMSNorm weights
    rows = localize_layers(reference, plugin, feeds)
    assert len(rows) == 12 and all(r.revertible and r.local_sqnr_db is not None for r in rows), rows
    assert all(r.local_cosine > 0.99 for r in rows), [(r.module, r.local_cosine) for r in rows]

    model = plugin
    for node in int4_nodes(plugin):
        model = revert_layer(model, reference, node.name)
    onnx.checker.check_model(model, full_check=True)
    assert not int4_nodes(model) and not [n for n in model.graph.node if n.name.endswith("/awq_scale")]
    for feed in feeds:
        want, _ = lower_onnx(reference).run({k: torch.from_numpy(v) for k, v in feed.items()})
        got, _ = lower_onnx(model).run({k: torch.from_numpy(v) for k, v in feed.items()})
        for name in want:
            np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-4, atol=1e-4)
