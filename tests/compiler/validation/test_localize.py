"""Per-layer error localization (`qcompile.validation.localize`) on CPU.

The quantized graphs come from the real pipeline pieces (calibrate -> quantize_model -> fuse_plugins), without
the engine compile. A sabotaged layer (activation scale divided by 50, as a bad calibration would do) must be
ranked first; the local error is checked against an independent float64 numpy computation; the graph splice
must give a valid model, and reverting every layer must give back the FP graph's outputs.
"""
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qc_testutil import cosine

from qcompile.calibration import calibrate, load_calibration_data
from qcompile.lowering import lower_onnx
from qcompile.passes import activation_tensors, fuse_plugins, plan_quantization, quantize_model
from qcompile.recipes import load_recipe
from qcompile.validation.localize import (LayerError, NotRevertibleError, format_layer_table, localize_layers,
                                          revert_layer)

pytestmark = pytest.mark.slow


def quantize(model: onnx.ModelProto, amax: dict[str, float]) -> onnx.ModelProto:
    return fuse_plugins(quantize_model(model, load_recipe("int8"), amax)[0])[0]


def plugin_nodes(model):
    return [n for n in model.graph.node if n.domain == "qcompile" and n.op_type == "ScaledGemm"]


def node_of_module(model, module: str) -> onnx.NodeProto:
    return next(n for n in plugin_nodes(model)
                if any(p.key == "qcompile.module" and p.value == module for p in n.metadata_props))


def initializer_array(model, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def run_outputs(model, feed):
    outputs, _ = lower_onnx(model).run({k: torch.from_numpy(v) for k, v in feed.items()})
    return {k: v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def llama(export_builtins_once):
    """(FP32 model, int8 plugin model, 2 feeds) for tiny-llama, calibrated on seeded random data."""
    recipe = load_recipe("int8")
    src = export_builtins_once("tiny-llama", opset=recipe.opset)
    tensors = activation_tensors(plan_quantization(src.model, recipe))
    data = load_calibration_data("random", src.inputs, source=src)
    amax = calibrate(src.model, tensors, data, recipe.calibration).amax
    rng = np.random.default_rng(7)
    feeds = [src.random_inputs(rng, {"batch": 2, "seq": 16}) for _ in range(2)]
    return src.model, quantize(src.model, amax), feeds


@pytest.fixture(scope="module")
def clean_rows(llama):
    reference, quantized, feeds = llama
    calls = []
    rows = localize_layers(reference, quantized, feeds, progress=lambda done, total: calls.append((done, total)))
    return rows, calls


# --------------------------------------------------------------------------- un-sabotaged model


def test_clean_model_rows(llama, clean_rows):
    _, quantized, _ = llama
    rows, calls = clean_rows
    nodes = plugin_nodes(quantized)
    assert sorted(r.node for r in rows) == sorted(n.name for n in nodes) and len(rows) == 15
    assert [r.rank for r in rows] == list(range(1, 16))
    assert calls == [(i, 15) for i in range(1, 16)]
    contributions = [r.contribution_db for r in rows]
    assert contributions == sorted(contributions, reverse=True)
    base = rows[0].reverted_sqnr_db - rows[0].contribution_db  # the all-quantized output SQNR
    for r in rows:
        assert r.revertible and r.format == "int8/int8" and r.module.startswith(("layers.", "lm_head"))
        assert r.local_cosine >= 0.99, r
        assert r.clip_rate < 0.01, r
        assert 0 < r.w_scale_min <= r.w_scale_max and r.x_scale > 0
        assert r.reverted_sqnr_db >= base - 0.5, r  # reverting a layer never makes the output much worse
        assert r.reverted_sqnr_db - r.contribution_db == pytest.approx(base, abs=1e-9)
        assert set(r.to_dict()) >= {"node", "module", "format", "local_cosine", "local_sqnr_db", "local_max_abs",
                                    "clip_rate", "x_scale", "w_scale_min", "w_scale_max", "reverted_cosine",
                                    "reverted_sqnr_db", "contribution_db", "rank"}


def test_local_error_matches_numpy_float64(llama, clean_rows):
    """The local cosine of one layer, recomputed in float64 numpy from the FP x it sees."""
    reference, quantized, feeds = llama
    node = node_of_module(quantized, "layers.0.mlp.down_proj")
    x_name, y_name = node.input[0], node.output[0]
    s = float(initializer_array(quantized, node.input[1]).reshape(()))
    w_q = initializer_array(quantized, node.input[3]).astype(np.int64)
    w_scale = initializer_array(quantized, node.input[4]).astype(np.float64)
    bias = initializer_array(quantized, node.input[5]).astype(np.float64)
    program = lower_onnx(reference)
    cosines, clipped, total = [], 0, 0
    for feed in feeds:
        _, cap = program.run({k: torch.from_numpy(v) for k, v in feed.items()}, capture=[x_name, y_name])
        x, y = cap[x_name].numpy().astype(np.float64), cap[y_name].numpy().astype(np.float64)
        xq = np.clip(np.rint(x / s), -128, 127).astype(np.int64)
        y_q = (xq @ w_q.T).astype(np.float64) * (s * w_scale) + bias
        cosines.append(cosine(y, y_q))
        clipped += int((np.abs(x / s) > 127).sum())
        total += x.size
    row = next(r for r in clean_rows[0] if r.node == node.name)
    assert row.local_cosine == pytest.approx(min(cosines), abs=1e-6)
    assert row.clip_rate == pytest.approx(clipped / total, abs=1e-9)
    assert row.x_scale == pytest.approx(s, rel=1e-7)


def test_format_layer_table(clean_rows):
    rows = clean_rows[0]
    text = format_layer_table(rows, top=3)
    assert text == format_layer_table([r.to_dict() for r in rows], top=3)  # rows or their dicts (JSON reports)
    lines = text.splitlines()
    assert "top 3 of 15" in lines[0]
    for header in ("rank", "node", "module", "format", "local cos", "local SQNR dB", "clip %", "x_scale",
                   "contribution dB"):
        assert header in lines[1]
    assert len(lines) == 3 + 3  # title, header, rule, 3 rows
    assert [line.split()[:2] for line in lines[3:]] == [[str(r.rank), r.node] for r in rows[:3]]


# --------------------------------------------------------------------------- sabotage


@pytest.mark.parametrize("module", ["layers.0.mlp.up_proj", "layers.1.attn.v_proj"])
def test_sabotaged_layer_is_ranked_first(llama, module):
    reference, quantized, feeds = llama
    sabotaged = onnx.ModelProto()
    sabotaged.CopyFrom(quantized)
    node = node_of_module(sabotaged, module)
    init = next(t for t in sabotaged.graph.initializer if t.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) / 50).astype(np.float32), init.name))

    rows = localize_layers(reference, sabotaged, feeds)
    worst, others = rows[0], rows[1:]
    assert worst.node == node.name and worst.module == module and worst.rank == 1
    assert worst.clip_rate > 0.3
    assert worst.local_cosine < min(r.local_cosine for r in others) - 0.02
    assert worst.contribution_db > max(r.contribution_db for r in others) + 3


# --------------------------------------------------------------------------- the splice


def test_revert_one_layer_is_a_valid_model(llama):
    reference, quantized, feeds = llama
    before = quantized.SerializeToString()
    node = node_of_module(quantized, "layers.0.mlp.up_proj")
    variant = revert_layer(quantized, reference, node.name)
    assert quantized.SerializeToString() == before  # the input is not modified
    onnx.checker.check_model(variant, full_check=True)
    assert node.name not in {n.name for n in plugin_nodes(variant)}
    assert len(plugin_nodes(variant)) == len(plugin_nodes(quantized)) - 1
    fp_node = next(n for n in variant.graph.node if n.output[0] == node.output[0])
    assert fp_node.op_type == "MatMul" and fp_node.input[0] == node.input[0]
    names = {t.name for t in variant.graph.initializer}
    assert not names & set(node.input[1:])  # the plugin's constants are dropped
    assert len(names) == len(variant.graph.initializer)


def test_reverting_every_layer_gives_the_fp_outputs(llama):
    reference, quantized, feeds = llama
    model = quantized
    for node in plugin_nodes(quantized):
        model = revert_layer(model, reference, node.name)
    onnx.checker.check_model(model, full_check=True)
    assert not plugin_nodes(model)
    for feed in feeds:
        expected, actual = run_outputs(reference, feed), run_outputs(model, feed)
        assert expected.keys() == actual.keys()
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- a small hand-made graph


@pytest.fixture(scope="module")
def small():
    """x -> MatMul(W1) + b1 -> Relu -> Gemm(W2, b2, transB=1) -> y: a MatMul+bias Add layer and a Gemm layer."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("W1", rng.standard_normal((16, 32)) * 0.2), ("b1", rng.standard_normal(32)),
        ("W2", rng.standard_normal((24, 32)) * 0.2), ("b2", rng.standard_normal(24))]]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["mm1"], name="mm1"),
             helper.make_node("Add", ["mm1", "b1"], ["h"], name="add1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="gemm", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(2)]
    tensors = activation_tensors(plan_quantization(model, load_recipe("int8")))
    program = lower_onnx(model)
    amax = {}
    for feed in feeds:
        _, cap = program.run({"x": torch.from_numpy(feed["x"])}, capture=tensors)
        for t in tensors:
            amax[t] = max(amax.get(t, 0.0), float(cap[t].abs().max()))
    quantized = quantize(model, amax)
    assert sorted(n.name for n in plugin_nodes(quantized)) == ["gemm", "mm1"]
    return model, quantized, feeds


def test_small_graph_splice_with_bias_and_gemm(small):
    reference, quantized, feeds = small
    variant = revert_layer(quantized, reference, "mm1")
    onnx.checker.check_model(variant, full_check=True)
    assert [n.op_type for n in variant.graph.node if n.output[0] in ("mm1", "h")] == ["MatMul", "Add"]
    model = revert_layer(variant, reference, "gemm")
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Relu", "Gemm"]
    for feed in feeds:
        np.testing.assert_allclose(run_outputs(model, feed)["y"], run_outputs(reference, feed)["y"],
                                   rtol=1e-6, atol=1e-6)


def test_name_clash_with_quantized_initializer_is_renamed(small):
    reference, quantized, _ = small
    clashing = onnx.ModelProto()
    clashing.CopyFrom(quantized)
    other = numpy_helper.from_array(np.ones(3, np.float32), "W1")  # a different tensor named like the FP weight
    clashing.graph.initializer.append(other)
    clashing.graph.node.append(helper.make_node("Identity", ["W1"], ["w1_copy"], name="keep_w1"))
    clashing.graph.output.append(helper.make_tensor_value_info("w1_copy", TensorProto.FLOAT, [3]))
    variant = revert_layer(clashing, reference, "mm1")
    onnx.checker.check_model(variant, full_check=True)
    matmul = next(n for n in variant.graph.node if n.op_type == "MatMul")
    assert matmul.input[1] != "W1"
    weights = {t.name: numpy_helper.to_array(t) for t in variant.graph.initializer}
    np.testing.assert_array_equal(weights[matmul.input[1]], numpy_helper.to_array(reference.graph.initializer[0]))
    np.testing.assert_array_equal(weights["W1"], np.ones(3, np.float32))


def test_layer_without_fp_subgraph_is_not_revertible(small):
    reference, quantized, feeds = small
    renamed = onnx.ModelProto()
    renamed.CopyFrom(reference)
    for node in renamed.graph.node:  # the FP graph no longer has a tensor "h" (the mm1 layer's output)
        node.input[:] = ["h_renamed" if i == "h" else i for i in node.input]
        node.output[:] = ["h_renamed" if o == "h" else o for o in node.output]
    with pytest.raises(NotRevertibleError, match="'h'"):
        revert_layer(quantized, renamed, "mm1")

    rows = localize_layers(renamed, quantized, feeds)
    assert [r.node for r in rows] == ["gemm", "mm1"]
    bad = rows[-1]
    assert isinstance(bad, LayerError) and bad.rank == 2 and not bad.revertible
    assert bad.contribution_db is None and bad.reverted_sqnr_db is None and bad.local_cosine is None
    assert "h" in bad.note
    assert rows[0].revertible and rows[0].contribution_db is not None and rows[0].local_cosine > 0.99
    assert "-" in format_layer_table(rows).splitlines()[-1]

    extra_input = onnx.ModelProto()  # y of mm1 depends on a graph input other than x
    extra_input.CopyFrom(reference)
    b1 = next(t for t in extra_input.graph.initializer if t.name == "b1")
    extra_input.graph.initializer.remove(b1)
    extra_input.graph.input.append(helper.make_tensor_value_info("b1", TensorProto.FLOAT, [32]))
    with pytest.raises(NotRevertibleError, match="graph input 'b1'"):
        revert_layer(quantized, extra_input, "mm1")


def test_unknown_node_and_no_feeds_are_errors(small):
    from qcompile.errors import ValidationError

    reference, quantized, feeds = small
    with pytest.raises(ValidationError, match="no plugin node .*named 'nope'"):
        revert_layer(quantized, reference, "nope")
    with pytest.raises(ValidationError, match="at least one input feed"):
        localize_layers(reference, quantized, [])
    assert math.isfinite(localize_layers(reference, quantized, feeds[:1])[0].local_sqnr_db)
