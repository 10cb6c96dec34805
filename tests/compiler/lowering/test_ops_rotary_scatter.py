"""RotaryEmbedding, ScatterElements, TensorScatter, DepthToSpace and SpaceToDepth through the lowering, against ONNX's
reference evaluator on fresh random data, and a RotaryEmbedding program exported with a dynamic sequence length.
ONNX's own node cases of these ops run in test_conformance.py."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompile.lowering import lower_onnx

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(op: str, inputs: list[tuple], opset: int, initializers: dict | None = None, **attrs):
    """One `op` node over `inputs` ((name, elem type, shape); shape dims may be names) and `initializers`."""
    initializers = initializers or {}
    names = [spec[0] for spec in inputs] + list(initializers)
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(*spec) for spec in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
                              [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _check(model, *feeds: np.ndarray, atol=1e-5):
    """The lowered program's output equals the reference evaluator's."""
    want = ReferenceEvaluator(model).run(None, {v.name: a for v, a in zip(model.graph.input, feeds)})[0]
    got = lower_onnx(model)(*[torch.from_numpy(a) for a in feeds])[0].numpy()
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)


def _rotary_model(x_shape: list, cache_shape: list, with_positions: bool, **attrs):
    cache_inputs = [("cos", F32, cache_shape), ("sin", F32, cache_shape)]
    positions = [("pos", I64, [x_shape[0], "seq"])] if with_positions else []
    return _model("RotaryEmbedding", [("x", F32, x_shape), *cache_inputs, *positions], 23, **attrs)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [0, 6], ids=["full", "partial"])
@pytest.mark.parametrize("with_positions", [True, False], ids=["position_ids", "batch_caches"])
def test_rotary_embedding_matches_the_reference(rank, interleaved, rotary_dim, with_positions):
    """3 heads of 10 features ([2, 3, 5, 10], or [2, 5, 30] with num_heads), halves or interleaved pairs rotated, all
    features or the first 6; caches looked up by position_ids or given per batch and token."""
    rng = np.random.default_rng([rank, interleaved, rotary_dim, with_positions])
    batch, heads, seq, size = 2, 3, 5, 10
    half = (rotary_dim or size) // 2
    x_shape = [batch, heads, seq, size] if rank == 4 else [batch, seq, heads * size]
    cache_shape = [16, half] if with_positions else [batch, seq, half]
    attrs = {"num_heads": heads} if rank == 3 else {}
    model = _rotary_model(x_shape, cache_shape, with_positions, interleaved=interleaved,
                          rotary_embedding_dim=rotary_dim, **attrs)
    angles = rng.uniform(0, 2 * np.pi, cache_shape)
    feeds = [rng.standard_normal(x_shape).astype(np.float32), np.cos(angles).astype(np.float32),
             np.sin(angles).astype(np.float32)]
    if with_positions:
        feeds.append(rng.integers(0, 16, (batch, seq)))
    _check(model, *feeds)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements_with_negative_indices_and_reductions(reduction):
    """Axis -2 of a [3, 6, 4] tensor, indices in [-6, 6) (duplicates for the reductions, which then combine several
    updates with the data's value; distinct ones for 'none', where duplicates are undefined)."""
    rng = np.random.default_rng(len(reduction))
    data = rng.standard_normal((3, 6, 4)).astype(np.float32)
    if reduction == "none":
        indices = np.argsort(rng.random((3, 6, 4)), axis=1)[:, :5]  # distinct along the axis
        indices = indices - 6 * rng.integers(0, 2, indices.shape)
    else:
        indices = rng.integers(-6, 6, (3, 5, 4))
    updates = rng.standard_normal((3, 5, 4)).astype(np.float32)
    model = _model("ScatterElements", [("data", F32, [3, 6, 4]), ("indices", I64, [3, 5, 4]),
                                       ("updates", F32, [3, 5, 4])], 18, axis=-2, reduction=reduction)
    _check(model, data, indices, updates)


@pytest.mark.parametrize("axis", [2, -2])
def test_tensor_scatter_circular_wraps_around_the_cache(axis):
    """A [2, 3, 7, 4] cache, 4 new tokens per batch written at 5 (wrapping to 0-1) and at 1, modulo the cache length."""
    rng = np.random.default_rng(axis % 7)
    past = rng.standard_normal((2, 3, 7, 4)).astype(np.float32)
    update = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    model = _model("TensorScatter", [("past", F32, [2, 3, 7, 4]), ("update", F32, [2, 3, 4, 4]),
                                     ("write", I64, [2])], 24, axis=axis, mode="circular")
    _check(model, past, update, np.array([5, 1], np.int64))


def test_tensor_scatter_linear_on_a_middle_axis_without_write_indices():
    """Axis 1 of a [2, 6, 3] cache, no write_indices: the update fills rows 0-2 of every batch."""
    rng = np.random.default_rng(3)
    model = _model("TensorScatter", [("past", F32, [2, 6, 3]), ("update", F32, [2, 3, 3])], 24, axis=1)
    _check(model, rng.standard_normal((2, 6, 3)).astype(np.float32), rng.standard_normal((2, 3, 3)).astype(np.float32))


@pytest.mark.parametrize("op", ["DepthToSpace", "SpaceToDepth"])
@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_depth_space_rearrangements(op, mode):
    """Block size 3 on a [2, 18, 4, 5] (DepthToSpace) or [2, 2, 12, 15] (SpaceToDepth) tensor, in both modes."""
    rng = np.random.default_rng([len(op), len(mode)])
    shape = [2, 18, 4, 5] if op == "DepthToSpace" else [2, 2, 12, 15]
    model = _model(op, [("x", F32, shape)], 13 if op == "DepthToSpace" else 28, blocksize=3, mode=mode)
    _check(model, rng.standard_normal(shape).astype(np.float32), atol=0)


def test_rotary_embedding_exports_with_a_dynamic_sequence_length():
    """4-D X [batch, heads, seq, size] and position_ids [batch, seq] with a symbolic seq, the caches initializers: the
    lowered program exports with seq dynamic, and the exported program matches the reference at two other lengths."""
    rng = np.random.default_rng(5)
    angles = rng.uniform(0, 2 * np.pi, (64, 8))
    caches = {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}
    model = _model("RotaryEmbedding", [("x", F32, [2, 4, "seq", 16]), ("pos", I64, [2, "seq"])], 23, caches,
                   interleaved=1)
    model.graph.node[0].input[:] = ["x", "cos", "sin", "pos"]
    reference = ReferenceEvaluator(model)

    def feeds(seq):
        return rng.standard_normal((2, 4, seq, 16)).astype(np.float32), rng.integers(0, 64, (2, seq))

    seq = torch.export.Dim("seq", min=1, max=64)
    exported = torch.export.export(lower_onnx(model), tuple(torch.from_numpy(a) for a in feeds(6)),
                                   dynamic_shapes=(({2: seq}, {1: seq}),))
    for length in (3, 11):
        x, pos = feeds(length)
        got = exported.module()(torch.from_numpy(x), torch.from_numpy(pos))[0].numpy()
        np.testing.assert_allclose(got, reference.run(None, {"x": x, "pos": pos})[0], atol=1e-5, rtol=1e-5)
