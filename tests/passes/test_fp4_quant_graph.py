"""FP4 quantization through the graph passes (`qcompile.passes.quantize_model` / `fuse_plugins`), checked in our
lowering against float64 computations written here (ONNX Runtime cannot run FP4): the recipe's
`weight.scale_search = "mse"` reaching the quantizer."""
import numpy as np
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from qcompile.lowering import lower_onnx
from qcompile.passes import fuse_plugins, quantize_model
from qcompile.recipes.schema import Recipe


def _linear_model(k: int, n: int, w: np.ndarray | None = None, seed: int = 0):
    """y = relu(x) @ W with x [batch, seq, K] (dynamic batch/seq) and a constant W [K, N]."""
    if w is None:
        w = (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="act"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", k])],
                          [helper.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", n])],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), w


def _recipe(fmt: str, act: bool = False, **weight) -> Recipe:
    rule = {"ops": ["MatMul"], "weight": {"format": fmt, "granularity": "group",
                                          "group_size": 16 if fmt == "nvfp4" else 32, **weight}}
    if act:
        rule["activation"] = {"format": "nvfp4", "granularity": "group", "group_size": 16}
    return Recipe.from_dict({"name": "t", "opset": 23, "rules": [rule],
                             "placement": {"min_k": 16, "min_n": 16, "skip_gemv": False}})


def _dequantized_weight(model, k: int) -> np.ndarray:
    """W_hat [K, N] of a weight-only quantized graph: its output for x = I_K (relu(I) = I), in float64."""
    eye = torch.eye(k, dtype=torch.float64).reshape(1, k, k)
    return lower_onnx(model, compute_dtype=torch.float64)(eye)[0][0].numpy()


def test_scale_search_mse_in_the_recipe_reaches_the_quantizer():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((128, 64)) * 0.02).astype(np.float32)
    w.reshape(-1)[rng.choice(w.size, 25, replace=False)] *= 10.0
    w[5, 9] = 20.0
    model, _ = _linear_model(128, 64, w)
    amax_q, amax_res = quantize_model(model, _recipe("nvfp4"), {})
    mse_q, mse_res = quantize_model(model, _recipe("nvfp4", scale_search="mse"), {})
    key = "QuantizeWeightsFp4Pass.nvfp4_mse_searched"
    assert mse_res.stats[key] == 1 and amax_res.stats[key] == 0
    assert [n.op_type for n in mse_q.graph.node] == [n.op_type for n in amax_q.graph.node]  # same TRT form
    w_amax, w_mse = _dequantized_weight(amax_q, 128), _dequantized_weight(mse_q, 128)
    assert not np.array_equal(w_amax, w_mse)
    err_amax, err_mse = ((w_amax - w) ** 2).sum(), ((w_mse - w) ** 2).sum()
    assert err_mse < 0.9 * err_amax, (err_mse, err_amax)
    # the plugin graph runs the searched weights
    plugin, _ = fuse_plugins(mse_q)
    assert [n.op_type for n in plugin.graph.node] == ["Relu", "Fp4Gemm"]
    np.testing.assert_allclose(_dequantized_weight(plugin, 128), w_mse, rtol=1e-6, atol=1e-9)
