"""`torch.ops.qcompile.fp8_block_gemm`: the FP8 block-scaled GEMM (1x128 activations, 128x128 weights) as a
`triton_op`.

The body branches on `x.device.type`: CPU (any non-CUDA device) -> the plain-torch reference; CUDA -> x is
block-quantized with aten ops (`format.quantize_activation_blocks`: AOTInductor fuses it into the kernel that
produces x), then
- sm90, eager calls: `torch.nn.functional.scaled_mm(xq, w_q.t(), sx, BlockWise1x128, sw,
  BlockWise128x128)`, bf16 out (cuBLASLt, torch's DeepSeek recipe; sm90 only). Scale layouts (kernel-anchors.md §3.2): `sx` (M, K/128)
  outer-dim-major (strides (1, M)); `sw` (round_up(K/128, 4), N/128) with strides (1, round_up(K/128, 4)),
  i.e. the transpose of w_scale [N/128, K/128] zero-padded along K/128. x is padded to a multiple of 4 rows;
  fast accumulation is off (torch rejects it for block scaling).
- compiled (engines) and other CUDA GPUs: the Triton kernel of `kernel.py` (bias and cast in its epilogue).
  On the H200 it was faster than cuBLASLt up to 64 rows on the largest shape, slower above
  (benchmarks/tune_fp8_block_w8a16.json). torch 2.11 does not export a `torch.cond` with `scaled_mm` in a
  branch, and an engine with `scaled_mm` alone fails when it runs (both measured on the H200; see
  tools/diag/scaled_mm_aoti.py for the open question whether an explicit `contraction_dim` avoids the
  second), so engines use this kernel at every M.
The bias is added in float32 after the GEMM and the result cast to x.dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.fp8_block_gemm.format import quantize_activation_blocks
from qcompile.plugins.gemm_dispatch import run_by_buckets
from qcompile.plugins.fp8_block_gemm.reference import check_args, fp8_block_gemm_reference

ROW_ALIGN = 4  # rows of x padded to a multiple of 4 for the sm90 block-scaled cuBLASLt GEMM


@torch.library.triton_op("qcompile::fp8_block_gemm", mutates_args={})
def fp8_block_gemm(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`y[..., N]` of the plugin contract (1x128 dynamic FP8 activations, 128x128 FP8 weights), in x.dtype."""
    if x.device.type != "cuda":
        return fp8_block_gemm_reference(x, w_q, w_scale, bias)
    check_args(x, w_q, w_scale, bias)
    n, k = (int(d) for d in w_q.shape)
    has_bias = bias is not None

    def triton_path(x2d, w_q, w_scale, *rest):
        from qcompile.plugins.fp8_block_gemm.kernel import fp8_block_gemm_triton

        xq, sx = quantize_activation_blocks(x2d)
        return fp8_block_gemm_triton(xq, sx, w_q, w_scale, rest[0] if has_bias else None, out_dtype=x2d.dtype,
                                     wrap=torch.library.wrap_triton)

    def cublas_path(x2d, w_q, w_scale, *rest):
        y = scaled_mm_blockwise(x2d, w_q, w_scale).to(torch.float32)
        if has_bias:
            y = y + rest[0].to(torch.float32)
        return y.to(x2d.dtype)

    # cuBLASLt only in eager calls: an AOTInductor package of torch 2.11 runs `scaled_mm` through its proxy
    # executor, which fails at run time on the H200 ("Expected IntList but got None"), so engines get the
    # Triton kernel (torch.compiler.is_compiling() holds while torch.export traces the op)
    eager_sm90 = torch.cuda.get_device_capability(x.device)[0] == 9 and not torch.compiler.is_compiling()
    path = cublas_path if eager_sm90 else triton_path
    return run_by_buckets(x, k, n, [(None, path)], (w_q, w_scale) + ((bias,) if has_bias else ()))


def scaled_mm_blockwise(x2d: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """bf16 [M, N] via `F.scaled_mm` block-wise scaling (sm90, cuBLASLt >= 12.9); see the module docstring."""
    from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

    m = x2d.shape[0]
    pad = (ROW_ALIGN - m % ROW_ALIGN) % ROW_ALIGN
    xq, sx = quantize_activation_blocks(torch.nn.functional.pad(x2d, (0, 0, 0, pad)))  # zero rows: scale = tiny
    kb = w_scale.shape[1]
    kb4 = (kb + 3) // 4 * 4
    sw = torch.nn.functional.pad(w_scale, (0, kb4 - kb)).t()  # (kb4, N/128), strides (1, kb4)
    y = scaled_mm(xq, w_q.t(), sx.t().contiguous().t(), ScalingType.BlockWise1x128, sw, ScalingType.BlockWise128x128,
                  swizzle_a=SwizzleType.NO_SWIZZLE, swizzle_b=SwizzleType.NO_SWIZZLE, output_dtype=torch.bfloat16)
    return y[:m]
