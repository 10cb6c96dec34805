"""ONNX Runtime's `com.microsoft::MatMulNBits` (2/4/8-bit weights, `compiler/algorithms/ort_nbits.py`): the weight
dequantized once when the graph is lowered, then a float MatMul. This is the exact reference (calibration,
validation, and engines where the INT4 import pass declined the node); 4-bit nodes normally reach engines as INT4
GEMM plugins through `passes/import_matmul_nbits.py`."""
from __future__ import annotations

import torch
from onnx import numpy_helper

from qcompile.algorithms import ort_nbits
from qcompile.lowering.registry import Prepared
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor


def _dequantized_weight(ctx, constants: dict) -> Prepared | None:
    initializers = ctx.extra.get("initializers", {})
    if not {1, 2} <= set(initializers) or (len(ctx.extra["input_names"]) > 3 and ctx.extra["input_names"][3]
                                            and 3 not in initializers):
        raise ctx.fail("the weight, scales and zero points must be constant initializers")
    if len(ctx.extra["input_names"]) > 4 and ctx.extra["input_names"][4]:
        raise ctx.fail("g_idx (act-order) is not supported")
    read = lambda i: numpy_helper.to_array(initializers[i]) if i in initializers else None  # noqa: E731
    try:
        weight = ort_nbits.read(read(1), read(2), read(3), k=ctx.attr("K"), n=ctx.attr("N"), bits=ctx.attr("bits", 4),
                                block_size=ctx.attr("block_size"))
    except ValueError as exc:
        raise ctx.fail(str(exc)) from None
    return Prepared({"w": torch.from_numpy(weight.dequantize())}, (1, 2, 3))


@reg(ort_nbits.OP_TYPE, since=1, domain=ort_nbits.DOMAIN, prepare=_dequantized_weight)
def matmul_nbits(ctx, a, b=None, scales=None, zero_points=None, g_idx=None, bias=None, prepared=None):
    a = as_tensor(a)
    y = torch.matmul(a, prepared["w"].to(a.dtype))
    return y if bias is None else y + as_tensor(bias).to(y.dtype)
