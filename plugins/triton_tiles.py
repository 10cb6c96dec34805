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


@triton.jit
def pair_order(r):
    """K offset inside its 8-value word of position r (0..7) of a pair-decoded 4-bit tile (INT4 `_pairs`, FP4
    `_e2m1_pairs`): the word is shifted by 4p (p = 0..3) and each shift yields nibbles p and p + 4 as one
    register of two 16-bit floats, so r = 4a + 2b + h holds nibble p + 4h with p = 2b + a. x's tile is loaded
    in this order, so the MMA needs no register shuffling."""
    return 2 * ((r >> 1) & 1) + (r >> 2) + 4 * (r & 1)


@triton.jit
def word_shifts(words):
    """[..., W] -> [..., W, 2, 2]: entry (a, b) is words >> 4(2b + a) (the shifts of `pair_order`)."""
    return tl.join(tl.join(words, words >> 4), tl.join(words >> 8, words >> 12))
