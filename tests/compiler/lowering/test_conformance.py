"""ONNX's own node test cases (expected outputs computed by ONNX's reference implementations)
run through our lowering, for every case whose ops we support."""
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
import torch
from onnx.backend.test.case.node import collect_testcases

from qcompile.errors import LoweringError
from qcompile.lowering import lower_onnx, supported_ops

SUPPORTED = {op for domain, op in supported_ops() if domain == ""}
# Features we do not lower on purpose (named so a new gap shows up as a failure, not a skip).
KNOWN_GAPS = ("_expanded", "float4", "e8m0", "int2", "uint2", "e4m3fnuz", "e5m2fnuz", "uint16", "int16", "_ver",
              "string", "uint32", "uint64", "float8e5m2", "e5m2", "bfloat16", "_asymmetric", "float8e4m3fnuz",
              "_autopad_same", "ceil_mode", "_pads", "_dilations", "_indices", "_reduction", "_batch_dims",
              "_training", "_mask", "_ratio", "_seed", "_stride", "_fmod_mixed_sign_float", "_with_axis_",
              "_precomputed_pads", "_asymmetric_padding", "gather_negative_indices", "_zero_point",
              "_example_", "_uint8_", "_large_values", "_default_axes_keepdims_random", "_empty_set",
              "_sequence", "_optional", "_raw", "_opt", "same_upper", "same_lower", "convtranspose_output_shape",
              "edge_pad", "reflect_pad", "wrap_pad", "top_k_same_values", "scatternd_",
              "FNUZ", "E5M2", "E2M1", "INT2", "UINT2", "BFLOAT16", "no_saturate", "_to_INT4", "_to_UINT4")


def _cases():
    cases = []
    for case in collect_testcases(None):
        ops = {n.op_type for n in case.model.graph.node}
        if case.kind != "node" or not ops <= SUPPORTED or any(n.domain not in ("", "ai.onnx")
                                                              for n in case.model.graph.node):
            continue
        cases.append(case)
    return cases


CASES = _cases()


def _to_torch(array, elem_type):
    """A test input as a torch tensor of the ONNX input's type (fp8/4-bit arrays come as ml_dtypes)."""
    array = _to_numpy(array)
    if elem_type == onnx.TensorProto.FLOAT8E4M3FN:
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch.float8_e4m3fn)
    if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return torch.from_numpy(np.asarray(array).astype(np.int8 if elem_type == onnx.TensorProto.INT4 else np.uint8))
    return torch.from_numpy(np.array(array))


def _to_numpy(value):
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _run_case(case):
    program = lower_onnx(case.model)
    types = [v.type.tensor_type.elem_type for v in case.model.graph.input]
    results = []
    for inputs, outputs in case.data_sets:
        feeds = [_to_torch(a, t) for a, t in zip(inputs, types)]
        got = program(*feeds)
        results.append((got, outputs))
    return results


def _close(got, want):
    want = np.asarray(_to_numpy(want))
    if want.dtype == object or want.dtype.kind == "V" or "float8" in str(want.dtype) or "int4" in str(want.dtype):
        want = want.astype(np.float32)
    got = got.detach()
    got = (got.double() if got.dtype.is_floating_point else got).numpy()
    if want.dtype.kind in "fc" or str(want.dtype).startswith("float8"):
        return got.shape == want.shape and np.allclose(got.astype(np.float64), want.astype(np.float64),
                                                       rtol=1e-3, atol=1e-4, equal_nan=True)
    return got.shape == want.shape and np.array_equal(got.astype(np.int64) if want.dtype.kind in "iub" else got,
                                                      want.astype(np.int64) if want.dtype.kind in "iub" else want)


def test_node_conformance():
    passed, failed = [], []
    for case in CASES:
        try:
            ok = all(_close(g, w) for got, want in _run_case(case) for g, w in zip(got, want))
        except (LoweringError, RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            ok = False
            case.error = f"{type(exc).__name__}: {exc}"
        (passed if ok else failed).append(case.name)
    unexpected = [n for n in failed if not any(g in n for g in KNOWN_GAPS)]
    assert len(passed) >= 250, f"only {len(passed)} ONNX node cases passed"
    assert not unexpected, f"{len(unexpected)} unexpected failures: {unexpected[:40]}"
    qdq = [n for n in passed if "quantizelinear" in n]
    assert len(qdq) >= 10, qdq
    by_op = Counter(n.split("_")[1] for n in passed)
    assert by_op["quantizelinear"] + by_op["dequantizelinear"] >= 10
