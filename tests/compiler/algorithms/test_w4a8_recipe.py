"""The w4a8_awq recipe (INT4 AWQ weights, FP8 E4M3 activations) end to end on tiny-llama: the portable Q/DQ ONNX
(TensorRT's explicit-quantization form) runs in ONNX Runtime and agrees with the fused plugin graph, AWQ layers'
FP8 scales are the max of their scaled inputs x / s, per-token dynamic FP8 works too, and
`qcompile build --recipe w4a8_awq` builds, validates and runs."""
import json

import numpy as np
import onnx
import pytest
import torch

from qc_testutil import cosine, ort_session
from qcompile.algorithms.plan import awq_input_amax, observers_for, plan_int4_jobs
from qcompile.calibration import calibrate, load_calibration_data
from qcompile.calibration.observers import ChannelMaxObserver
from qcompile.cli import main
from qcompile.layers import layer_table
from qcompile.lowering import lower_onnx
from qcompile.passes import activation_tensors, fuse_plugins, plan_quantization, quantize_model
from qcompile.recipes import Recipe, load_recipe
from qcompile.recipes.schema import QuantSpec
from qcompile.validation.metrics import compare_arrays

pytestmark = pytest.mark.slow
DYNAMIC = QuantSpec("fp8", "token", mode="dynamic")


def _with_activation(recipe: Recipe, spec: QuantSpec) -> Recipe:
    import dataclasses

    return dataclasses.replace(recipe, rules=tuple(dataclasses.replace(r, activation=spec) for r in recipe.rules))


def _quantize(llama, calib, recipe, awq):
    """The pipeline's calibrate + quantize stages for a w4a8 recipe. The AWQ weights and scales are `awq`'s, the
    shared w4a16_awq search: the same layers, data, group size and symmetry (checked), so the same search; only
    the activations (the FP8 tensors, and AWQ layers' per-channel maxima of x) are calibrated here."""
    tensors = activation_tensors(plan_quantization(llama.model, recipe))
    jobs = plan_int4_jobs(llama.model, recipe)
    same = lambda js: [(j.node, j.algorithm, j.x, j.group_size, j.symmetric) for j in js]  # noqa: E731
    assert same(jobs) == same(awq["jobs"])
    watch = {x: [o for o in observers if isinstance(o, ChannelMaxObserver)]
             for x, observers in observers_for(jobs).items()}
    watch = {x: observers for x, observers in watch.items() if observers}
    amax = {}
    if tensors or watch:
        data = load_calibration_data(str(calib), llama.inputs)
        amax = calibrate(llama.model, tensors, data, recipe.calibration, extra_observers=watch).amax
    weights, scales = awq["weights"], awq["scales"]
    input_amax = awq_input_amax(jobs, watch, scales)
    qdq, result = quantize_model(llama.model, recipe, amax, weights, scales, input_amax)
    return {"qdq": qdq, "plugin": fuse_plugins(qdq)[0], "result": result, "tensors": tensors,
            "input_amax": input_amax}


@pytest.fixture(scope="module")
def calib(w4_calib):
    return w4_calib  # the shared INT4 calibration data (32 samples, batch 1, seq 64)


@pytest.fixture(scope="module")
def quantized(llama, calib, w4a16_awq):
    w4a8 = load_recipe("w4a8_awq")
    return {"w4a8_awq": _quantize(llama, calib, w4a8, w4a16_awq),
            "w4a8_awq_dynamic": _quantize(llama, calib, _with_activation(w4a8, DYNAMIC), w4a16_awq),
            "w4a16_awq": {"plugin": w4a16_awq["plugin"]}}  # the shared w4a16_awq quantization, same data


@pytest.fixture(scope="module")
def feeds(llama):
    return llama.random_inputs(np.random.default_rng(77), {"batch": 4, "seq": 32})  # not the calibration data


def _ours(model, feeds):
    return lower_onnx(model)(torch.from_numpy(feeds["input_ids"]))[0].numpy()


def _plugins(model, act_quant):
    nodes = [n for n in model.graph.node if n.domain == "qcompile"]
    assert nodes and all(n.op_type == "Int4GroupwiseGemm" for n in nodes)
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["act_quant"] == act_quant.encode()
               for n in nodes)
    # the layer table shows the FP8 activations (per tensor when static, per token when dynamic)
    granularity = {"fp8_static": "tensor", "fp8_dynamic": "token"}[act_quant]
    assert {(r.format, r.granularity) for r in layer_table(model)} == {("int4/fp8", f"group128/{granularity}")}
    return nodes


def test_recipe_is_listed_and_accuracy_is_close_to_w4a16(llama, quantized, feeds, capsys):
    assert main(["recipes"]) == 0
    assert "w4a8_awq" in capsys.readouterr().out
    want = ort_session(llama.model).run(None, feeds)[0]
    metrics = {name: compare_arrays(want, _ours(q["plugin"], feeds)) for name, q in quantized.items()}
    for name in ("w4a8_awq", "w4a8_awq_dynamic"):
        assert metrics[name]["cosine"] >= load_recipe("w4a8_awq").validation.min_cosine, metrics
        # FP8 E4M3 activations cost little next to the 4-bit weights (measured: about -0.3 dB, static and dynamic)
        assert metrics[name]["sqnr_db"] > metrics["w4a16_awq"]["sqnr_db"] - 1.0, metrics


def test_portable_qdq_is_tensorrt_form_and_runs_in_ort(llama, quantized, feeds):
    q = quantized["w4a8_awq"]
    fp_tensors = {o for n in llama.model.graph.node for o in n.output}
    qdq, plugin = q["qdq"], q["plugin"]
    onnx.checker.check_model(qdq, full_check=True)
    producers = {o: n for n in qdq.graph.node for o in n.output}
    inits = {t.name: t for t in qdq.graph.initializer}
    gemms = [n for n in qdq.graph.node if n.op_type == "MatMul" and producers.get(n.input[1]) is not None
             and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert len(gemms) == 12
    for mm in gemms:
        x_dq, w_dq = producers[mm.input[0]], producers[mm.input[1]]
        x_q = producers[x_dq.input[0]]
        assert x_dq.op_type == "DequantizeLinear" and x_q.op_type == "QuantizeLinear"
        assert inits[x_q.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN  # E4M3 zero point
        assert np.prod(inits[x_q.input[1]].dims) == 1 and x_q.input[1] == x_dq.input[1]  # one per-tensor scale
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT4
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in w_dq.attribute}
        assert attrs == {"axis": 0, "block_size": 128}
        assert x_q.input[0] not in fp_tensors  # the FP8 quantizer reads AWQ's x / s, not the FP graph's x
    _plugins(plugin, "fp8_static")
    ort_qdq = ort_session(qdq).run(None, feeds)[0]
    ort_plugin = ort_session(plugin).run(None, feeds)[0]  # the plugin nodes' function bodies
    np.testing.assert_allclose(ort_plugin, ort_qdq, rtol=1e-5, atol=1e-5)
    # our lowering (the engine's program): FP8 rounding flips where upstream float math differs in the last bit
    assert cosine(_ours(plugin, feeds), ort_qdq) > 0.9999


def test_awq_layer_scales_are_the_max_of_the_scaled_input(llama, calib, quantized):
    """First-layer q/k/v (one AWQ scale, folded into the norm, one shared FP8 Q/DQ): their x / s depends on no
    quantized op, so the FP8 scale must be max|x / s| / 448 over the calibration data, measured here directly
    on the Q/DQ graph."""
    q = quantized["w4a8_awq"]
    qdq, input_amax, stats = q["qdq"], q["input_amax"], q["result"].stats
    assert len(input_amax) == 12 and stats["InsertQDQPass.quantized_nodes"] == 12
    assert stats["InsertQDQPass.activation_qdq"] + stats.get("InsertQDQPass.shared_activation_qdq", 0) == 12
    consumers = {}
    for n in qdq.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    modules = lambda t: {dict((p.key, p.value) for p in n.metadata_props).get("qcompile.module", "")  # noqa: E731
                         for dq in consumers[t] for n in consumers[dq.output[0]]}
    qkv = {f"layers.0.attn.{p}_proj" for p in "qkv"}
    first = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and modules(n.output[0]) <= qkv]
    assert first and set().union(*(modules(n.output[0]) for n in first)) == qkv
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    data = load_calibration_data(str(calib), llama.inputs)
    measured = calibrate(qdq, [n.input[0] for n in first], data, load_recipe("w4a8_awq").calibration).amax
    for qn in first:
        np.testing.assert_allclose(float(inits[qn.input[1]].reshape(-1)[0]) * 448, measured[qn.input[0]], rtol=1e-5)


def test_dynamic_per_token_form(quantized, feeds):
    q = quantized["w4a8_awq_dynamic"]
    assert q["tensors"] == [] and q["input_amax"] == {}  # nothing to calibrate for the activations
    assert q["result"].stats["InsertQDQPass.quantized_nodes"] == 12
    qdq = q["qdq"]
    onnx.checker.check_model(qdq, full_check=True)
    quant = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quant) == q["result"].stats["InsertQDQPass.dynamic_activation_qdq"] and all(
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["output_dtype"]
        == onnx.TensorProto.FLOAT8E4M3FN for n in quant)
    _plugins(q["plugin"], "fp8_dynamic")
    ort_qdq = ort_session(qdq).run(None, feeds)[0]
    np.testing.assert_allclose(ort_session(q["plugin"]).run(None, feeds)[0], ort_qdq, rtol=1e-5, atol=1e-5)
    assert cosine(_ours(q["plugin"], feeds), ort_qdq) > 0.9999


def test_cli_build_validates_and_runs(tmp_path, calib, capsys):
    engine = tmp_path / "w4a8.engine"
    code = main(["build", "tiny-llama", "--recipe", "w4a8_awq", "--calib", str(calib), "-o", str(engine),
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "validation PASSED" in out and "Int4GroupwiseGemm" in out and "int4/fp8" in out
    report = json.loads((tmp_path / "w4a8.engine.validation.json").read_text())
    assert report["outputs"]["logits"]["cosine"] >= 0.98
    inputs = tmp_path / "in.npz"
    assert main(["sample-inputs", "tiny-llama", "-o", str(inputs), "--dim", "batch=2", "--dim", "seq=8"]) == 0
    assert main(["run", str(engine), "--inputs", str(inputs)]) == 0
