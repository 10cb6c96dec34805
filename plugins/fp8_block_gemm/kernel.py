"""Triton kernels of `qcompile::fp8_block_gemm` (imported lazily: CPU machines have no Triton).

`_fp8_block_kernel` (above `ROW_DOT_MAX_M` rows on CUDA GPUs other than sm90, and where sm90's cuBLASLt path
does not apply):
one program per [BLOCK_M, 128] output tile (one weight-scale row block; grouped tile order for L2 reuse); for each
128-wide K block it computes the FP8 x FP8 dot into a fresh float32 partial sum and adds it to the float32
accumulator scaled by `x_scale[m, kb] * w_scale[n // 128, kb]` (DeepSeek's per-block promotion: the tensor
core's reduced-precision FP8 accumulation never spans more than 128 products). The bias is added in float32
and the result stored in the requested dtype. `FP32_DOT` upcasts the operands and uses an IEEE float32 dot
(the Triton CPU interpreter, which has no FP8 dot). The K-block count is a compile-time constant (K is a
weight dimension, static per layer). Measured and not adopted (benchmarks/tune_fp8_block_v1.json): 256-wide
tiles (two weight-scale blocks) and x scales stored K-block-major for coalesced scale loads; neither beat
this form. cuBLASLt beat every tile in 15 of the 16 cells from 64 rows up; at 16 rows this kernel was faster
(benchmarks/tune_fp8_block_w8a16.json).

`_fp8_row_dot_kernel` (up to `ROW_DOT_MAX_M` = 16 rows, every GPU): the same math with operands swapped, each
program owning 32 weight rows over all of K (N / 32 programs where the tile kernel has N / 128: at M <= 16 the job
is streaming the weight, and 128-row programs left the H200 mostly idle on narrow layers).

`_quantize_blocks_kernel` (the sm90 cuBLASLt path): x -> FP8 1x128 blocks and their scales in one pass, the
scales written K-block-major ([K/128, M] in memory), as cuBLASLt reads them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.fp8_block_gemm.format import BLOCK
from qcompile.plugins.formats import MIN_SCALE, qmax
from qcompile.plugins.gemm_dispatch import identity, optional_arg
from qcompile.plugins.triton_tiles import grouped_tile, jit_any_m

# Launch configuration (BLOCK_N is the weight block, 128): chosen from tools/tune_fp8_block_w8a16.py on the H200.
CONFIG = dict(BLOCK_M=64, GROUP_M=8, num_warps=8, num_stages=4)
# Up to ROW_DOT_MAX_M rows: weight rows per program (a divisor of 128), warps, stages; the best of six in a probe
# on the H200 (tools/diag/row_kernels_next.py part F at commit ca76487, benchmarks/row_kernels_next.json): faster
# than the tile kernel (N / 128 programs) in 11 of 12 cells at M = 1 and 16 on six shapes (up to 35%), 1% slower
# at 8192 x 28672, M = 16.
ROW_DOT_MAX_M = 16
ROW_DOT = dict(BLOCK_N=32, num_warps=4, num_stages=4)


@jit_any_m
def _fp8_block_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K,
    KB: tl.constexpr, FP32_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), N // BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * K
    b_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BLOCK_K + offs_k
        a = tl.load(a_rows + k[None, :], mask=mask_m[:, None])
        b = tl.load(b_cols + k[:, None], mask=mask_n[None, :])
        if FP32_DOT:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, b)
        sa = tl.load(xs_ptr + offs_m.to(tl.int64) * KB + kb, mask=mask_m, other=0.0)
        sb = tl.load(ws_ptr + pid_n * KB + kb)
        acc += part * (sa[:, None] * sb)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def fp8_block_gemm_triton(xq, x_scale, w_q, w_scale, bias=None, *, out_dtype=torch.float32, wrap=identity,
                          fp32_dot: bool = False, config: dict | None = None) -> torch.Tensor:
    """`sum_kb x_scale * w_scale * (xq . w_q) (+ bias)` of the contract [M, N] in `out_dtype`, from quantized x."""
    cfg = config or CONFIG
    m, k = xq.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * (n // BLOCK), 1, 1)
    wrap(_fp8_block_kernel)[grid](
        xq, x_scale, w_q, w_scale, optional_arg(bias, w_scale), y, m, n, k,
        KB=k // BLOCK, FP32_DOT=fp32_dot, HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=BLOCK,
        BLOCK_K=BLOCK, GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


@jit_any_m
def _fp8_row_dot_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K,
    KB: tl.constexpr, FP32_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Up to BLOCK_M rows of x: y^T [BLOCK_N, BLOCK_M] for BLOCK_N weight rows (inside one 128-row scale block),
    swapped operands (the FP8 weight rows are the MMA's wide side), per 128-K block the FP8 dot promoted to the
    float32 accumulator with `w_scale[n // 128, kb] * x_scale[m, kb]`; bias and cast in the kernel."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    row_block = (pid_n * BLOCK_N) // 128
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * 128 + tl.arange(0, 128)
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None], eviction_policy="evict_first")
        xt = tl.load(xq_ptr + offs_m[None, :] * K + k[:, None], mask=mask_m[None, :])
        if FP32_DOT:
            part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w, xt)
        sx = tl.load(xs_ptr + offs_m * KB + kb, mask=mask_m, other=0.0)
        acc += part * (tl.load(ws_ptr + row_block * KB + kb) * sx)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_m[None, :])


def fp8_row_dot_triton(xq, x_scale, w_q, w_scale, bias=None, *, out_dtype=torch.float32, wrap=identity,
                       fp32_dot: bool = False, config: dict | None = None) -> torch.Tensor:
    """`fp8_block_gemm_triton` for at most ROW_DOT_MAX_M rows of x, with `_fp8_row_dot_kernel`."""
    cfg = config or ROW_DOT
    if BLOCK % cfg["BLOCK_N"]:  # a program's rows must share one weight-scale row block
        raise ValueError(f"fp8_row_dot_triton: BLOCK_N {cfg['BLOCK_N']} must divide the scale block {BLOCK}")
    m, k = xq.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    wrap(_fp8_row_dot_kernel)[(triton.cdiv(n, cfg["BLOCK_N"]), 1, 1)](
        xq, x_scale, w_q, w_scale, optional_arg(bias, w_scale), y, m, n, k, KB=k // BLOCK,
        FP32_DOT=fp32_dot, HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_M=ROW_DOT_MAX_M,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


@jit_any_m
def _quantize_blocks_kernel(x_ptr, q_ptr, s_ptr, M, M_OUT, K, stride_xm, QMAX: tl.constexpr,
                            MIN_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """1xBLOCK blocks of x [M, K] -> q fp8 [M_OUT, K] and s float32 stored [K/BLOCK, M_OUT] (rows M..M_OUT-1,
    the padding, are zeros with the floor scale): `s = max(amax / QMAX, MIN_SCALE)`, `q = fp8(clamp(x / s, ±QMAX))`
    with IEEE divisions, as `format.quantize_activation_blocks`."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :], mask=(offs_m < M)[:, None],
                other=0.0).to(tl.float32)
    s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full((BLOCK_M,), QMAX, tl.float32)), MIN_SCALE)
    q = tl.clamp(tl.math.div_rn(x, s[:, None]), -QMAX, QMAX).to(q_ptr.dtype.element_ty)
    out = offs_m < M_OUT
    tl.store(q_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], q, mask=out[:, None])
    tl.store(s_ptr + kb * M_OUT + offs_m, s, mask=out)


def quantize_blocks_triton(x2d, row_align: int = 1, *, wrap=identity, block_m: int = 32, num_warps: int = 4):
    """(xq float8_e4m3fn [M', K], x_scale float32 [M', K/128] with strides (1, M')) of x [M, K], M' = M rounded up
    to `row_align` (zero rows): one pass over x, the scales written K-block-major as cuBLASLt reads them. `block_m`
    rows per program on `num_warps` warps: none of 16 variants was more than 6% faster than 32 on 4 on the H200
    (tools/diag/fp8_block_parts.py, benchmarks/fp8_block_parts.json)."""
    m, k = x2d.shape
    m_out = m + (-m) % row_align  # this form lets export prove m <= m_out for a symbolic m
    xq = torch.empty((m_out, k), dtype=torch.float8_e4m3fn, device=x2d.device)
    sx = torch.empty((k // BLOCK, m_out), dtype=torch.float32, device=x2d.device)
    wrap(_quantize_blocks_kernel)[(triton.cdiv(m_out, block_m), k // BLOCK, 1)](
        x2d, xq, sx, m, m_out, k, x2d.stride(0), QMAX=float(qmax("fp8")), MIN_SCALE=MIN_SCALE, BLOCK_M=block_m,
        BLOCK=BLOCK, num_warps=num_warps,
    )
    return xq, sx.t()
