"""`torch.ops.qcompile.int4_groupwise_gemm`: groupwise INT4 weight-only GEMM (W4A16) as a `triton_op`.

The body branches on `x.device.type` (as `scaled_gemm`): CPU (any non-CUDA device) -> the plain-torch
reference; CUDA -> the Triton path of `kernel.py` (imported lazily), whose kernels are launched through
`torch.library.wrap_triton` so AOTInductor compiles them into the package. The body branches only on
device, dtypes and static shapes (M is dispatched arithmetically, see `kernel.py`), so it traces with
fake tensors and a dynamic M.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.int4_gemm.reference import int4_gemm_reference


@torch.library.triton_op("qcompile::int4_groupwise_gemm", mutates_args={})
def int4_groupwise_gemm(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_zero: Optional[Tensor],
    bias: Optional[Tensor],
    group_size: int,
) -> Tensor:
    """`y[..., N] = x @ ((q - zp) * scale) + bias` in x.dtype (see the plugin contract)."""
    if x.device.type != "cuda":
        return int4_gemm_reference(x, w_packed, w_scale, w_zero, bias, group_size)
    from qcompile.plugins.int4_gemm.kernel import int4_gemm_triton

    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return int4_gemm_triton(x, w_packed, w_scale, w_zero, bias, group_size,
                            wrap=torch.library.wrap_triton, num_sms=sms)
