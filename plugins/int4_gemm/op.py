"""`torch.ops.qcompile.int4_groupwise_gemm`: groupwise INT4 GEMM (W4A16, and W4A8 with FP8 activations)
as a `triton_op`.

The body branches on `x.device.type` (as `scaled_gemm`): CPU (any non-CUDA device) -> the plain-torch
reference; CUDA -> the Triton path of `kernel.py` (imported lazily), whose kernels are launched through
`torch.library.wrap_triton` so AOTInductor compiles them into the package. The body branches only on
device, dtypes, static shapes and the static arguments (M is dispatched arithmetically, see `kernel.py`),
so it traces with fake tensors and a dynamic M.

W4A8 (`x_scale` given, or `x_dynamic`): x is quantized to FP8 E4M3 here with aten ops
(`reference.quantize_activation_fp8`: ONNX QuantizeLinear rules, saturating, round to nearest even), which
AOTInductor fuses into the kernel producing x; the GEMM then reads xq [M, K] and one float32 scale per row.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.int4_gemm.reference import (check_activation_args, check_args, int4_gemm_fp8_large_m_reference,
                                                  int4_gemm_reference, int4_gemm_w4a8_reference,
                                                  quantize_activation_fp8)


@torch.library.triton_op("qcompile::int4_groupwise_gemm", mutates_args={})
def int4_groupwise_gemm(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Optional[Tensor],
    bias: Optional[Tensor],
    group_size: int,
    x_scale: Optional[Tensor] = None,
    x_dynamic: bool = False,
    fp8_large_m: bool = False,
) -> Tensor:
    """`y[..., N] = A(x) @ ((q - zp) * scale) + bias` in x.dtype, A = identity (W4A16) or FP8 Q/DQ (W4A8).
    `fp8_large_m`: above 128 rows the GEMM runs in FP8 (`plugins/fp8_large_m.py`; emulated off CUDA)."""
    if x_scale is None and not x_dynamic:
        if x.device.type != "cuda":
            if fp8_large_m:
                return int4_gemm_fp8_large_m_reference(x, None, w_packed, w_scale, w_zero, bias, group_size, x.dtype)
            return int4_gemm_reference(x, w_packed, w_scale, w_zero, bias, group_size)
        from qcompile.plugins.int4_gemm.kernel import int4_gemm_triton

        return int4_gemm_triton(x, w_packed, w_scale, w_zero, bias, group_size,
                                wrap=torch.library.wrap_triton, num_sms=_num_sms(x), fp8_large_m=fp8_large_m)
    check_args(x, w_packed, w_scale, w_zero, bias, group_size)
    check_activation_args(x_scale, x_dynamic)
    xq, x_row_scale = quantize_activation_fp8(x, x_scale, x_dynamic)
    if x.device.type != "cuda" and fp8_large_m:
        y = int4_gemm_fp8_large_m_reference(xq, x_row_scale, w_packed, w_scale, w_zero, bias, group_size, x.dtype)
    elif x.device.type != "cuda":
        y = int4_gemm_w4a8_reference(xq, x_row_scale, w_packed, w_scale, w_zero, bias, group_size, x.dtype)
    else:
        from qcompile.plugins.int4_gemm.kernel import int4_gemm_triton

        y = int4_gemm_triton(xq, w_packed, w_scale, w_zero, bias, group_size, x_row_scale=x_row_scale,
                             out_dtype=x.dtype, wrap=torch.library.wrap_triton, num_sms=_num_sms(x),
                             fp8_large_m=fp8_large_m)
    return y.reshape(*x.shape[:-1], w_packed.shape[1])


def _num_sms(x: Tensor) -> int:
    return torch.cuda.get_device_properties(x.device).multi_processor_count
