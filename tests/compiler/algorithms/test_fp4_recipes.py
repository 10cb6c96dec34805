"""The FP4 recipes end to end on tiny-llama: each recipe's portable ONNX has TensorRT's FP4 form, its plugin graph
agrees with the FP32 model, and `qcompile build --recipe nvfp4` (W4A4, the full path: calibration, activation
quantization, plugin, AOTInductor) builds, validates and runs on CPU."""
import json
import re

import numpy as np
import pytest
import torch

from qc_testutil import ort_session, save_samples
from qcompile.calibration import calibrate, load_calibration_data
from qcompile.cli import main
from qcompile.lowering import lower_onnx
from qcompile.passes import fuse_plugins, quantize_model
from qcompile.passes.quantize_weights_fp4 import fp4_activation_tensors
from qcompile.recipes import load_recipe
from qcompile.validation.metrics import compare_arrays

pytestmark = pytest.mark.slow

PLUGIN = {"nvfp4": "Fp4GemmW4A4", "w4a16_nvfp4": "Fp4Gemm", "mxfp4": "Fp4Gemm"}


@pytest.fixture(scope="module")
def calib(tmp_path_factory, llama):
    return save_samples(tmp_path_factory.mktemp("fp4") / "calib.npz", llama, 4, {"batch": 1, "seq": 32}, seed=5)


@pytest.mark.parametrize("name", list(PLUGIN))
def test_recipe_graphs(llama, calib, name):
    recipe = load_recipe(name)
    tensors = fp4_activation_tensors(llama.model, recipe)
    amax = {}
    if tensors:
        amax = calibrate(llama.model, tensors, load_calibration_data(str(calib), llama.inputs), recipe.calibration).amax
    qdq, result = quantize_model(llama.model, recipe, amax)
    ops = {(n.domain, n.op_type) for n in qdq.graph.node}
    assert ("", "DequantizeLinear") in ops and not any("FP4QDQ" in op for _, op in ops)
    assert (("trt", "TRT_FP4DynamicQuantize") in ops) == (name == "nvfp4")
    assert max(o.version for o in qdq.opset_import if o.domain == "") >= 23
    plugin, _ = fuse_plugins(qdq)
    fused = [n for n in plugin.graph.node if n.domain == "qcompile"]
    assert fused and all(n.op_type == PLUGIN[name] for n in fused)
    assert not any("lm_head" in n.name for n in fused)
    feeds = llama.random_inputs(np.random.default_rng(77), {"batch": 2, "seq": 16})
    want = ort_session(llama.model).run(None, feeds)[0]
    got = lower_onnx(plugin)(torch.from_numpy(feeds["input_ids"]))[0].numpy()
    assert compare_arrays(want, got)["cosine"] >= recipe.validation.min_cosine


def test_cli_build_nvfp4_validates_and_runs(tmp_path, calib, capsys):
    engine = tmp_path / "fp4.engine"
    code = main(["build", "tiny-llama", "--recipe", "nvfp4", "--calib", str(calib), "-o", str(engine),
                 "--device", "cpu", "--emit-onnx", str(tmp_path / "fp4.onnx")])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "validation PASSED" in out
    report = json.loads((tmp_path / "fp4.engine.validation.json").read_text())
    assert report["outputs"]["logits"]["cosine"] >= 0.95
    inputs = tmp_path / "in.npz"
    assert main(["sample-inputs", "tiny-llama", "-o", str(inputs), "--dim", "batch=2", "--dim", "seq=8"]) == 0
    assert main(["run", str(engine), "--inputs", str(inputs)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(engine)]) == 0
    assert re.search(r"FP4 weights +uint8 bytes, two codes each", capsys.readouterr().out)  # a CPU engine's layout
