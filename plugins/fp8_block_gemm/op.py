"""`torch.ops.qcompile.fp8_block_gemm`: the FP8 block-scaled GEMM (1x128 activations, 128x128 weights) as a
`triton_op`.

The body branches on `x.device.type`: CPU (any non-CUDA device) -> the plain-torch reference; CUDA:
- up to `kernel.ROW_DOT_MAX_M` (16) rows (unless `ROW_DOT_WITH_CUBLAS` is False), and at every M on GPUs other
  than sm90 and where K/128 is not a multiple of 4: x is block-quantized with aten ops
  (`format.quantize_activation_blocks`: AOTInductor fuses them into the kernel that produces x), then a Triton
  GEMM of `kernel.py` (bias and cast in its epilogue):
  the row-dot kernel up to 16 rows, the tile kernel above;
- sm90 above 16 rows (`uses_cublas`): x is quantized by our Triton kernel (`kernel.quantize_blocks_triton`: one
  pass, the scales written K-block-major; Inductor's code for the aten ops writing that layout took 2-7x its
  byte floor in benchmarks/tune_fp8_block_v1.json; our kernel has not been timed alone), then cuBLASLt
  block-wise scaling through `torch._scaled_mm`, which infers the 1x128 x 128x128 recipe from the scale
  shapes: `sx` (M, K/128) with strides (1, M); `w_scale.t()` (K/128, N/128). torch 2.11 checks these shapes
  (the K/128 padded to a multiple of 4 that kernel-anchors.md §3.2 describes for `F.scaled_mm` is refused),
  but cuBLASLt reads the weight scales with a leading dimension rounded up to 4: with K/128 = 2 or 3 the
  results were wrong on the H200 (test_cuda_op_matches_float64), so such layers keep the Triton kernel. x gets
  zero rows up to a multiple of 4; fast accumulation is off (torch rejects it for block scaling). For bf16 and
  fp16 x the GEMM writes x.dtype and adds the bias in its epilogue (cuBLASLt's float32 sum, one rounding; the
  bias first rounded to x.dtype, as a Linear layer of that dtype holds it): a separate bias kernel cost
  8-26% of the op at M >= 1024 (benchmarks/row_gemv_probe.json, part E). float32 x: bf16 out, the bias added
  after (`gemm_dispatch.add_bias`).
With a symbolic M (engines) the choice is a `torch.cond` (`gemm_dispatch.run_by_buckets`). The earlier form,
`torch.nn.functional.scaled_mm` (`aten::_scaled_mm_v2`, list and enum arguments), could neither be exported
inside a `torch.cond` nor run from an AOTInductor package on the H200 (proxy executor: "Expected IntList but got
None"); `aten::_scaled_mm` has a plain schema and a C shim.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompile.plugins.fp8_block_gemm.format import BLOCK, quantize_activation_blocks
from qcompile.plugins.gemm_dispatch import add_bias, identity, run_by_buckets
from qcompile.plugins.fp8_block_gemm.reference import check_args, fp8_block_gemm_reference

ROW_ALIGN = 4  # rows of x padded to a multiple of 4 for the sm90 block-scaled cuBLASLt GEMM
# Where the cuBLASLt path runs above 16 rows: whether 1-16 rows take the Triton row kernel (True) or cuBLASLt too.
# As lone ops cuBLASLt was faster at 1-16 rows; in an engine, where the row path's quantization of x fuses into x's
# producer, it was slower: mlp-large 0.238 against 0.190 ms per token (tools/bench_engines.py variant
# fp8-block-cublas-small-m, which sets this False; H100, BENCHMARKS.md thirty-fifth session).
ROW_DOT_WITH_CUBLAS = True
GEMM_OUT_DTYPES = (torch.bfloat16, torch.float16)  # x dtypes the cuBLASLt GEMM writes itself, bias included


@torch.library.triton_op("qcompile::fp8_block_gemm", mutates_args={})
def fp8_block_gemm(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`y[..., N]` of the plugin contract (1x128 dynamic FP8 activations, 128x128 FP8 weights), in x.dtype."""
    if x.device.type != "cuda":
        return fp8_block_gemm_reference(x, w_q, w_scale, bias)
    check_args(x, w_q, w_scale, bias)
    n, k = (int(d) for d in w_q.shape)
    has_bias = bias is not None
    from qcompile.plugins.fp8_block_gemm.kernel import ROW_DOT_MAX_M, fp8_block_gemm_triton, fp8_row_dot_triton

    def triton_path(gemm):
        def run(x2d, w_q, w_scale, *rest):
            xq, sx = quantize_activation_blocks(x2d)
            return gemm(xq, sx, w_q, w_scale, rest[0] if has_bias else None, out_dtype=x2d.dtype,
                        wrap=torch.library.wrap_triton)
        return run

    def cublas_path(x2d, w_q, w_scale, *rest):
        return scaled_mm_blockwise(x2d, w_q, w_scale, rest[0] if has_bias else None, wrap=torch.library.wrap_triton)

    # above 16 rows cuBLASLt won 15 of 16 cells on the H200 (tools/tune_fp8_block_w8a16.py)
    cublas = uses_cublas(k, torch.cuda.get_device_capability(x.device))
    buckets = [(None, cublas_path if cublas else triton_path(fp8_block_gemm_triton))]
    if ROW_DOT_WITH_CUBLAS or not cublas:
        buckets.insert(0, (ROW_DOT_MAX_M, triton_path(fp8_row_dot_triton)))
    return run_by_buckets(x, k, n, buckets, (w_q, w_scale) + ((bias,) if has_bias else ()))


def uses_cublas(k: int, capability: tuple[int, int]) -> bool:
    """Whether rows above 16 go to cuBLASLt (sm90 with K/128 a multiple of 4) rather than the Triton tile kernel
    (see the module docstring)."""
    return capability[0] == 9 and (k // BLOCK) % ROW_ALIGN == 0


def scaled_mm_blockwise(x2d: Tensor, w_q: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None, *,
                        wrap=identity) -> Tensor:
    """`y [M, N] = x2d @ dequant(w)^T + bias` in x2d.dtype via `torch._scaled_mm` block-wise scaling (sm90,
    cuBLASLt >= 12.9), the bias in the GEMM's epilogue for bf16 / fp16 x; see the module docstring."""
    from qcompile.plugins.fp8_block_gemm.kernel import quantize_blocks_triton

    m = x2d.shape[0]
    xq, sx = quantize_blocks_triton(x2d, ROW_ALIGN, wrap=wrap)
    fused = x2d.dtype in GEMM_OUT_DTYPES
    out_dtype = x2d.dtype if fused else torch.bfloat16
    gemm_bias = bias.to(out_dtype) if fused and bias is not None else None
    y = torch._scaled_mm(xq, w_q.t(), sx, w_scale.t(), bias=gemm_bias, out_dtype=out_dtype)[:m]
    return y if fused else add_bias(y, bias, x2d.dtype)
