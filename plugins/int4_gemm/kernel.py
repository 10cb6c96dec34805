"""Triton kernels of `qcompile::int4_groupwise_gemm` (CUDA only; imported lazily: CPU machines have no Triton).

Two paths, chosen per call from M (the row count of x, dynamic) without a Python branch on M:

- small M (M <= gemm_dispatch.SMALL_M_MAX = 16): `_int4_splitk_kernel`, a split-K weight-streaming GEMM. Each program owns
  BLOCK_N output columns and one K slice; it streams the packed int32 words of its slice once
  (`evict_first`), sign-extends each nibble with two shifts, applies `(q - zp) * scale` in float32
  registers, and multiplies with `tl.dot` (BLOCK_M = 16 rows; fp32 accumulate; fp32 x uses IEEE dot).
  One word row (8 K values) is split into 8 K-strided sub-tiles `j`, so no in-register reshape is
  needed: sub-tile j pairs word bits 4j..4j+3 with x columns 8*i + j. Split-K partial sums are added
  with fp32 atomics into a zeroed [M, N] buffer (a plain store when there is one split).
- large M: `_int4_dequant_kernel` writes `dequant(W)` in x.dtype [K, N], then `torch.matmul` (cuBLAS).

Dispatch on M: a Python branch when M is a concrete int (eager); with a symbolic M (torch.export,
AOTInductor with a dynamic row count) `torch.cond(M <= 16, small, large)`, so both paths are compiled and
the choice is made at run time (no guard on M).

`launch_small_m`, `launch_dequant` and `int4_gemm_triton` take `wrap` (identity for raw Triton: tests run
them under TRITON_INTERPRET=1 on CPU tensors; `torch.library.wrap_triton` from the op, so AOTInductor
compiles the kernels into the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import cdiv, identity, run_by_rows, split_k_config
from qcompile.plugins.int4_gemm.format import PACK
from qcompile.plugins.int4_gemm.reference import check_args

BLOCK_M = 16
BLOCK_KW = 16  # int32 words per K step: BLOCK_K = 128 values
BLOCK_K = BLOCK_KW * PACK
DEFAULT_SMS = 132


@triton.jit
def _int4_splitk_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, stride_xm, group_size,
    K_STEPS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_ALIGNED: tl.constexpr, ATOMIC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_KW)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n_words = K // 8
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * (K_STEPS * BLOCK_KW * 8)  # this program's K slice: K_STEPS steps of BLOCK_KW words
    for step in range(0, K_STEPS):
        k0 = k_lo + step * (BLOCK_KW * 8)
        wi = k0 // 8 + offs_w
        mask_w = wi < n_words
        wmask = mask_w[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + wi.to(tl.int64)[:, None] * N + offs_n[None, :], mask=wmask, other=0,
                        eviction_policy="evict_first")
        if GROUP_ALIGNED:  # the whole K step lies in one group: one scale row
            g = k0 // group_size
            smask = mask_n & (k0 < K)  # a step past K (last split) must not read a scale row past the end
            s = tl.load(s_ptr + g * N + offs_n, mask=smask, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=smask, other=0).to(tl.float32)[None, :]
        for j in tl.static_range(8):
            kk = wi * 8 + j
            q = ((words << (28 - 4 * j)) >> 28).to(tl.float32)  # sign-extended nibble j
            if not GROUP_ALIGNED:
                gp = (kk // group_size).to(tl.int64)[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + gp, mask=wmask, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + gp, mask=wmask, other=0).to(tl.float32)
            if HAS_ZERO:
                q = q - z
            w = q * s
            xj = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_w[None, :], other=0.0)
            if FP32_DOT:
                acc = tl.dot(xj.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xj, w.to(xj.dtype), acc)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=ymask)
    else:
        tl.store(y_ptrs, acc, mask=ymask)


@triton.jit
def _int4_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, group_size,
    HAS_ZERO: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    wi = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (wi < K // 8)[:, None] & (offs_n < N)[None, :]
    words = tl.load(w_ptr + wi.to(tl.int64)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    for j in tl.static_range(8):
        kk = wi * 8 + j
        q = ((words << (28 - 4 * j)) >> 28).to(tl.float32)
        gp = (kk // group_size).to(tl.int64)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + gp, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            q = q - tl.load(z_ptr + gp, mask=mask, other=0).to(tl.float32)
        tl.store(out_ptr + kk.to(tl.int64)[:, None] * N + offs_n[None, :], (q * s).to(out_ptr.dtype.element_ty),
                 mask=mask)


def small_m_config(k: int, n: int, num_sms: int = DEFAULT_SMS) -> dict:
    """Static launch configuration of the split-K kernel for a K x N weight (does not depend on M)."""
    return split_k_config(k, n, BLOCK_K, 64, num_sms)


def launch_small_m(x2d, w_packed, w_scale, w_zero, group_size: int, m_rows, *, wrap=identity,
                   num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """fp32 `x2d[:m_rows] @ dequant(W)` ([m_rows, N], no bias) with the split-K kernel (m_rows may be 0)."""
    k = x2d.shape[1]
    n = w_packed.shape[1]
    cfg = small_m_config(k, n, num_sms)
    atomic = cfg["split_k"] > 1
    y = (torch.zeros if atomic else torch.empty)((m_rows, n), dtype=torch.float32, device=x2d.device)
    grid = (cfg["n_tiles"], cfg["split_k"], cdiv(m_rows, BLOCK_M))
    wrap(_int4_splitk_kernel)[grid](
        x2d, w_packed, w_scale, w_zero if w_zero is not None else w_scale, y,
        m_rows, n, k, x2d.stride(0), group_size,
        K_STEPS=cfg["k_per_split"] // BLOCK_K, HAS_ZERO=w_zero is not None, GROUP_ALIGNED=group_size % BLOCK_K == 0, ATOMIC=atomic,
        FP32_DOT=x2d.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=BLOCK_KW,
        num_warps=4, num_stages=3,
    )
    return y


def launch_dequant(w_packed, w_scale, w_zero, group_size: int, dtype, *, wrap=identity) -> torch.Tensor:
    """`dequant(W)` as `dtype` [K, N] (for the dequantize-then-cuBLAS path of large M)."""
    kw, n = w_packed.shape
    out = torch.empty((kw * PACK, n), dtype=dtype, device=w_packed.device)
    block_kw, block_n = 8, 128
    grid = (cdiv(kw, block_kw), cdiv(n, block_n), 1)
    wrap(_int4_dequant_kernel)[grid](
        w_packed, w_scale, w_zero if w_zero is not None else w_scale, out, n, kw * PACK, group_size,
        HAS_ZERO=w_zero is not None, BLOCK_KW=block_kw, BLOCK_N=block_n, num_warps=4,
    )
    return out


def _epilogue(acc, bias, dtype):
    y = acc.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def int4_gemm_triton(x, w_packed, w_scale, w_zero, bias, group_size: int, *, x_row_scale=None, out_dtype=None,
                     wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """The op's GPU path: split-K kernel for M <= 16, dequant + matmul above (see the module docstring).

    W4A8: x is float8_e4m3fn [..., K] with `x_row_scale` float32 [M] (one scale per row of x) and
    `out_dtype` the activations' float type. The FP8 values are dequantized (x * row scale, rounded to
    out_dtype) and run through the W4A16 kernels: the W4A8 numerics on bf16/fp16 tensor cores. A kernel that
    feeds FP8 straight into FP8 MMAs is work in progress (not measured on the GPU yet)."""
    if x_row_scale is not None:
        if x.dtype != torch.float8_e4m3fn or out_dtype is None:
            raise ValueError("int4_gemm_triton: W4A8 needs x as float8_e4m3fn and out_dtype")
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32) * x_row_scale.reshape(-1, 1).to(torch.float32)
        x = rows.to(out_dtype).reshape(x.shape)
    check_args(x, w_packed, w_scale, w_zero, bias, group_size)
    # K and N are weight dims, static in an engine; int() specializes them (a guard) when a compiler
    # made them symbolic (torch.compile(dynamic=True)): the launch configuration needs Python ints
    k = int(x.shape[-1])
    n = int(w_packed.shape[1])

    def small(x2d, w_packed, w_scale, *rest):
        w_zero, bias = _unpack_optional(rest, has_zero, has_bias)
        acc = launch_small_m(x2d, w_packed, w_scale, w_zero, group_size, x2d.shape[0], wrap=wrap, num_sms=num_sms)
        return _epilogue(acc, bias, x2d.dtype)

    def large(x2d, w_packed, w_scale, *rest):
        w_zero, bias = _unpack_optional(rest, has_zero, has_bias)
        wd = launch_dequant(w_packed, w_scale, w_zero, group_size, x2d.dtype, wrap=wrap)
        return _epilogue(x2d @ wd, bias, x2d.dtype)

    has_zero, has_bias = w_zero is not None, bias is not None
    weights = (w_packed, w_scale) + tuple(t for t in (w_zero, bias) if t is not None)
    return run_by_rows(x, k, n, small, large, weights)


def _unpack_optional(rest, has_zero: bool, has_bias: bool):
    rest = list(rest)
    w_zero = rest.pop(0) if has_zero else None
    bias = rest.pop(0) if has_bias else None
    return w_zero, bias
