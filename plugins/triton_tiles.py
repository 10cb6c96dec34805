"""Triton helpers shared by the GEMM plugins' kernels (CUDA only; imported lazily: CPU machines have no Triton)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row tiles share each weight tile in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_rows, (pid % in_group) // group_rows


@triton.jit
def store_tile(y_ptrs, acc, mask, ATOMIC: tl.constexpr):
    """Write an fp32 tile: added with fp32 atomics (split-K partial sums), else stored in y's dtype."""
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
