"""The w8a16 and fp8_block recipes on tiny-llama: their portable Q/DQ graphs run in ONNX Runtime and agree with the
plugin graphs our lowering runs; the layer table; `qcompile build` builds, validates and runs (slow)."""
import json

import numpy as np
import pytest
import torch

from qc_testutil import ort_session
from qcompile.cli import main
from qcompile.layers import layer_table
from qcompile.lowering import lower_onnx
from qcompile.passes import fuse_plugins, quantize_model
from qcompile.recipes import list_recipes, load_recipe
from qcompile.validation.metrics import compare_arrays

PLUGIN = {"w8a16": "Int8WeightOnlyGemm", "fp8_block": "Fp8BlockGemm"}


@pytest.fixture(scope="module")
def quantized(llama):
    out = {}
    for name in PLUGIN:
        qdq, result = quantize_model(llama.model, load_recipe(name), {})
        out[name] = (qdq, fuse_plugins(qdq)[0], result)
    return out


def test_recipes_are_listed():
    names = [r if isinstance(r, str) else r.name for r in list_recipes()]
    assert set(PLUGIN) <= set(names)


@pytest.mark.parametrize("name, layers, tol", [("w8a16", 14, 1e-4), ("fp8_block", 8, 2e-2)])
def test_portable_qdq_runs_in_ort_and_agrees_with_the_plugin_graph(llama, quantized, name, layers, tol):
    qdq, plugin, _ = quantized[name]
    rows = layer_table(plugin)
    assert len(rows) == layers and all(r.plugin == f"qcompile::{PLUGIN[name]}" for r in rows)
    assert not any("lm_head" in r.module for r in rows) and all(r.bytes_after < r.bytes_before / 3 for r in rows)
    feeds = llama.random_inputs(np.random.default_rng(3), {"batch": 2, "seq": 20})
    fp = ort_session(llama.model).run(None, feeds)[0]
    ort_qdq = ort_session(qdq).run(None, feeds)[0]
    ours = lower_onnx(plugin)(torch.from_numpy(feeds["input_ids"]))[0].numpy()
    np.testing.assert_allclose(ours, ort_qdq, rtol=tol, atol=tol * np.abs(ort_qdq).max())
    assert compare_arrays(fp, ours)["cosine"] > 0.995  # quantized, but close to the FP32 graph


def test_fp8_block_declines_layers_without_128_multiples(quantized):
    _, _, result = quantized["fp8_block"]
    reasons = [r for _, r in result.declined if r.startswith("QuantizeFp8BlockPass")]
    assert sum("not a multiple of 128" in r for r in reasons) == 6  # gate/up (N=688) and down (K=688), 2 layers


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLUGIN))
def test_cli_build_validates_and_runs(tmp_path, capsys, name):
    engine = tmp_path / f"{name}.engine"
    code = main(["build", "tiny-llama", "--recipe", name, "-o", str(engine), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "validation PASSED" in out and PLUGIN[name] in out
    report = json.loads((tmp_path / f"{name}.engine.validation.json").read_text())
    assert report["outputs"]["logits"]["cosine"] >= 0.99
    inputs = tmp_path / "in.npz"
    assert main(["sample-inputs", "tiny-llama", "-o", str(inputs), "--dim", "batch=2", "--dim", "seq=8"]) == 0
    assert main(["run", str(engine), "--inputs", str(inputs)]) == 0
