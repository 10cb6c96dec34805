"""SmoothQuantPass: the smoothed FP graph equals the original (ONNX Runtime, fresh random inputs), 1/s lands in
the RMSNorm weight, LayerNormalization, a previous linear layer or SwiGLU's up projection, and an explicit
Mul stays (declined with the reason) where nothing can absorb it."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qc_testutil import ort_session
from qcompile.passes import PassManager, export_model, import_model
from qcompile.passes.smooth_quant import SmoothQuantPass, smoothing_groups
from qcompile.recipes import Recipe

K, N = 32, 24
RECIPE = Recipe.from_dict({"name": "sq", "rules": [{
    "ops": ["MatMul"], "algorithm": "smoothquant",
    "weight": {"format": "int8"}, "activation": {"format": "int8"}}]})


def _model(rng) -> onnx.ModelProto:
    """x -> RMSNorm (Mul by gamma) -> q/k/v; LayerNorm -> a; a -> up (previous linear) -> b;
    SwiGLU: silu(gate) * up2 -> down; Relu -> r (no fold)."""
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), f"W{len(inits)}")  # noqa
    inits, nodes = [], []

    def mm(x, out, n=N, k=K, name=None):
        inits.append(w(k, n))
        nodes.append(helper.make_node("MatMul", [x, inits[-1].name], [out], name=name or f"mm_{out}"))

    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2.0, K).astype(np.float32), "gamma"))
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2.0, K).astype(np.float32), "ln_scale"))
    inits.append(numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "ln_bias"))
    inits.append(numpy_helper.from_array(rng.standard_normal(K).astype(np.float32), "b_up"))
    nodes += [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "gamma"], ["h"], name="norm")]
    for t in ("q", "k", "v"):
        mm("h", t)
    nodes.append(helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["a"], axis=-1, name="ln"))
    mm("a", "pre", n=K)  # previous linear (+ bias) -> b
    nodes.append(helper.make_node("Add", ["pre", "b_up"], ["b"], name="bias_add"))
    mm("b", "o")
    mm("x2", "g", n=K), mm("x2", "u", n=K)  # SwiGLU: down reads silu(g) * u
    nodes += [helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
              helper.make_node("Mul", ["silu", "u"], ["gu"], name="swiglu")]
    mm("gu", "d")
    nodes.append(helper.make_node("Relu", ["x"], ["r"], name="relu"))
    mm("r", "z")
    outs = ["q", "k", "v", "o", "d", "z"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, K])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["b", 5, N]) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _smooth(model, rng):
    graph = import_model(model)
    groups = smoothing_groups(graph, RECIPE)
    factors = {g.x: np.exp(rng.uniform(-2, 2, K)) for g in groups}
    result = PassManager([SmoothQuantPass(RECIPE, factors)]).run(graph)
    return export_model(result.graph, like=model), result, groups


def test_groups_share_one_input():
    groups = {g.x: g.nodes for g in smoothing_groups(import_model(_model(np.random.default_rng(0))), RECIPE)}
    assert groups["h"] == ["mm_q", "mm_k", "mm_v"]  # q/k/v share one s
    assert set(groups) == {"h", "a", "b", "x2", "gu", "r"}


def test_smoothed_graph_equals_original_in_onnxruntime():
    rng = np.random.default_rng(1)
    model = _model(rng)
    smoothed, result, _ = _smooth(model, rng)
    onnx.checker.check_model(smoothed, full_check=True)
    x = {"x": (np.random.default_rng(7).standard_normal((3, 5, K)) * np.linspace(0.1, 20, K)).astype(np.float32)}
    want, got = ort_session(model).run(None, x), ort_session(smoothed).run(None, x)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    assert not np.allclose(numpy_helper.to_array(smoothed.graph.initializer[0]), 0)  # sanity


def test_where_the_inverse_scale_goes():
    rng = np.random.default_rng(2)
    smoothed, result, _ = _smooth(_model(rng), rng)
    stats = {k.split(".", 1)[1]: v for k, v in result.stats.items()}
    # gamma Mul (h); LayerNormalization (a); Add of the previous linear (b); previous MatMul of x2 is none:
    # x2 = x*x is a Mul of one tensor -> explicit Mul; swiglu -> up projection's MatMul; relu -> explicit Mul
    assert stats["groups"] == 6 and stats["layers"] == 9
    assert stats["folded_into_Mul"] == 1 and stats["folded_into_LayerNormalization"] == 1
    assert stats["folded_into_MatMul"] + stats.get("folded_into_Add", 0) == 2
    assert stats["explicit_mul"] == 2
    reasons = dict(result.declined)
    assert "producer Relu of 'r' cannot absorb 1/s" in reasons["mm_z"]
    assert "explicit Mul" in reasons["mm_g"]
    (note,) = result.notes  # the build summary's line
    assert note.startswith("SmoothQuantPass: SmoothQuant: 6 groups (9 layers), 1/s folded into the producer for 4, "
                           "an explicit Mul kept for 2 (") and "mm_z" in note
    ops = [n.op_type for n in smoothed.graph.node]
    assert ops.count("Mul") == 4 + 2  # x2, norm, silu, swiglu + the two explicit Muls


def test_a_tensor_read_by_others_is_not_folded():
    model = _model(np.random.default_rng(3))
    graph = import_model(model)
    # make `h` (the RMSNorm output) also a graph output: folding 1/s into gamma would change it
    graph.outputs.append(graph.tensors()["h"])
    result = PassManager([SmoothQuantPass(RECIPE, {"h": np.full(K, 2.0)})]).run(graph)
    assert "'h' is a graph output" in dict(result.declined)["mm_q"]


def test_groups_without_factors_are_left_alone():
    graph = import_model(_model(np.random.default_rng(4)))
    assert not PassManager([SmoothQuantPass(RECIPE, {})]).run(graph).modified


@pytest.mark.parametrize("alpha", [None, "auto", 0.3])
def test_recipe_alpha_values(alpha):
    table = {"ops": ["MatMul"], "algorithm": "smoothquant", "weight": {"format": "int8"}}
    if alpha is not None:
        table["alpha"] = alpha
    rule = Recipe.from_dict({"name": "r", "rules": [table]}).rules[0]
    assert rule.alpha == (0.5 if alpha is None else alpha)
