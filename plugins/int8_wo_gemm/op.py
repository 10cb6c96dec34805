"""`torch.ops.qcompile.int8_weight_only_gemm`: the INT8 weight-only GEMM (W8A16) as a `triton_op`.

The body branches on `x.device.type` (as the INT4 and scaled-GEMM plugins): CPU (any non-CUDA device) -> the
plain-torch reference; CUDA -> `kernel.int8_wo_gemm_triton` (imported lazily), whose kernel is launched through
`torch.library.wrap_triton` so AOTInductor compiles it into the package. It branches only on device, dtypes
and static shapes (M is dispatched in `kernel.py`), so it traces with fake tensors and a dynamic M.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.int8_wo_gemm.reference import int8_wo_gemm_reference


@torch.library.triton_op("qcompile::int8_weight_only_gemm", mutates_args={})
def int8_weight_only_gemm(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`y[..., N] = x @ (w_q * w_scale[:, None])^T + bias` in x.dtype, w_q int8 [N, K] (see the plugin
    contract)."""
    if x.device.type != "cuda":
        return int8_wo_gemm_reference(x, w_q, w_scale, bias)
    from qcompile.plugins.int8_wo_gemm.kernel import int8_wo_gemm_triton

    return int8_wo_gemm_triton(x, w_q, w_scale, bias, wrap=torch.library.wrap_triton,
                               num_sms=torch.cuda.get_device_properties(x.device).multi_processor_count)
