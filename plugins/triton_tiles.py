"""Triton helpers shared by the GEMM plugins' kernels (CUDA only; imported lazily: CPU machines have no Triton)."""
from __future__ import annotations

import inspect

import triton
import triton.language as tl


def jit_any_m(fn):
    """`triton.jit` for a kernel whose row count an engine leaves dynamic: M (and M_OUT where present) compiles as
    any value, never as Triton's variant for a multiple of 16 or for 1, so eager calls (tests, benchmarks) run the
    code that engines run. On the H200 the INT4 tile op at 64 rows of 8192 x 28672 took 103 µs specialized and
    114 µs compiled as engines compile it (twenty-first session)."""
    return triton.jit(fn, do_not_specialize=[a for a in ("M", "M_OUT") if a in inspect.signature(fn).parameters])


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
def finish_split_tile(acc, mask, out_ptrs, bias_ptrs, acc_ptrs, count_ptr, splits, ATOMIC: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
    """Write a program's fp32 tile as `y (+ bias)` in out's dtype, so no kernel after the GEMM casts it or adds
    the bias. ATOMIC (K split in `splits`): `acc` is one split's partial sum, added into a zeroed fp32
    accumulator at `acc_ptrs`; each program then adds 1.0 to the tile's count (a zeroed fp32 at `count_ptr`: float
    counts are exact), and the program that brings it to `splits` reads the total back and writes it. The barrier
    before the count's acq_rel atomic orders every thread's partial sums before it (the count is one thread's
    atomic); the total is read through L2 (`.cg`), where the atomics landed."""
    if ATOMIC:
        tl.atomic_add(acc_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(count_ptr, 1.0, sem="acq_rel") == splits - 1:
            total = tl.load(acc_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def finish_swapped_tile(acc, at, mask, offs_m, offs_n, M, N, y_ptr, out_ptr, b_ptr, ATOMIC: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
    """`finish_split_tile` for a swapped-operand tile of y [M, N] on a grid (N tiles, K splits, M tiles): acc
    [BLOCK_N, BLOCK_M] holds the output features offs_n of x's rows offs_m, at [BLOCK_N, BLOCK_M] their offsets in
    y. Split K: y_ptr is the zeroed fp32 accumulator [M * N], followed by one count per (M tile, N tile)
    (`gemm_dispatch.split_k_outputs`)."""
    count_ptr = y_ptr + M * N + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    finish_split_tile(acc, mask, out_ptr + at, b_ptr + offs_n[:, None] + 0 * offs_m[None, :], y_ptr + at, count_ptr,
                      tl.num_programs(1), ATOMIC, HAS_BIAS)


@triton.jit
def load_tile(ptrs, ok, EVEN: tl.constexpr, STREAM: tl.constexpr = False):
    """tl.load of ptrs, 0 where not ok; EVEN (the tile lies inside the tensor): no mask, so the mask's
    computation is dead code. STREAM: evict first (weights are read once)."""
    if EVEN:
        return tl.load(ptrs, eviction_policy="evict_first" if STREAM else "")
    return tl.load(ptrs, mask=ok, other=0, eviction_policy="evict_first" if STREAM else "")


@triton.jit
def xt_columns(x_ptr, offs_m, M, stride_xm, BLOCK_K: tl.constexpr):
    """Pointers of x^T [BLOCK_K, BLOCK_M] at K 0 .. BLOCK_K - 1 for the rows offs_m of x, for a swapped-operand
    GEMM (formed once; a step adds its K offset). Rows past M wrap around to row offs_m % M, so `load_xt_rows`
    needs no row mask (the caller's store drops those rows) and the loop does not depend on M, which an engine
    leaves dynamic. On the H200 the INT4 tile op ran 1.05-1.15x faster this way than with row masks at 40-128 rows
    (M compiled as any value, as in an engine), except 4096 x 14336 at 40 and 64 rows (0.89x). Pointing
    those rows at row M - 1 instead made the 128-row tile 1.2-1.7x slower at M = 100, likely because every
    program then reads row 99 29 times per step. Needs M >= 1: for kernels whose grid runs over M tiles, which
    launch no program when M = 0."""
    return x_ptr + (offs_m % M).to(tl.int64)[None, :] * stride_xm + tl.arange(0, BLOCK_K)[:, None]


@triton.jit
def load_xt_rows(x_cols, k0, K, EVEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """x^T [BLOCK_K, BLOCK_M] at K k0 .. k0 + BLOCK_K - 1 from `xt_columns`' pointers (every row loads); past K
    reads 0 unless EVEN (whole steps: no mask at all)."""
    if EVEN:
        return tl.load(x_cols + k0)
    return tl.load(x_cols + k0, mask=(k0 + tl.arange(0, BLOCK_K) < K)[:, None], other=0.0)


@triton.jit
def load_xt_step(x_cols, k0, mask_m, K, EVEN: tl.constexpr, BLOCK_K: tl.constexpr):
    """x^T [BLOCK_K, BLOCK_M] at K k0 .. k0 + BLOCK_K - 1 of a swapped-operand GEMM, from x_cols (the pointers
    at K 0 .. BLOCK_K - 1, formed once); rows past M read 0, and past K too unless EVEN (whole steps). For
    kernels whose grid does not run over M (M may be 0); the others use `xt_columns` and `load_xt_rows`."""
    if EVEN:
        return tl.load(x_cols + k0, mask=mask_m[None, :], other=0.0)
    return tl.load(x_cols + k0, mask=mask_m[None, :] & (k0 + tl.arange(0, BLOCK_K) < K)[:, None], other=0.0)
