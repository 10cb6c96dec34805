"""FP4 quantization through the graph passes (`qcompile.passes.quantize_model` / `fuse_plugins`), checked in our
lowering against float64 computations written here (ONNX Runtime cannot run FP4): the recipe's
`weight.scale_search = "mse"` reaching the quantizer."""
import numpy as np
import onnx
import pytest
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
                          [numpy_helper.from_array(w, "W")],
                          value_info=[helper.make_tensor_value_info("h", T.FLOAT, ["batch", "seq", k])])
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


# ---------------------------------------------------------------- float64 references, written here

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E4M3_MAX, E2M1_MAX = 448.0, 6.0


def _e2m1(y: np.ndarray) -> np.ndarray:
    """float64 cast to E2M1: nearest grid value, ties to the even code, saturating at +-6."""
    mag = np.minimum(np.abs(y), 6.0)
    d = np.abs(mag[..., None] - E2M1)
    tie = d == d.min(-1, keepdims=True)
    idx = np.where(tie.sum(-1) > 1, np.argmax(tie & (np.arange(8) % 2 == 0), -1), np.argmin(d, -1))
    return np.sign(y) * E2M1[idx]


def _e4m3(v: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.minimum(v, E4M3_MAX).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _blocks_along_last(v: np.ndarray, block: int):
    """The [start, stop) ranges of the blocks of the last axis; the last block may be partial (K % block)."""
    k = v.shape[-1]
    return [(s, min(s + block, k)) for s in range(0, k, block)]


def _nvfp4_ref(v: np.ndarray, g: float) -> np.ndarray:
    """NVFP4 fake-quantization of `v [..., K]` in float64 with decode-form global scale `g` (float32 value)."""
    out = np.zeros_like(v, dtype=np.float64)
    g = float(np.float32(g))
    for s, e in _blocks_along_last(v, 16):
        b = v[..., s:e].astype(np.float64)
        scale = _e4m3(np.abs(b).max(-1) / E2M1_MAX / g) * g
        safe = np.where(scale > 0, scale, 1.0)
        out[..., s:e] = np.where(scale[..., None] > 0, _e2m1(b / safe[..., None]), 0.0) * scale[..., None]
    return out


def _nvfp4_weight_ref(w: np.ndarray) -> np.ndarray:
    """W_hat [K, N] of NVFP4 weight quantization (blocks of 16 along K, amax global scale)."""
    wt = w.T.astype(np.float64)
    return _nvfp4_ref(wt, np.abs(wt).max() / (E2M1_MAX * E4M3_MAX)).T


def _mxfp4_weight_ref(w: np.ndarray) -> np.ndarray:
    """W_hat [K, N] of MXFP4 (OCP MX: 2**(floor(log2 amax) - 2) per 32 along K, E2M1 saturating)."""
    import math

    wt = w.T.astype(np.float64)
    out = np.zeros_like(wt)
    for s, e in _blocks_along_last(wt, 32):
        for r in range(wt.shape[0]):
            b = wt[r, s:e]
            amax = np.abs(b).max()
            exp = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
            out[r, s:e] = _e2m1(b / 2.0 ** exp) * 2.0 ** exp
    return out.T


def _run(model, x, dtype=torch.float64):
    return lower_onnx(model, compute_dtype=dtype)(torch.from_numpy(x).to(dtype))[0].double().numpy()


# ---------------------------------------------------------------- K not a multiple of the block

PAD_CASES = {  # name: (weight format, W4A4?, K, padded K)
    "mxfp4_k48": ("mxfp4", False, 48, 64),
    "nvfp4_k40": ("nvfp4", False, 40, 48),
    "nvfp4_w4a4_k40": ("nvfp4", True, 40, 48),
}


@pytest.mark.parametrize("case", list(PAD_CASES))
def test_k_not_a_multiple_of_the_block_is_padded_and_exact(case):
    fmt, act, k, kp = PAD_CASES[case]
    n = 24
    model, w = _linear_model(k, n, seed=7)
    x = np.random.default_rng(8).standard_normal((2, 5, k)).astype(np.float32)
    h = np.maximum(x.astype(np.float64), 0.0)  # relu
    amax = {"h": float(h.max())} if act else {}
    q, result = quantize_model(model, _recipe(fmt, act), amax)
    stats = result.stats
    assert stats["QuantizeWeightsFp4Pass.layers_padded_k"] == 1 and stats["QuantizeWeightsFp4Pass.inputs_padded"] == 1
    assert not [r for _, r in result.declined if r.startswith("QuantizeWeightsFp4Pass")]
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("Pad") == 1 and ops.count("MatMul") == 1
    inits = {t.name: t for t in q.graph.initializer}
    pad = next(nd for nd in q.graph.node if nd.op_type == "Pad")
    assert pad.input[0] == "h" and numpy_helper.to_array(inits[pad.input[1]]).tolist() == [0, 0, 0, 0, 0, kp - k]
    w_dq = next(nd for nd in q.graph.node if nd.name == "mm/weight_dq")
    w_f4 = inits[w_dq.input[0]]
    assert w_f4.data_type == T.FLOAT4E2M1 and list(w_f4.dims) == [n, kp]
    assert not numpy_helper.to_array(w_f4).astype(np.float32)[:, k:].any()  # the padded K columns are zero
    if act:  # the activation chain quantizes the padded input, its global scale from the unpadded amax
        dq = next(nd for nd in q.graph.node if nd.op_type == "TRT_FP4DynamicQuantize")
        assert dq.input[0] == pad.output[0]
    # float64 reference: x_hat @ W_hat with the last block partial (K % B real elements)
    w_hat = _nvfp4_weight_ref(w) if fmt == "nvfp4" else _mxfp4_weight_ref(w)
    h_hat = _nvfp4_ref(h, h.max() / (E2M1_MAX * E4M3_MAX)) if act else h
    want = h_hat @ w_hat
    np.testing.assert_allclose(_run(q, x), want, rtol=1e-6, atol=1e-7)  # h is float32 in the graph
    # ... and the fused plugin graph (the engine's op, float32)
    plugin, _ = fuse_plugins(q)
    assert [nd.op_type for nd in plugin.graph.node] == ["Relu", "Pad", "Fp4GemmW4A4" if act else "Fp4Gemm"]
    np.testing.assert_allclose(_run(plugin, x, torch.float32), want, rtol=1e-4, atol=1e-5)
    exact = h @ w.astype(np.float64)
    assert np.abs(want - exact).max() < 0.25 * np.abs(exact).max()  # 4-bit, but the right answer


def test_k_multiple_of_the_block_is_not_padded():
    q, result = quantize_model(_linear_model(48, 24)[0], _recipe("nvfp4"), {})  # 48 = 3 * 16
    assert "Pad" not in [n.op_type for n in q.graph.node]
    assert result.stats["QuantizeWeightsFp4Pass.layers_padded_k"] == 0
    assert result.stats["QuantizeWeightsFp4Pass.nvfp4_weights"] == 1


def test_input_of_unknown_rank_is_padded_through_the_axes_input():
    model, w = _linear_model(48, 24)
    model.graph.input[0].type.tensor_type.ClearField("shape")  # no rank for x nor h
    del model.graph.value_info[:]
    q, result = quantize_model(model, _recipe("mxfp4"), {})
    pad = next(n for n in q.graph.node if n.op_type == "Pad")
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert inits[pad.input[1]].tolist() == [0, 16] and pad.input[2] == "" and inits[pad.input[3]].tolist() == [-1]
    x = np.random.default_rng(2).standard_normal((3, 48)).astype(np.float32)
    want = np.maximum(x.astype(np.float64), 0) @ _mxfp4_weight_ref(w)
    np.testing.assert_allclose(_run(q, x), want, rtol=1e-6, atol=1e-7)  # h is float32 in the graph


# ---------------------------------------------------------------- W4A4 activation global scale from calibration

def test_w4a4_activation_global_scale_is_calibrated_amax_over_6x448(tmp_path):
    """What `qcompile.build` does for nvfp4 (fp4_activation_tensors -> calibrate -> quantize_model) gives
    `g_x = max |h| / (6 * 448)` over every calibration sample, h = relu(x) (an intermediate tensor)."""
    from qcompile.calibration import calibrate, load_calibration_data
    from qcompile.frontend import load_source
    from qcompile.passes.quantize_weights_fp4 import fp4_activation_tensors

    model, _ = _linear_model(64, 32, seed=11)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    src = load_source(str(path))
    rng = np.random.default_rng(12)
    samples = rng.standard_normal((5, 2, 3, 64)).astype(np.float32) * np.array([1, 3, 0.5, 2, 1.5])[:, None, None, None]
    np.savez(tmp_path / "calib.npz", x=samples.astype(np.float32))
    recipe = _recipe("nvfp4", act=True)
    tensors = fp4_activation_tensors(src.model, recipe)
    assert tensors == ["h"]
    data = load_calibration_data(str(tmp_path / "calib.npz"), src.inputs)
    amax = calibrate(src.model, tensors, data, recipe.calibration).amax
    want_amax = np.maximum(samples.astype(np.float64), 0.0).max()  # float64, over all samples
    assert amax["h"] == pytest.approx(want_amax, rel=1e-7)
    q, _ = quantize_model(src.model, recipe, amax)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    quant = next(n for n in q.graph.node if n.op_type == "TRT_FP4DynamicQuantize")
    g = inits[quant.input[1]]
    assert g.dtype == np.float32 and g.shape == ()
    assert float(g) == pytest.approx(want_amax / (6 * 448), rel=1e-7)
    scale_dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quant.output[1])
    assert scale_dq.input[1] == quant.input[1]  # the block scales decode with the same global scale
    w_scale_dq = next(n for n in q.graph.node if n.name == "mm/weight_scale_dq")
    assert inits[w_scale_dq.input[1]].shape == ()  # the weight's global scale is a scalar too (per-tensor in TRT)
