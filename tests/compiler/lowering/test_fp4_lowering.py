"""FP4 DequantizeLinear through our lowering: ONNX's own backend test cases for FLOAT4E2M1, and blocked /
two-level FP4 DQ against ONNX's reference evaluator; validation falls back to our lowering for FP4 graphs."""
import warnings

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompile.lowering import lower_onnx


def _fp4_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    # every op's cases, filtered here: the collector's registry is global and keeps what the first call
    # collected (asking for DequantizeLinear first left test_conformance with only those cases)
    return [c for c in cases if "float4e2m1" in c.name
            and all(n.op_type == "DequantizeLinear" for n in c.model.graph.node)]


def _feed(array, elem_type):
    array = numpy_helper.to_array(array) if isinstance(array, onnx.TensorProto) else np.asarray(array)
    if elem_type == T.FLOAT4E2M1:  # the lowering holds FP4 as its float values
        return torch.from_numpy(np.asarray(array).astype(np.float32))
    if elem_type == T.FLOAT8E4M3FN:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(np.array(array))


def test_onnx_backend_cases_for_fp4_dequantize_linear():
    cases = _fp4_cases()
    assert cases, "no FLOAT4E2M1 DequantizeLinear case in the installed onnx"
    for case in cases:
        program = lower_onnx(case.model)
        types = [v.type.tensor_type.elem_type for v in case.model.graph.input]
        for inputs, outputs in case.data_sets:
            got = program(*[_feed(a, t) for a, t in zip(inputs, types)])
            for g, w in zip(got, outputs):
                np.testing.assert_array_equal(g.numpy(), np.asarray(w), err_msg=case.name)


@pytest.mark.parametrize("two_level", [False, True])
def test_blocked_fp4_dequantize_matches_reference_evaluator(two_level):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (6, 64)).astype(np.uint8)
    w = numpy_helper.from_array(codes.view(ml_dtypes.float4_e2m1fn), "w")
    if two_level:
        s8 = (rng.random((6, 4)) * 400 + 0.01).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
        inits = [w, numpy_helper.from_array(s8, "s8"), numpy_helper.from_array(np.array(3e-4, np.float32), "g")]
        nodes = [helper.make_node("DequantizeLinear", ["s8", "g"], ["s"]),
                 helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=-1, block_size=16)]
    else:
        s = np.exp2(rng.integers(-8, 8, (6, 2))).astype(np.float32)
        inits = [w, numpy_helper.from_array(s, "s")]
        nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=-1, block_size=32)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", T.FLOAT, [6, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    want = ReferenceEvaluator(model).run(None, {})[0]
    got = lower_onnx(model, compute_dtype=torch.float64)()[0]
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float64))


def test_validation_reference_falls_back_to_our_lowering_for_fp4():
    from qcompile.validation.validate import _reference_runner

    s = np.ones((6, 2), np.float32)
    w = numpy_helper.from_array(np.zeros((6, 64), np.uint8).view(ml_dtypes.float4_e2m1fn), "w")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=-1, block_size=32),
         helper.make_node("MatMul", ["x", "wd"], ["y"])], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 6])], [helper.make_tensor_value_info("y", T.FLOAT, [2, 64])],
        [w, numpy_helper.from_array(s, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    runner, desc = _reference_runner(model, "fp32", "m")
    assert desc["runtime"] == "qcompile lowering, float64" and "ONNX Runtime cannot run" in desc["note"]
