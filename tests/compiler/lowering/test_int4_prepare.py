"""The INT4 plugin's weight reaches the engine layout once, when the graph is lowered (prepare hook)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.lowering import lower_onnx
from qcompile.plugins.int4_gemm import onnx_schema

K, N, G = 64, 24, 32
BIT_OPS = ("bitwise", "shift", "__and__", "__or__", "__lshift__", "__rshift__")


def _model(signed: bool, weight_through_identity: bool = False, K=K, G=G) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(5)
    dt = TensorProto.INT4 if signed else TensorProto.UINT4
    q = rng.integers(-8, 8, (K, N)) if signed else rng.integers(0, 16, (K, N))
    zero = None if signed else rng.integers(0, 16, (K // G, N))
    scale = rng.uniform(0.01, 0.1, (K // G, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    inits = [helper.make_tensor("w_q", dt, [K, N], q.reshape(-1).tolist()), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array(bias, "bias")]
    inputs = ["x", "w_q", "w_scale", "", "bias"]
    nodes = []
    if zero is not None:
        inits.append(helper.make_tensor("w_zp", dt, [K // G, N], zero.reshape(-1).tolist()))
        inputs[3] = "w_zp"
    if weight_through_identity:  # a weight the graph computes: not an initializer of the plugin node
        nodes.append(helper.make_node("Identity", ["w_q"], ["w_q_id"]))
        inputs[1] = "w_q_id"
    nodes.append(onnx_schema.make_node("gemm", inputs, ["y"], block_size=G))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx_schema.add_to_model(model)
    return model, {"q": q, "zero": zero, "scale": scale, "bias": bias, "g": G}


def _oracle(x: np.ndarray, p: dict) -> np.ndarray:
    """float64 numpy: x @ ((q - zp) * scale) + bias, from the ONNX values."""
    zp = 0.0 if p["zero"] is None else np.repeat(p["zero"], p["g"], axis=0)
    w = (p["q"] - zp) * np.repeat(p["scale"].astype(np.float64), p["g"], axis=0)
    return x.astype(np.float64) @ w + p["bias"]


def _engine_words(q: np.ndarray, signed: bool) -> np.ndarray:
    """Independent packing: word [i, n] holds q[8i + j, n] (uint4 shifted by -8) in bits 4j..4j+3."""
    v = (q - (0 if signed else 8)).astype(np.int64) & 0xF
    words = sum(v[j::8] << (4 * j) for j in range(8)).astype(np.uint32)
    return words.view(np.int32)


def _planar_engine_words(q: np.ndarray) -> np.ndarray:
    """Independent planar packing (signed q): in each 64 K, word c holds k = 16 j + 2 c + t in nibble j + 4 t."""
    v = q.astype(np.int64) & 0xF
    words = np.zeros((q.shape[0] // 8, q.shape[1]), np.int64)
    for block in range(q.shape[0] // 64):
        for c in range(8):
            for j in range(4):
                for t in range(2):
                    words[8 * block + c] |= v[64 * block + 16 * j + 2 * c + t] << (4 * (j + 4 * t))
    return words.astype(np.uint32).view(np.int32)


def _bit_ops(ep) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes
            if n.op == "call_function" and any(b in str(n.target) for b in BIT_OPS)]


@pytest.mark.parametrize("signed", [True, False], ids=["int4", "uint4+zp"])
def test_exported_program_holds_engine_words_and_does_not_repack(signed):
    model, p = _model(signed)
    prog = lower_onnx(model)
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    ep = torch.export.export(prog, (torch.from_numpy(x),),
                             dynamic_shapes=(({0: torch.export.Dim("m", min=1, max=64)},),))
    assert _bit_ops(ep) == []
    consts = {**ep.state_dict, **ep.constants}
    words = [v for v in consts.values() if isinstance(v, torch.Tensor) and v.dtype == torch.int32]
    assert len(words) == 1 and tuple(words[0].shape) == (K // 8, N)
    np.testing.assert_array_equal(words[0].numpy(), _engine_words(p["q"], signed))
    # the ONNX-layout weight (int8/uint8 values [K, N]) is not kept next to the engine words
    assert not any(tuple(v.shape) == (K, N) for v in consts.values() if isinstance(v, torch.Tensor))
    for m in (1, 5):
        xm = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
        (got,) = ep.module()(torch.from_numpy(xm))
        np.testing.assert_allclose(got.numpy(), _oracle(xm, p), rtol=1e-4, atol=1e-4)


def test_groups_of_64_reach_the_engine_in_the_planar_order():
    """K and the group multiples of 64: the lowered program holds the planar words (format.is_planar)."""
    model, p = _model(signed=True, K=128, G=64)
    prog = lower_onnx(model)
    x = np.random.default_rng(3).standard_normal((2, 128)).astype(np.float32)
    ep = torch.export.export(prog, (torch.from_numpy(x),))
    words = [v for v in {**ep.state_dict, **ep.constants}.values()
             if isinstance(v, torch.Tensor) and v.dtype == torch.int32]
    assert len(words) == 1
    np.testing.assert_array_equal(words[0].numpy(), _planar_engine_words(p["q"]))
    np.testing.assert_allclose(ep.module()(torch.from_numpy(x))[0].numpy(), _oracle(x, p), rtol=1e-4, atol=1e-4)


def test_weight_computed_in_the_graph_is_converted_in_forward():
    model, p = _model(signed=True, weight_through_identity=True)
    prog = lower_onnx(model)
    x = np.random.default_rng(2).standard_normal((4, K)).astype(np.float32)
    (got,) = prog(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), _oracle(x, p), rtol=1e-4, atol=1e-4)
    ep = torch.export.export(prog, (torch.from_numpy(x),))
    assert _bit_ops(ep)  # the traced path: the conversion is part of the program
    np.testing.assert_allclose(ep.module()(torch.from_numpy(x))[0].numpy(), _oracle(x, p), rtol=1e-4, atol=1e-4)


def test_initializer_shared_with_another_node_is_kept():
    model, p = _model(signed=True)
    model.graph.node.append(helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("w_f", TensorProto.FLOAT, [K, N]))
    prog = lower_onnx(model)
    x = np.random.default_rng(3).standard_normal((2, K)).astype(np.float32)
    y, w_f = prog(torch.from_numpy(x))
    np.testing.assert_array_equal(w_f.numpy(), p["q"].astype(np.float32))
    np.testing.assert_allclose(y.numpy(), _oracle(x, p), rtol=1e-4, atol=1e-4)


def test_prepare_errors_name_the_node():
    model, _ = _model(signed=True)
    model.graph.node[-1].attribute[0].i = 48  # block_size 48 does not divide K=64
    with pytest.raises(Exception, match="'gemm'.*block_size 48"):
        lower_onnx(model)
