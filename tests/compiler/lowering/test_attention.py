"""ONNX Attention (opset 23-25) through the lowering, against ONNX's reference evaluator on fresh random data: the
fused path (torch's scaled_dot_product_attention) and the explicit one, in float32 and in an engine's float16.
ONNX's own Attention node cases run in test_conformance.py."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qcompile.errors import LoweringError
from qcompile.lowering import lower_onnx

F32 = TensorProto.FLOAT


def _attention_model(inputs: dict, outputs: list[str], opset: int = 23, **attrs):
    """One Attention node; `inputs` maps its input slots (in order, None = absent) to (name, type, shape)."""
    names = [spec[0] if spec else "" for spec in inputs.values()]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node("Attention", names, outputs, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*spec) for spec in inputs.values() if spec],
                              [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs if o])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _feeds(model, rng, masks=None):
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        kind = value.type.tensor_type.elem_type
        if kind == TensorProto.BOOL:
            feeds[value.name] = masks[value.name]
        elif kind == TensorProto.INT64:
            feeds[value.name] = masks[value.name]
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _check(model, feeds, compute_dtype=None, atol=2e-5):
    want = ReferenceEvaluator(model).run(None, feeds)
    program = lower_onnx(model, compute_dtype=compute_dtype)
    got = program(*[torch.from_numpy(feeds[v.name]) for v in model.graph.input])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g.float().numpy()
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=atol)
    return got


def test_grouped_query_decode_with_cache_padding_and_causal_mask_matches_the_reference():
    """3-D Q/K/V (8 query heads over 2 key/value heads), a cache of 5 keys, one new token, a boolean mask shorter
    than the keys (padded as masked), bottom-right causal: the fused path and the present K/V."""
    rng = np.random.default_rng(7)
    b, q_len, past, size = 2, 1, 5, 16
    masks = {"m": rng.random((b, 1, q_len, past)) < 0.8}
    masks["m"][:, :, :, 0] = True
    model = _attention_model({"q": ("q", F32, [b, q_len, 8 * size]), "k": ("k", F32, [b, q_len, 2 * size]),
                              "v": ("v", F32, [b, q_len, 2 * size]), "m": ("m", TensorProto.BOOL, [b, 1, q_len, past]),
                              "pk": ("pk", F32, [b, 2, past, size]), "pv": ("pv", F32, [b, 2, past, size])},
                             ["y", "present_k", "present_v"], is_causal=1, q_num_heads=8, kv_num_heads=2)
    y, present_k, _ = _check(model, _feeds(model, rng, masks))
    assert present_k.shape == (b, 2, past + q_len, size)


@pytest.mark.parametrize("outputs", [["y"], ["y", "", "", "qk"]], ids=["fused", "explicit"])
def test_fully_masked_query_rows_give_zeros(outputs):
    """The schema's zero rows where every key is masked, on both paths (the explicit one with the probabilities
    as its fourth output, mode 3)."""
    rng = np.random.default_rng(8)
    mask = rng.random((3, 6)) < 0.7
    mask[1] = False
    model = _attention_model({"q": ("q", F32, [2, 4, 3, 8]), "k": ("k", F32, [2, 4, 6, 8]),
                              "v": ("v", F32, [2, 4, 6, 8]), "m": ("m", TensorProto.BOOL, [3, 6])}, outputs,
                             qk_matmul_output_mode=3)
    y = _check(model, _feeds(model, rng, {"m": mask}))[0]
    assert torch.count_nonzero(y[:, :, 1]) == 0 and torch.count_nonzero(y[:, :, 0]) > 0


@pytest.mark.gpu
def test_cuda_fused_path_in_float16_gives_zeros_for_fully_masked_rows():
    """On CUDA the fused path runs torch's memory-efficient kernel, which returns NaN rows where every key is masked
    (pytorch#110213); the converter zeroes them. Checked against the reference evaluator."""
    rng = np.random.default_rng(11)
    mask = rng.random((1, 1, 16, 40)) < 0.6
    mask[..., 3, :] = False
    model = _attention_model({"q": ("q", F32, [2, 8, 16, 64]), "k": ("k", F32, [2, 8, 40, 64]),
                              "v": ("v", F32, [2, 8, 40, 64]), "m": ("m", TensorProto.BOOL, [1, 1, 16, 40])}, ["y"])
    feeds = _feeds(model, rng, {"m": mask})
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    program = lower_onnx(model, compute_dtype=torch.float16).to("cuda")
    got = program(*[torch.from_numpy(feeds[v.name]).cuda() for v in model.graph.input])[0].float().cpu().numpy()
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=5e-3)
    assert not np.any(got[:, :, 3])


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_softcap_float_mask_and_the_scores_output(mode):
    """The explicit path: soft cap, a float mask, a custom scale, and `qk_matmul_output` in modes 1-3."""
    rng = np.random.default_rng(mode)
    model = _attention_model({"q": ("q", F32, [1, 4, 5, 8]), "k": ("k", F32, [1, 4, 7, 8]),
                              "v": ("v", F32, [1, 4, 7, 12]), "m": ("m", F32, [5, 7])},
                             ["y", "", "", "qk"], softcap=2.5, scale=0.4, qk_matmul_output_mode=mode)
    _check(model, _feeds(model, rng))


def test_sliding_window_and_nonpad_lengths_of_opset_25():
    """A static cache of 9 keys of which 6 and 9 are valid per batch, 3 new queries, causal, and a left window of 2."""
    rng = np.random.default_rng(9)
    model = _attention_model({"q": ("q", F32, [2, 2, 3, 8]), "k": ("k", F32, [2, 2, 9, 8]),
                              "v": ("v", F32, [2, 2, 9, 8]), "m": None, "pk": None, "pv": None,
                              "n": ("n", TensorProto.INT64, [2])},
                             ["y"], opset=25, is_causal=1, left_window_size=2)
    _check(model, _feeds(model, rng, {"n": np.array([6, 9], np.int64)}))


def test_float16_compute_as_in_cuda_engines():
    """Engines compute in float16: the fused path there stays within float16's error of the float32 reference."""
    rng = np.random.default_rng(10)
    model = _attention_model({"q": ("q", F32, [2, 8, 17, 32]), "k": ("k", F32, [2, 8, 17, 32]),
                              "v": ("v", F32, [2, 8, 17, 32])}, ["y"], is_causal=1)
    _check(model, _feeds(model, rng), compute_dtype=torch.float16, atol=5e-3)


def test_three_dimensional_inputs_without_head_counts_are_an_error():
    model = _attention_model({"q": ("q", F32, [1, 3, 16]), "k": ("k", F32, [1, 3, 16]),
                              "v": ("v", F32, [1, 3, 16])}, ["y"])
    feeds = {n: torch.zeros(1, 3, 16) for n in "qkv"}
    with pytest.raises(LoweringError, match="q_num_heads and kv_num_heads"):
        lower_onnx(model)(*feeds.values())
