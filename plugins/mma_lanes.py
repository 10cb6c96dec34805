"""Inline-PTX helpers for kernels that feed `mma.sync` from registers they load themselves (CUDA only).

Such a kernel computes which element of an MMA fragment each thread holds from the thread's own `%tid.x`, never
from Triton's element index, so it is correct whatever register layout Triton gives its [32 * num_warps] tensors:
each such tensor holds one value per thread. Used by the INT4 tensor-core GEMV (`int4_gemm.mma_gemv`) and the
W8A16 small-M kernel (`int8_wo_gemm.mma_rows`).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def thread_index(like):
    """`%tid.x` of the thread that holds each element of `like` (an int32 tensor)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def load_live(at, live, EVEN: tl.constexpr):
    """tl.load of `at`, 0 where not live (EVEN: no mask)."""
    if EVEN:
        return tl.load(at)
    return tl.load(at, mask=live, other=0)


@triton.jit
def half_pair(lo, hi):
    """int32 of the fp16 pair (lo, hi) (low half lo)."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def mma_f16(a0, a1, a2, a3, b0, b1, e0, e1, e2, e3):
    """(e0 .. e3) + A B: one `mma.sync` m16n8k16 on fp16 operands with fp32 accumulators (A: the 4 fp16x2 registers
    a0 .. a3 of the thread's lane, B: b0, b1; the 4 accumulators and the result in the hardware's lane order)."""
    return tl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
        "{$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, e0, e1, e2, e3],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
