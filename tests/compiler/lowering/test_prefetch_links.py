"""`LoweringOptions.prefetch_weights`: each INT4 GEMM plugin node gets the next one's engine weight (the same buffer,
not a copy) as the op's `prefetch`, in node order across other nodes; results do not change."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.lowering import LoweringOptions, lower_onnx
from qcompile.lowering import options as options_module
from qcompile.plugins.int4_gemm import onnx_schema

K, G = 64, 32


def _chain_model():
    """x -> gemm_a -> Relu -> gemm_b -> MatMul (float weight) -> gemm_c -> y, each INT4 GEMM K x K."""
    rng = np.random.default_rng(7)
    inits, nodes, value = [], [], "x"
    for step, name in enumerate(["gemm_a", "relu", "gemm_b", "matmul", "gemm_c"]):
        out = f"{name}_out"
        if name.startswith("gemm"):
            q = rng.integers(-8, 8, (K, K))
            inits += [helper.make_tensor(f"{name}_w", TensorProto.INT4, [K, K], q.reshape(-1).tolist()),
                      numpy_helper.from_array(rng.uniform(0.01, 0.1, (K // G, K)).astype(np.float32), f"{name}_s")]
            nodes.append(onnx_schema.make_node(name, [value, f"{name}_w", f"{name}_s"], [out], block_size=G))
        elif name == "relu":
            nodes.append(helper.make_node("Relu", [value], [out], name=name))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32) * 0.1, "mm_w"))
            nodes.append(helper.make_node("MatMul", [value, "mm_w"], [out], name=name))
        value = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info(value, TensorProto.FLOAT, ["m", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx_schema.add_to_model(model)
    return model


def _gemm_weights_and_prefetch(program, x) -> list[tuple[str, str | None]]:
    """(the buffer each INT4 op call reads as its weight, the buffer it gets as prefetch or None), in graph order,
    from the exported program."""
    ep = torch.export.export(program, (x,))
    buffer_of = dict(ep.graph_signature.inputs_to_buffers)
    op = torch.ops.qcompile.int4_groupwise_gemm.default
    names = [a.name for a in op._schema.arguments]
    calls = []
    for node in (n for n in ep.graph.nodes if n.target == op):
        args = dict(zip(names, node.args)) | dict(node.kwargs)
        prefetch = args.get("prefetch")
        calls.append((buffer_of[args["w_packed"].name], None if prefetch is None else buffer_of[prefetch.name]))
    return calls


def test_each_int4_gemm_gets_the_next_ones_weight_and_results_do_not_change():
    model = _chain_model()
    linked = lower_onnx(model, LoweringOptions(prefetch_weights=True))
    plain = lower_onnx(model, LoweringOptions())
    x = torch.randn(3, K)
    calls = _gemm_weights_and_prefetch(linked, x)
    assert len(calls) == 3 and len({w for w, _ in calls}) == 3
    assert [p for _, p in calls] == [calls[1][0], calls[2][0], None]  # a -> b -> c, across Relu and the MatMul
    assert all(p is None for _, p in _gemm_weights_and_prefetch(plain, x))
    assert torch.equal(linked(x)[0], plain(x)[0])
    # a second reference to the same buffer: the program holds no more tensors than without the links
    assert len(list(linked.buffers())) == len(list(plain.buffers()))


def test_engines_on_cuda_take_the_default_and_cpu_engines_never_link(monkeypatch):
    for default in (False, True):
        monkeypatch.setattr(options_module, "PREFETCH_WEIGHTS_ON_CUDA", default)
        assert LoweringOptions.for_engine("cuda").prefetch_weights is default
        assert LoweringOptions.for_engine("cpu").prefetch_weights is False
        assert LoweringOptions.for_engine("cuda", prefetch_weights=not default).prefetch_weights is (not default)
