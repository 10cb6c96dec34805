"""`torch.ops.qcompile.fp4_gemm`: FP4 (NVFP4 / MXFP4) weight GEMM as a `triton_op`.

The body branches on `x.device.type` (as the INT4 op): CPU (any non-CUDA device) -> the plain-torch
reference; CUDA -> the Triton path of `kernel.py` (imported lazily; FP4 weights decoded in registers into
bf16/fp16 MMAs, split-K for M <= 16, a tiled kernel below 1024 rows, dequantize + cuBLAS above), launched
through `torch.library.wrap_triton` so AOTInductor compiles the kernels into the package. The body branches
only on device, dtypes, static shapes and static arguments (M is dispatched by `gemm_dispatch.run_by_buckets`),
so it traces with fake tensors and a dynamic M.

Changed (issue 5, item 3): CUDA runs the Triton kernels instead of the reference. W4A4 (`x_global` given):
x is fake-quantized to NVFP4 first, rounded to x.dtype (`act_quant.py`: one Triton pass, the same values as
`format.nvfp4_fake_quantize`), then the weight-only kernel runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.fp4_gemm.reference import check_args, fp4_gemm_fp8_large_m_reference, fp4_gemm_reference
from qcompile.plugins.gemm_dispatch import rows, scalar_buffer


@torch.library.triton_op("qcompile::fp4_gemm", mutates_args={})
def fp4_gemm(
    x: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    w_global: Optional[Tensor],
    x_global: Optional[Tensor],
    bias: Optional[Tensor],
    block_size: int,
    fp8_large_m: bool = False,
) -> Tensor:
    """`y[..., N] = x_hat @ dequant(W).T + bias` in x.dtype (see the plugin contract). `fp8_large_m`: above 128 rows
    the GEMM runs in FP8 (`plugins/fp8_large_m.py`; emulated off CUDA)."""
    if x.device.type != "cuda":
        reference = fp4_gemm_fp8_large_m_reference if fp8_large_m else fp4_gemm_reference
        return reference(x, w_packed, w_scale, w_global, x_global, bias, block_size)
    from qcompile.plugins.fp4_gemm.act_quant import nvfp4_fake_quantize_rows
    from qcompile.plugins.fp4_gemm.kernel import fp4_gemm_triton

    check_args(x, w_packed, w_scale, w_global, x_global, bias, block_size)
    w_global = None if w_global is None else scalar_buffer(w_global)  # the kernels take scalars as [1] tensors
    if x_global is not None:
        x_hat = nvfp4_fake_quantize_rows(rows(x, x.shape[-1]), scalar_buffer(x_global),
                                         wrap=torch.library.wrap_triton)
        x = x_hat.reshape(x.shape)
    return fp4_gemm_triton(x, w_packed, w_scale, w_global, bias, block_size, wrap=torch.library.wrap_triton,
                           num_sms=torch.cuda.get_device_properties(x.device).multi_processor_count,
                           fp8_large_m=fp8_large_m)
