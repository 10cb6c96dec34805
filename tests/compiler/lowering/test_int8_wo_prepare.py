"""The W8A16 plugin's weight reaches the engine layout (int8 [N, K], the transpose of ONNX's [K, N]) once, when the
graph is lowered (prepare hook), and a weight the graph computes is transposed in the traced forward."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.lowering import lower_onnx
from qcompile.plugins.int8_wo_gemm import onnx_schema

K, N = 48, 40  # K != N: a weight left in the ONNX layout would have the wrong shape


def _model(weight_through_identity: bool = False) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(7)
    p = {"q": rng.integers(-127, 128, (K, N)).astype(np.int8),
         "scale": rng.uniform(0.01, 0.1, N).astype(np.float32), "bias": rng.standard_normal(N).astype(np.float32)}
    inits = [numpy_helper.from_array(p["q"], "w_q"), numpy_helper.from_array(p["scale"], "w_scale"),
             numpy_helper.from_array(p["bias"], "bias")]
    nodes, weight = [], "w_q"
    if weight_through_identity:  # a weight the graph computes: not an initializer of the plugin node
        nodes.append(helper.make_node("Identity", ["w_q"], ["w_q_id"]))
        weight = "w_q_id"
    nodes.append(onnx_schema.make_node("gemm", ["x", weight, "w_scale", "bias"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx_schema.add_to_model(model)
    return model, p


def _oracle(x: np.ndarray, p: dict) -> np.ndarray:
    """float64 numpy from the ONNX values: x @ (q * scale) + bias, q [K, N]."""
    return x.astype(np.float64) @ (p["q"].astype(np.float64) * p["scale"].astype(np.float64)) + p["bias"]


def _int8_constants(ep) -> list[torch.Tensor]:
    consts = {**ep.state_dict, **ep.constants}
    return [v for v in consts.values() if isinstance(v, torch.Tensor) and v.dtype == torch.int8]


def _transposes(ep) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"
            and any(t in str(n.target) for t in ("transpose", "permute", ".t.", "aten.t"))]


def test_exported_program_holds_the_transposed_weight_once():
    model, p = _model()
    prog = lower_onnx(model)
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    ep = torch.export.export(prog, (torch.from_numpy(x),),
                             dynamic_shapes=(({0: torch.export.Dim("m", min=1, max=64)},),))
    weights = _int8_constants(ep)
    assert len(weights) == 1  # the ONNX-layout bytes are not kept next to the engine weight
    assert tuple(weights[0].shape) == (N, K) and weights[0].is_contiguous()
    np.testing.assert_array_equal(weights[0].numpy(), p["q"].T)
    assert _transposes(ep) == []
    for m in (1, 5):
        xm = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
        (got,) = ep.module()(torch.from_numpy(xm))
        np.testing.assert_allclose(got.numpy(), _oracle(xm, p), rtol=1e-4, atol=1e-4)


def test_weight_computed_in_the_graph_is_transposed_in_forward():
    model, p = _model(weight_through_identity=True)
    prog = lower_onnx(model)
    x = np.random.default_rng(2).standard_normal((4, K)).astype(np.float32)
    (got,) = prog(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), _oracle(x, p), rtol=1e-4, atol=1e-4)
    ep = torch.export.export(prog, (torch.from_numpy(x),))
    assert _transposes(ep)  # the traced path: the transpose is part of the program


def test_a_weight_that_is_not_int8_is_refused_with_the_node_name():
    model, _ = _model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((K, N), np.int16), "w_q"))
    with pytest.raises(Exception, match="'gemm'.*w_q must be INT8"):
        lower_onnx(model)
