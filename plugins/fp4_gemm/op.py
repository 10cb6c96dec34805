"""`torch.ops.qcompile.fp4_gemm`: FP4 (NVFP4 / MXFP4) weight GEMM as a `triton_op`.

Every device runs the plain-torch reference for now (dequantize W to float32, matmul; NVFP4 activation
fake-quantization as aten ops that Inductor fuses). The Triton kernel (weights decompressed in registers,
split-K for small M, as `int4_gemm/kernel.py`) is not written yet: on CUDA this op is correct but
dequantizes the whole weight per call, so it is not the fast path issue 5 asks for.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.fp4_gemm.reference import fp4_gemm_reference


@torch.library.triton_op("qcompile::fp4_gemm", mutates_args={})
def fp4_gemm(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_global: Optional[Tensor],
    x_global: Optional[Tensor],
    bias: Optional[Tensor],
    block_size: int,
) -> Tensor:
    """`y[..., N] = x_hat @ dequant(W).T + bias` in x.dtype (see the plugin contract)."""
    return fp4_gemm_reference(x, w_packed, w_scale, w_global, x_global, bias, block_size)
