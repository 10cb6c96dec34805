"""FoldAwqScalesPass: AWQ's Mul(x, 1/s) folded into the producer of x where exact, else kept and reported.

Each case builds `inp -> producer -> x -> {fc1, fc2}` (fc1/fc2 INT4 MatMuls whose input QuantizeWeightsInt4Pass
divides by s), folds, and checks the op types, `onnx.checker` and that ONNX Runtime (optimizations off) gives
the same outputs before and after the fold on fresh random inputs.
"""
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from passes_testlib import op_types, random, run

from qc_testutil import ort_session
from qcompile.passes import _graph as G
from qcompile.passes.fold_awq_scales import FoldAwqScalesPass
from qcompile.passes.pipeline import export_model
from qcompile.passes.quantize_weights_int4 import QuantizeWeightsInt4Pass
from qcompile.recipes.schema import Recipe

K = 64
WIDTH = {"y1": 48, "y2": 32, "y3": 16, "r": K, "x": K}  # the graph outputs' last dims


def _scales(seed):
    return np.exp(np.random.default_rng(seed).normal(0.0, 0.5, K)).astype(np.float32)


def _model(producer: list, inits: dict, opset=21, other_consumer=False, x_output=False):
    """inp [m, 64] -> producer nodes (ending in x [m, 64]) -> fc1 (N=48), fc2 (N=32) -> y1, y2."""
    rng = np.random.default_rng(0)
    inits = {**inits, "w1": rng.standard_normal((K, 48)), "w2": rng.standard_normal((K, 32))}
    nodes = producer + [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="fc1"),
                        helper.make_node("MatMul", ["x", "w2"], ["y2"], name="fc2")]
    outputs = ["y1", "y2"]
    if other_consumer:
        nodes.append(helper.make_node("Relu", ["x"], ["r"], name="other"))
        outputs.append("r")
    if x_output:
        outputs.append("x")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, ["m", K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["m", WIDTH[o]]) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    for node in graph.node:
        if node.name in ("fc1", "fc2"):
            node.metadata_props.add(key="qcompile.module", value=f"layers.0.{node.name}")
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _fold(model, scales: dict, int4=("fc1", "fc2")):
    """(model with the AWQ Muls, model after the fold, the fold's PassResult)."""
    weight = {"format": "int4", "granularity": "group", "group_size": 32}
    recipe = Recipe.from_dict({"name": "w4", "rules": [{"ops": ["MatMul"], "names": list(int4), "weight": weight}]})
    graph = G.import_model(model)
    QuantizeWeightsInt4Pass(recipe, None, scales).call(graph)
    before = export_model(graph, like=model)
    result = FoldAwqScalesPass().call(graph)
    return before, export_model(result.graph, like=model), result


def _same_function(before, after, check=True):
    for seed in (1, 2):
        inp = random((7, K), seed)
        want = run(before, inp=inp) if check else ort_session(before).run(None, {"inp": inp})
        got = run(after, inp=inp) if check else ort_session(after).run(None, {"inp": inp})
        for a, b in zip(want, got):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())  # float32 rounding only


def _awq_muls(model):
    return [n for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("/awq_scale")]


rng = np.random.default_rng(5)
FOLDABLE = {
    # name: (producer nodes, their initializers, opset, the producer's op types after the fold)
    "norm_weight_mul": ([helper.make_node("Relu", ["inp"], ["h"]), helper.make_node("Mul", ["h", "g"], ["x"])],
                        {"g": rng.uniform(0.5, 1.5, K)}, 21, ["Relu", "Mul"]),
    "scalar_mul": ([helper.make_node("Mul", ["c", "inp"], ["x"])], {"c": np.float32(0.7)}, 21, ["Mul"]),
    "layernorm": ([helper.make_node("LayerNormalization", ["inp", "g", "b"], ["x"])],
                  {"g": rng.uniform(0.5, 1.5, K), "b": rng.standard_normal(K)}, 21, ["LayerNormalization"]),
    "rmsnorm": ([helper.make_node("RMSNormalization", ["inp", "g"], ["x"])], {"g": rng.uniform(0.5, 1.5, K)}, 23,
                ["RMSNormalization"]),
    "matmul_bias": ([helper.make_node("MatMul", ["inp", "w0"], ["h"], name="prod"),
                     helper.make_node("Add", ["h", "b"], ["x"])],
                    {"w0": rng.standard_normal((K, K)), "b": rng.standard_normal(K)}, 21, ["MatMul", "Add"]),
    "gemm_transB": ([helper.make_node("Gemm", ["inp", "w0", "b"], ["x"], transB=1)],
                    {"w0": rng.standard_normal((K, K)), "b": rng.standard_normal(K)}, 21, ["Gemm"]),
}


@pytest.mark.parametrize("case", list(FOLDABLE))
def test_fold_removes_the_muls_and_keeps_the_function(case):
    nodes, inits, opset, producer_ops = FOLDABLE[case]
    s = _scales(0)
    before, after, result = _fold(_model(nodes, inits, opset), {"fc1": s, "fc2": s})
    assert len(_awq_muls(before)) == 2 and not _awq_muls(after)
    assert result.modified and dict(result.stats) == {"folded": 2} and not result.declined
    assert sorted(op_types(after)) == sorted(producer_ops + ["DequantizeLinear", "MatMul"] * 2)
    x = next(n for n in after.graph.node if n.name == "fc1").input[0]
    assert x == _awq_muls(before)[0].output[0]
    changed = {"x", "h"} if case == "matmul_bias" else {"x"}  # MatMul -> h -> Add -> x: both scaled
    assert not changed & {o for n in after.graph.node for o in n.output}  # changed values get new names
    for node in after.graph.node:
        if node.name == "prod":
            assert {p.key: p.value for p in node.metadata_props}["qcompile.rule"] == "awq_scale_folded"
    _same_function(before, after)


def test_fold_into_an_int4_producer_scales_its_dequantize_scales():
    nodes = [helper.make_node("MatMul", ["inp", "w0"], ["x"], name="prod")]
    s = _scales(1)
    before, after, result = _fold(_model(nodes, {"w0": rng.standard_normal((K, K))}),
                                  {"fc1": s, "fc2": s}, int4=("prod", "fc1", "fc2"))
    assert result.stats["folded"] == 2 and not _awq_muls(after)
    assert sorted(op_types(after)) == sorted(["DequantizeLinear", "MatMul"] * 3)
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    dq = after.graph.node[0]
    assert dq.input[0] in old  # the INT4 values are untouched, only the [K/g, N] scales change
    np.testing.assert_allclose(inits[dq.input[1]], old[before.graph.node[0].input[1]] / s[None, :], rtol=1e-6)
    _same_function(before, after)


# --------------------------------------------------------------------------- kept as a Mul, with the reason


KEPT = {
    "different_scales": (dict(nodes=FOLDABLE["norm_weight_mul"][0], inits=FOLDABLE["norm_weight_mul"][1]),
                         "different AWQ scales"),
    "other_consumer": (dict(nodes=FOLDABLE["norm_weight_mul"][0], inits=FOLDABLE["norm_weight_mul"][1],
                            other_consumer=True), "also read by Relu 'other'"),
    "graph_output": (dict(nodes=FOLDABLE["norm_weight_mul"][0], inits=FOLDABLE["norm_weight_mul"][1], x_output=True),
                     "'x' is a graph output"),
    "not_per_channel": (dict(nodes=[helper.make_node("Relu", ["inp"], ["x"], name="act")], inits={}),
                        "producer Relu 'act' cannot absorb"),
    "graph_input": (dict(nodes=[helper.make_node("Identity", ["inp"], ["x"], name="id")], inits={}),
                    "producer Identity 'id' cannot absorb"),
    "no_constant_operand": (dict(nodes=[helper.make_node("Mul", ["inp", "inp"], ["x"], name="sq")], inits={}),
                            "Mul 'sq' has no constant operand"),
    "wrong_channels": (dict(nodes=[helper.make_node("Mul", ["inp", "g"], ["x"], name="m")],
                            inits={"g": np.ones((K, 1))}), "not a float constant with 64 channels"),
}


@pytest.mark.parametrize("case", list(KEPT))
def test_unfoldable_muls_are_kept_and_reported(case, caplog):
    kwargs, reason = KEPT[case]
    s = _scales(2)
    scales = {"fc1": s, "fc2": _scales(3) if case == "different_scales" else s}
    model = _model(kwargs.pop("nodes"), kwargs.pop("inits"), **kwargs)
    with caplog.at_level(logging.INFO, logger="qcompile.passes.fold_awq_scales"):
        before, after, result = _fold(model, scales)
    assert not result.modified and dict(result.stats) == {"kept_as_mul": 2}
    assert [n for n, _ in result.declined] == [m.name for m in _awq_muls(before)]
    assert all(reason in r for _, r in result.declined), result.declined
    assert before.SerializeToString() == after.SerializeToString()
    assert "AWQ scales: 0 folded into previous ops, 2 kept as Mul (layers.0.fc1, layers.0.fc2)" in caplog.text
    assert result.notes == ["AWQ scales: 0 folded into previous ops, 2 kept as Mul (layers.0.fc1, layers.0.fc2)"]


def test_partial_fold_counts_both(caplog):
    """Two inputs: one foldable (a norm weight), one not (a Relu): 2 folded, 1 kept."""
    nodes = [helper.make_node("Mul", ["inp", "g"], ["x"]), helper.make_node("Relu", ["inp"], ["x3"], name="act"),
             helper.make_node("MatMul", ["x3", "w3"], ["y3"], name="fc3")]
    model = _model(nodes, {"g": rng.uniform(0.5, 1.5, K), "w3": rng.standard_normal((K, 16))})
    model.graph.output.append(helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["m", 16]))
    s = _scales(4)
    with caplog.at_level(logging.INFO, logger="qcompile.passes.fold_awq_scales"):
        before, after, result = _fold(model, {"fc1": s, "fc2": s, "fc3": _scales(5)}, int4=("fc1", "fc2", "fc3"))
    assert dict(result.stats) == {"folded": 2, "kept_as_mul": 1}
    assert [m.name for m in _awq_muls(after)] == ["fc3/awq_scale"]
    assert "AWQ scales: 2 folded into previous ops, 1 kept as Mul (fc3)" in caplog.text
    assert result.notes == ["AWQ scales: 2 folded into previous ops, 1 kept as Mul (fc3)"]  # the build summary's line
    _same_function(before, after)


def test_no_awq_muls_is_a_no_op():
    model = _model(*FOLDABLE["norm_weight_mul"][:2])
    before, after, result = _fold(model, {})
    assert not result.modified and not result.stats and not result.declined
    onnx.checker.check_model(after, full_check=True)
