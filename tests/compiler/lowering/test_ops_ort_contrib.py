"""ONNX Runtime's contrib ops (compiler/lowering/ops/ort_contrib.py) through the lowering, against ONNX Runtime's CPU
kernels on fresh random data (BiasAdd and BiasSplitGelu, which have CUDA kernels only, against their documented
formulas), and a SkipSimplifiedLayerNormalization + GroupQueryAttention decode graph exported with a dynamic batch."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qc_testutil import ort_session

from qcompile.errors import LoweringError
from qcompile.lowering import lower_onnx

MS = "com.microsoft"


def _model(op: str, feeds: dict, outputs: int = 1, domain: str = MS, opset: int = 17, constants=(), **attrs):
    """One `domain::op` node over `feeds` (name -> array, None for an absent optional input; those named in
    `constants` become initializers) with `outputs` outputs."""
    present = {name: a for name, a in feeds.items() if a is not None}
    out_names = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op, [name if a is not None else "" for name, a in feeds.items()], out_names,
                            domain=domain, **attrs)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for n, a in present.items() if n not in constants]
    graph = helper.make_graph([node], "g", inputs, [helper.make_empty_tensor_value_info(n) for n in out_names],
                              [numpy_helper.from_array(present[n], n) for n in constants])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def _graph_feeds(model, feeds: dict) -> dict:
    return {v.name: feeds[v.name] for v in model.graph.input}


def _lowered(model, feeds: dict) -> list:
    outputs = lower_onnx(model)(*[torch.from_numpy(a) for a in _graph_feeds(model, feeds).values()])
    return [o.numpy() for o in outputs]


def _check(model, feeds: dict, atol=1e-5, compare=None) -> list:
    """The lowered program's outputs equal ORT's (`compare(index, got, want)` checks them instead when given)."""
    want = ort_session(model).run(None, _graph_feeds(model, feeds))
    got = _lowered(model, feeds)
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, index
        if compare is not None:
            compare(index, g, w)
        else:
            assert g.shape == w.shape, index
            np.testing.assert_allclose(g, w, atol=atol, rtol=atol, err_msg=f"output {index}")
    return got


def _random(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# --- normalizations -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("skip_rank", [3, 2])
def test_skip_layer_norms_with_all_outputs(op, with_bias, skip_rank):
    """[2, 5, 16] input, skip [2, 5, 16] or [5, 16], beta (layer norm only) and bias optional, epsilon 1e-3: the
    output, mean, inv_std_var and input_skip_bias_sum all match."""
    rng = np.random.default_rng([len(op), with_bias, skip_rank])
    feeds = {"x": _random(rng, 2, 5, 16), "skip": _random(rng, *[2, 5, 16][3 - skip_rank:]),
             "gamma": _random(rng, 16)}
    if op == "SkipLayerNormalization":
        feeds["beta"] = _random(rng, 16) if with_bias else None
    feeds["bias"] = _random(rng, 16) if with_bias else None
    _check(_model(op, feeds, 4, epsilon=1e-3), feeds)


def test_skip_layer_norm_default_epsilon_with_the_output_only():
    rng = np.random.default_rng(1)
    feeds = {"x": _random(rng, 1, 3, 8) * 1e-4, "skip": _random(rng, 1, 3, 8) * 1e-4, "gamma": _random(rng, 8)}
    _check(_model("SkipSimplifiedLayerNormalization", feeds), feeds, atol=1e-4)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_simplified_layer_norm_over_trailing_axes(axis, scale_dtype):
    """Default-domain (ORT) RMSNorm of a [2, 3, 8] float32 input from `axis` on, Y in the scale's type, inv_std_var."""
    rng = np.random.default_rng([axis % 3, len(np.dtype(scale_dtype).name)])
    feeds = {"x": _random(rng, 2, 3, 8), "scale": _random(rng, *[3, 8][axis % 3 - 1:], dtype=scale_dtype)}
    _check(_model("SimplifiedLayerNormalization", feeds, 2, domain="", axis=axis, epsilon=1e-3), feeds, atol=2e-3)


def test_layer_norm_before_opset_17():
    """ORT's default-domain LayerNormalization at opset 16 (ONNX has none there): Y, Mean and InvStdDev."""
    rng = np.random.default_rng(2)
    feeds = {"x": _random(rng, 2, 3, 8), "scale": _random(rng, 8), "bias": _random(rng, 8)}
    _check(_model("LayerNormalization", feeds, 3, domain="", opset=16, epsilon=1e-4), feeds)


# --- activations --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,inputs,attrs", [
    ("Gelu", 1, {}), ("BiasGelu", 2, {}), ("FastGelu", 1, {}), ("FastGelu", 2, {}), ("QuickGelu", 1, {}),
    ("QuickGelu", 1, {"alpha": 1.3})])
def test_gelu_variants(op, inputs, attrs):
    rng = np.random.default_rng([len(op), inputs])
    feeds = {"x": _random(rng, 2, 3, 16) * 3, "bias": _random(rng, 16)}
    feeds = dict(list(feeds.items())[:inputs])
    _check(_model(op, feeds, **attrs), feeds)


def _erf_gelu(x):
    return x * 0.5 * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2)))


def test_bias_add_and_bias_split_gelu_follow_their_formulas():
    """CUDA-only in ORT: BiasAdd is x + bias + skip; BiasSplitGelu is left * gelu(right) of x + bias's halves."""
    rng = np.random.default_rng(3)
    x, bias, skip = _random(rng, 2, 6, 8), _random(rng, 8), _random(rng, 2, 6, 8)
    got = _lowered(_model("BiasAdd", {"x": x, "bias": bias, "skip": skip}), {"x": x, "bias": bias, "skip": skip})
    np.testing.assert_allclose(got[0], x + bias + skip, atol=1e-6)
    got = _lowered(_model("BiasSplitGelu", {"x": x, "bias": bias}), {"x": x, "bias": bias})
    h = x + bias
    np.testing.assert_allclose(got[0], h[..., :4] * _erf_gelu(h[..., 4:]), atol=1e-5)


# --- rotary embeddings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [0, 6], ids=["full", "partial"])
@pytest.mark.parametrize("positions", ["per_token", "offset"])
def test_rotary_embedding_matches_ort(rank, interleaved, rotary_dim, positions):
    """3 heads of 10 features ([2, 5, 30] or [2, 3, 5, 10]), all or the first 6 rotated, halves or interleaved pairs,
    position_ids [2, 5] or a [1] offset; num_heads given only where ORT needs it."""
    rng = np.random.default_rng([rank, interleaved, rotary_dim, len(positions)])
    batch, heads, seq, size = 2, 3, 5, 10
    angles = rng.uniform(0, 2 * np.pi, (16, (rotary_dim or size) // 2))
    position_ids = rng.integers(0, 16, (batch, seq)) if positions == "per_token" else np.array([7], np.int64)
    x = _random(rng, *([batch, heads, seq, size] if rank == 4 else [batch, seq, heads * size]))
    feeds = {"x": x, "pos": position_ids, "cos": np.cos(angles).astype(np.float32),
             "sin": np.sin(angles).astype(np.float32)}
    attrs = {"num_heads": heads, "rotary_embedding_dim": rotary_dim} if rotary_dim else {}
    _check(_model("RotaryEmbedding", feeds, interleaved=interleaved, **attrs), feeds)


# --- GroupQueryAttention ------------------------------------------------------------------------------------------

HEADS, KV_HEADS, SIZE = 4, 2, 16  # two query heads share each K/V head


def _gqa_feeds(rng, seqlens: list, seq: int, past: int | None, packed=False, rotary=False, bias=False,
               sink=False) -> dict:
    """GroupQueryAttention inputs for a batch whose entries hold `seqlens` tokens after this step of `seq` new ones,
    with a past buffer of `past` positions (None: no past inputs); only the valid past positions are random."""
    batch, total = len(seqlens), max(seqlens)
    hidden, kv_hidden = HEADS * SIZE, KV_HEADS * SIZE
    feeds = {"query": _random(rng, batch, seq, hidden + 2 * kv_hidden if packed else hidden),
             "key": None if packed else _random(rng, batch, seq, kv_hidden),
             "value": None if packed else _random(rng, batch, seq, kv_hidden), "past_key": None, "past_value": None}
    if past is not None:
        for name in ("past_key", "past_value"):
            cache = np.zeros((batch, KV_HEADS, past, SIZE), np.float32)
            for b, length in enumerate(seqlens):
                valid = length - seq if total != seq else 0
                cache[b, :, :valid] = _random(rng, KV_HEADS, valid, SIZE)
            feeds[name] = cache
    feeds["seqlens_k"] = np.array(seqlens, np.int32) - 1
    feeds["total_sequence_length"] = np.array(total, np.int32)
    angles = rng.uniform(0, 2 * np.pi, (32, SIZE // 2))
    feeds["cos_cache"] = np.cos(angles).astype(np.float32) if rotary else None
    feeds["sin_cache"] = np.sin(angles).astype(np.float32) if rotary else None
    if bias or sink:
        feeds["position_ids"] = None
        feeds["attention_bias"] = _random(rng, batch, 1, seq, total) if bias else None
    if sink:
        feeds["head_sink"] = _random(rng, HEADS)
    return feeds


def _valid_parts(feeds: dict):
    """A `compare` for _check: the output's rows of valid tokens and the present buffers' valid positions (ORT
    leaves the rest of a buffer unwritten)."""
    lengths = feeds["seqlens_k"] + 1
    seq = feeds["query"].shape[1]

    def compare(index, got, want):
        assert got.shape == want.shape, index
        for b, length in enumerate(lengths):
            rows = (slice(0, min(length, seq)),) if index == 0 else (slice(None), slice(0, length))
            np.testing.assert_allclose(got[b][rows], want[b][rows], atol=1e-5, rtol=1e-5, err_msg=f"{index}, {b}")
    return compare


GQA_CASES = {
    "prompt": dict(seqlens=[6, 6], seq=6, past=None),
    "prompt_ragged_rotary": dict(seqlens=[6, 3], seq=6, past=None, rotary=True),
    "prompt_packed_empty_past": dict(seqlens=[5, 2], seq=5, past=0, packed=True),
    "decode_ragged_rotary": dict(seqlens=[8, 5, 2], seq=1, past=7, rotary=True),
    "decode_long_buffer": dict(seqlens=[8, 3], seq=1, past=12, rotary=True, total_known=True),
    "chunk_after_past": dict(seqlens=[9], seq=3, past=6, rotary=True),
    "decode_bias_sink": dict(seqlens=[8, 5], seq=1, past=7, bias=True, sink=True),
}


@pytest.mark.parametrize("case", list(GQA_CASES))
@pytest.mark.parametrize("interleaved", [0, 1])
def test_group_query_attention_matches_ort(case, interleaved):
    """Prompts (ragged: shorter entries padded at the end), token generation over a ragged batch of pasts (and a past
    buffer longer than the total, which sizes the present when total_sequence_length is a constant), a 3-token
    chunk after a past; rotary on where named, packed QKV, an
    attention_bias and head sinks: output and present_key / present_value match ORT on the valid tokens."""
    args = dict(GQA_CASES[case])
    if interleaved and not args.get("rotary"):
        pytest.skip("interleaving only matters with rotary")
    rng = np.random.default_rng([len(case), interleaved])
    constants = ("total_sequence_length",) if args.pop("total_known", False) else ()
    feeds = _gqa_feeds(rng, **args)
    model = _model("GroupQueryAttention", feeds, 3, constants=constants, num_heads=HEADS, kv_num_heads=KV_HEADS,
                   do_rotary=int(bool(args.get("rotary"))), rotary_interleaved=interleaved)
    _check(model, feeds, compare=_valid_parts(feeds))


@pytest.mark.parametrize("attrs", [{"local_window_size": 3}, {"softcap": 2.0}, {"smooth_softmax": 1},
                                   {"scale": 0.7, "local_window_size": 2}], ids=str)
@pytest.mark.parametrize("case", ["prompt_ragged_rotary", "decode_ragged_rotary"])
def test_group_query_attention_attributes(attrs, case):
    """A sliding window, a soft cap, a smooth softmax and a custom scale, on a prompt and on token generation."""
    rng = np.random.default_rng([len(str(attrs)), len(case)])
    feeds = _gqa_feeds(rng, **GQA_CASES[case])
    model = _model("GroupQueryAttention", feeds, 3, num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1, **attrs)
    _check(model, feeds, compare=_valid_parts(feeds))


# --- MultiHeadAttention -------------------------------------------------------------------------------------------

def _mha_feeds(rng, batch=2, seq=3, kv_seq=5, heads=2, size=8, past=0, bias=False, mask=None, attention_bias=False,
               heads_split=False):
    hidden = heads * size
    kv_shape = (batch, heads, kv_seq, size) if heads_split else (batch, kv_seq, hidden)
    total = past + kv_seq
    masks = {None: None, "lengths": rng.integers(1, total + 1, batch).astype(np.int32),
             "2d": (rng.random((batch, total)) > 0.3).astype(np.int32),
             "3d": (rng.random((batch, seq, total)) > 0.3).astype(np.int32),
             "2d_one_entry_all_padding": np.stack([np.zeros(total, np.int32), np.ones(total, np.int32)])}
    return {"query": _random(rng, batch, seq, hidden), "key": _random(rng, *kv_shape),
            "value": _random(rng, *kv_shape), "bias": _random(rng, 3 * hidden) if bias else None,
            "key_padding_mask": masks[mask],
            "attention_bias": _random(rng, 1, heads, seq, total) if attention_bias else None,
            "past_key": _random(rng, batch, heads, past, size) if past else None,
            "past_value": _random(rng, batch, heads, past, size) if past else None}


MHA_CASES = {
    "plain": {}, "bias": dict(bias=True), "mask_lengths": dict(mask="lengths"), "mask_2d": dict(mask="2d"),
    "mask_3d_unidirectional": dict(mask="3d", kv_seq=3, unidirectional=1), "attention_bias": dict(attention_bias=True),
    "past": dict(past=4, kv_seq=3, bias=True), "past_mask_unidirectional": dict(past=4, kv_seq=3, mask="2d",
                                                                                unidirectional=1),
    "decode_past_mask": dict(past=6, seq=1, kv_seq=1, mask="2d", attention_bias=True),
    "cross_heads_split": dict(heads_split=True, bias=True, mask="2d"),
    "scale_filter": dict(mask="2d", scale=0.3, mask_filter_value=-50.0),
    "entry_all_padding": dict(mask="2d_one_entry_all_padding"),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multi_head_attention_matches_ort(case):
    """3-D query/key/value (or key/value split in heads: cross attention), the projection bias, key padding masks
    as lengths, [batch, total] or [batch, seq, total], attention_bias, past K/V (present = past + new), a causal
    (unidirectional) mask offset by the past, a custom scale and mask_filter_value, an entry whose keys are all
    padding (mask_filter_value, unlike -inf, leaves its scores' softmax): output and presents match."""
    args = dict(MHA_CASES[case])
    attrs = {name: args.pop(name) for name in ("unidirectional", "scale", "mask_filter_value") if name in args}
    rng = np.random.default_rng(len(case))
    feeds = _mha_feeds(rng, **args)
    _check(_model("MultiHeadAttention", feeds, 3, num_heads=2, **attrs), feeds)


def test_unsupported_features_fail_clearly():
    """MultiHeadAttention's packed QKV and its causal cross attention (which ORT's CPU kernels do not do right),
    a windowed GQA cache and RotaryEmbedding's packed batching are refused with a LoweringError."""
    rng = np.random.default_rng(9)
    packed = {"query": _random(rng, 2, 3, 2, 3, 8)}
    with pytest.raises(LoweringError, match="packed QKV"):
        _lowered(_model("MultiHeadAttention", packed, num_heads=2), packed)
    cross = _mha_feeds(rng)
    with pytest.raises(LoweringError, match="unidirectional"):
        _lowered(_model("MultiHeadAttention", cross, num_heads=2, unidirectional=1), cross)
    feeds = _gqa_feeds(rng, **GQA_CASES["decode_ragged_rotary"])
    with pytest.raises(LoweringError, match="sliding_window_cache"):
        _lowered(_model("GroupQueryAttention", feeds, 3, num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1,
                        local_window_size=4, sliding_window_cache=1), feeds)
    with pytest.raises(LoweringError, match="is_packed_batching"):
        angles = np.zeros((4, 2), np.float32)
        rope = {"x": _random(rng, 1, 2, 8), "pos": np.zeros(1, np.int64), "cos": angles, "sin": angles}
        _lowered(_model("RotaryEmbedding", rope, is_packed_batching=1), rope)


def _decoder_step_model(past: int):
    """x + skip RMS-normalized (SkipSimplifiedLayerNormalization) as the query of a rotary GroupQueryAttention decode
    step over key / value / past inputs; batch symbolic, gamma and the rotary caches initializers."""
    hidden, kv_hidden = HEADS * SIZE, KV_HEADS * SIZE
    rng = np.random.default_rng(11)
    angles = rng.uniform(0, 2 * np.pi, (32, SIZE // 2))
    constants = {"gamma": _random(rng, hidden), "cos": np.cos(angles).astype(np.float32),
                 "sin": np.sin(angles).astype(np.float32)}
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["normed", "", "", "sum"],
                              domain=MS, epsilon=1e-5),
             helper.make_node("GroupQueryAttention", ["normed", "key", "value", "past_key", "past_value", "seqlens_k",
                                                      "total_sequence_length", "cos", "sin"],
                              ["y", "present_key", "present_value"], domain=MS, num_heads=HEADS,
                              kv_num_heads=KV_HEADS, do_rotary=1)]
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    cache = ["batch", KV_HEADS, past, SIZE]
    inputs = [helper.make_tensor_value_info(name, f32, shape) for name, shape in [
        ("x", ["batch", 1, hidden]), ("skip", ["batch", 1, hidden]), ("key", ["batch", 1, kv_hidden]),
        ("value", ["batch", 1, kv_hidden]), ("past_key", cache), ("past_value", cache)]]
    inputs += [helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
               helper.make_tensor_value_info("total_sequence_length", i32, [])]
    outputs = [helper.make_empty_tensor_value_info(n) for n in ("y", "present_key", "present_value", "sum")]
    graph = helper.make_graph(nodes, "step", inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def test_decoder_step_exports_with_a_dynamic_batch():
    """The lowered SkipSimplifiedLayerNormalization + GroupQueryAttention decode step exports with a symbolic batch,
    and the exported program matches ORT at batches 3 and 5 with ragged pasts (the longest filling the buffer)."""
    past = 6
    model = _decoder_step_model(past)
    session = ort_session(model)

    def feeds(batch, seed):
        rng = np.random.default_rng(seed)
        lengths = np.concatenate([[past + 1], rng.integers(2, past + 2, batch - 1)])
        values = _gqa_feeds(rng, list(lengths), 1, past)
        return {"x": values["query"], "skip": _random(rng, batch, 1, HEADS * SIZE), "key": values["key"],
                "value": values["value"], "past_key": values["past_key"], "past_value": values["past_value"],
                "seqlens_k": values["seqlens_k"], "total_sequence_length": values["total_sequence_length"]}

    batch = torch.export.Dim("batch", min=1, max=64)
    dims = {name: {0: batch} for name in ("x", "skip", "key", "value", "past_key", "past_value", "seqlens_k")}
    example = feeds(2, 0)
    exported = torch.export.export(lower_onnx(model), tuple(torch.from_numpy(a) for a in example.values()),
                                   dynamic_shapes=(tuple(dims.get(n) for n in example),))
    for size in (3, 5):
        step = feeds(size, size)
        got = [o.numpy() for o in exported.module()(*[torch.from_numpy(a) for a in step.values()])]
        want = session.run(None, step)
        compare = _valid_parts({"seqlens_k": step["seqlens_k"], "query": step["x"]})
        for index in range(3):
            compare(index, got[index], want[index])
        np.testing.assert_allclose(got[3], want[3], atol=1e-6)
