"""Triton kernel of `qcompile::int8_weight_only_gemm` (CUDA only; imported lazily: CPU machines have no Triton).

Paths, chosen per call from M (the row count of x, dynamic), as in the INT4 plugin:

- M = 1 (N a multiple of 4): `_int8_wo_gemv_kernel`, a GEMV on the CUDA cores that reads the weight as int32
  words and turns bytes into floats with bit operations (see its docstring); each program loads its next
  step's words before this step's arithmetic. Split-K partial sums meet in fp32 atomics.
- small M (M <= gemm_dispatch.SMALL_M_MAX = 16): `_int8_wo_splitk_kernel`, a split-K weight-streaming GEMM.
  Each program owns BLOCK_N output columns and one K slice; it streams its int8 [BLOCK_K, BLOCK_N] weight tiles once
  (`evict_first`), converts them to x.dtype in registers (exact: |q| <= 127) and multiplies with `tl.dot`
  (BLOCK_M = 16 rows, float32 accumulate; float32 x uses an IEEE dot). Split-K partial sums are added with
  float32 atomics into a zeroed [M, N] buffer (a plain store when there is one split). The per-channel scale
  factors out of the K sum, so it is applied once, with the bias, in the epilogue `acc * w_scale + bias`
  (aten ops: Inductor fuses them into one pointwise kernel, or into the consumer).
- larger M: the buckets of `LARGE_M`: the same kernel as a plain tiled GEMM (`launch_tiles`, no K split), or
  `dequant(W)` in x.dtype (one pointwise kernel) then `torch.matmul` (cuBLAS).

Dispatch on M: a Python branch when M is a concrete int (eager); with a symbolic M (torch.export,
AOTInductor with a dynamic row count) a chain of `torch.cond(M <= limit, ...)` (`gemm_dispatch.run_by_buckets`),
so every path is compiled and the choice is made at run time.

`launch_small_m` and `int8_wo_gemm_triton` take `wrap` (identity for raw Triton: tests run them under
TRITON_INTERPRET=1 on CPU tensors; `torch.library.wrap_triton` from the op, so AOTInductor compiles the
kernel into the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import (SMALL_M_MAX, add_bias, cdiv, identity, run_by_buckets, split_for_waves,
                                             split_k_config)
from qcompile.plugins.int8_wo_gemm.reference import check_args, dequantize_weight
from qcompile.plugins.triton_tiles import store_tile

BLOCK_M = 16
BLOCK_K = 128
DEFAULT_SMS = 132
# M = 1 path: the GEMV kernel (N a multiple of 4), 4 warps from WIDE_N columns. Chosen with
# tools/tune_w8a16_small_m.py on the H200 (benchmarks/tune_w8a16_small_m.json: within 2% of each shape's best).
GEMV = dict(BLOCK_K=32, BLOCK_NW=32, num_warps=1, WIDE_N=8192, wide_num_warps=4, waves=8, PREFETCH=True)


@triton.jit
def _weight_rows(w_ptr, rows, offs_n, mask_n, N, K, wanted):
    """Rows `rows` [BLOCK_K, BLOCK_N] of a [K, N] weight (0 past K or where not `wanted`)."""
    return tl.load(w_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :],
                   mask=((rows < K) & wanted)[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _int8_wo_gemv_kernel(
    x_ptr, w_ptr, y_ptr, N, K, stride_xm, k_per_split,
    K_STEPS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NW: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One row of x per program (M = 1): the int8 [K, N] weight read as int32 words [K, N/4], four adjacent
    columns per word, multiplied in fp32 registers without tensor cores (at M = 1 the job is streaming the
    weight). Byte i becomes a float with one AND/XOR: bytes 0 and 2 (after a shift by 16) XOR 0x80 in the
    mantissa of 2^23 (ulp 1), bytes 1 and 3 in the mantissa of 2^15 (ulp 1 at bit 8); one exact subtraction
    of the magic + 128 gives q. So a weight costs about 1.25 integer ops, a subtraction and an FMA, where
    `int8 -> float` conversions would cost four integer-op slots. Split-K partial sums meet in fp32 atomics.
    The int8 pointer is reinterpreted here (a `view(torch.int32)` of the weight in the graph broke AOTInductor's
    lowering of the torch.cond around this path on the H200)."""
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    n_words = N // 4
    offs_w = pid_n * BLOCK_NW + tl.arange(0, BLOCK_NW)
    mask_w = offs_w < n_words
    x_row = x_ptr + row * stride_xm
    acc0 = tl.zeros((BLOCK_K, BLOCK_NW), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_K, BLOCK_NW), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_NW), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K, BLOCK_NW), dtype=tl.float32)
    if PREFETCH:  # the next step's words are loaded before this step's arithmetic (hand-pipelined)
        upcoming = _weight_rows(words_ptr, pid_k * k_per_split + tl.arange(0, BLOCK_K), offs_w, mask_w, n_words,
                                K, True)
    for step in range(0, K_STEPS):  # steps past K (last split) are masked
        kk = pid_k * k_per_split + step * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = kk < K
        if PREFETCH:
            words = upcoming
            upcoming = _weight_rows(words_ptr, kk + BLOCK_K, offs_w, mask_w, n_words, K, step + 1 < K_STEPS)
        else:
            words = _weight_rows(words_ptr, kk, offs_w, mask_w, n_words, K, True)
        xk = tl.load(x_row + kk, mask=ok, other=0.0).to(tl.float32)[:, None]
        high = words >> 16
        acc0 += xk * (((words & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0)
        acc1 += xk * (((words & 0xFF00) ^ 0x47008000).to(tl.float32, bitcast=True) - 32896.0)
        acc2 += xk * (((high & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0)
        acc3 += xk * (((high & 0xFF00) ^ 0x47008000).to(tl.float32, bitcast=True) - 32896.0)
    y_cols = y_ptr + row * N + 4 * offs_w
    store_tile(y_cols, tl.sum(acc0, axis=0), mask_w, ATOMIC)
    store_tile(y_cols + 1, tl.sum(acc1, axis=0), mask_w, ATOMIC)
    store_tile(y_cols + 2, tl.sum(acc2, axis=0), mask_w, ATOMIC)
    store_tile(y_cols + 3, tl.sum(acc3, axis=0), mask_w, ATOMIC)


@triton.jit
def _int8_wo_splitk_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_xm,
    K_STEPS: tl.constexpr, ATOMIC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * (K_STEPS * BLOCK_K)  # this program's K slice: K_STEPS steps of BLOCK_K
    for step in range(0, K_STEPS):
        kk = k_lo + step * BLOCK_K + offs_k
        mask_k = kk < K
        w = _weight_rows(w_ptr, kk, offs_n, mask_n, N, K, True)
        xk = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(xk.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xk, w.to(xk.dtype), acc)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    store_tile(y_ptrs, acc, ymask, ATOMIC)


def small_m_config(k: int, n: int, num_sms: int = DEFAULT_SMS) -> dict:
    """Static launch configuration of the split-K kernel for a K x N weight (does not depend on M): 128-byte
    weight rows per tile, and K split until there are about 4 programs per SM."""
    return split_k_config(k, n, BLOCK_K, 128, num_sms)


def launch_gemv(x2d, w_q, cfg: dict | None = None, *, wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """float32 `x2d @ w_q` ([M, N], unscaled, no bias) with the GEMV kernel: one program column per row of x,
    N a multiple of 4 (the weight is read as int32 words)."""
    cfg = cfg or GEMV
    m, k = x2d.shape
    n = w_q.shape[1]
    tiles = cdiv(n // 4, cfg["BLOCK_NW"])
    splits, per = split_for_waves(k, tiles, cfg["BLOCK_K"], cfg["waves"], num_sms)
    y = (torch.zeros if splits > 1 else torch.empty)((m, n), dtype=torch.float32, device=x2d.device)
    wrap(_int8_wo_gemv_kernel)[(tiles, splits, m)](
        x2d, w_q, y, n, k, x2d.stride(0), per, K_STEPS=per // cfg["BLOCK_K"],
        ATOMIC=splits > 1, BLOCK_K=cfg["BLOCK_K"], BLOCK_NW=cfg["BLOCK_NW"], PREFETCH=cfg.get("PREFETCH", False),
        num_warps=cfg["wide_num_warps"] if n >= cfg.get("WIDE_N", n + 1) else cfg["num_warps"], num_stages=1,
    )
    return y


def launch_small_m(x2d, w_q, *, wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """float32 `x2d @ w_q` ([M, N], unscaled, no bias) with the split-K kernel (M may be 0)."""
    m, k = x2d.shape
    n = w_q.shape[1]
    cfg = small_m_config(k, n, num_sms)
    atomic = cfg["split_k"] > 1
    y = (torch.zeros if atomic else torch.empty)((m, n), dtype=torch.float32, device=x2d.device)
    grid = (cfg["n_tiles"], cfg["split_k"], cdiv(m, BLOCK_M))
    wrap(_int8_wo_splitk_kernel)[grid](
        x2d, w_q, y, m, n, k, x2d.stride(0),
        K_STEPS=cfg["k_per_split"] // BLOCK_K, ATOMIC=atomic, FP32_DOT=x2d.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK_K, num_warps=4, num_stages=3,
    )
    return y


def launch_tiles(x2d, w_q, cfg: dict, *, wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """float32 `x2d @ w_q` ([M, N], unscaled) with the same kernel as a tiled GEMM, K split only while the
    N tiles are fewer than `cfg["waves"]` waves of SMs (a narrow N)."""
    m, k = x2d.shape
    n = w_q.shape[1]
    # the split is chosen from the N tiles alone: M is symbolic in an engine, and inside torch.cond's branches
    # (traced by Dynamo) `isinstance(m, int)` holds for it, so counting its tiles puts a guard on M
    splits, per = split_for_waves(k, cdiv(n, cfg["BLOCK_N"]), cfg["BLOCK_K"], cfg.get("waves", 0), num_sms)
    y = (torch.zeros if splits > 1 else torch.empty)((m, n), dtype=torch.float32, device=x2d.device)
    grid = (cdiv(n, cfg["BLOCK_N"]), splits, cdiv(m, cfg["BLOCK_M"]))
    wrap(_int8_wo_splitk_kernel)[grid](
        x2d, w_q, y, m, n, k, x2d.stride(0),
        K_STEPS=per // cfg["BLOCK_K"], ATOMIC=splits > 1, FP32_DOT=x2d.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y


# Paths above SMALL_M_MAX rows by M bucket: a tile configuration of the kernel, or "dequant" (dequantize +
# cuBLAS); chosen from tools/tune_fp8_block_w8a16.py on the H200 (benchmarks/tune_fp8_block_w8a16.json: the
# tiled kernel wins from M = 64 to 1024, dequantize + cuBLAS at 4096). `waves` splits K when the tiles are fewer
# than one wave (14336 x 4096 at M = 64 had 32 programs, 0.18x bf16): not yet measured.
LARGE_M = [
    (2048, dict(kernel="tiles", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, waves=1)),
    (None, dict(kernel="dequant")),
]


def _epilogue(acc, w_scale, bias, dtype):
    """`acc * w_scale + bias` in float32 (w_scale None: already applied), cast to `dtype`."""
    y = acc if w_scale is None else acc.to(torch.float32) * w_scale.to(torch.float32)
    return add_bias(y, bias, dtype)


def int8_wo_gemm_triton(x, w_q, w_scale, bias, *, wrap=identity, num_sms: int = DEFAULT_SMS,
                        large_m: dict | None = None) -> torch.Tensor:
    """The op's GPU path: split-K kernel for M <= 16, the `LARGE_M` buckets above (or the one path `large_m`)."""
    check_args(x, w_q, w_scale, bias)
    # K and N are weight dims, static in an engine; int() specializes them when a compiler made them symbolic
    k, n = int(w_q.shape[0]), int(w_q.shape[1])
    w_q = w_q if w_q.stride(1) == 1 else w_q.contiguous()
    has_bias = bias is not None

    def small(launch):
        def run(x2d, w_q, w_scale, *rest):
            acc = launch(x2d, w_q, wrap=wrap, num_sms=num_sms)
            return _epilogue(acc, w_scale, rest[0] if has_bias else None, x2d.dtype)
        return run

    def large(cfg):
        def run(x2d, w_q, w_scale, *rest):
            bias = rest[0] if has_bias else None
            if cfg["kernel"] == "dequant":
                return _epilogue(x2d @ dequantize_weight(w_q, w_scale, x2d.dtype), None, bias, x2d.dtype)
            return _epilogue(launch_tiles(x2d, w_q, cfg, wrap=wrap, num_sms=num_sms), w_scale, bias, x2d.dtype)
        return run

    gemv = [(1, small(launch_gemv))] if n % 4 == 0 else []  # the GEMV reads 4-column int32 words
    above = [(None, large_m)] if large_m else LARGE_M
    buckets = gemv + [(SMALL_M_MAX, small(launch_small_m))] + [(limit, large(c)) for limit, c in above]
    return run_by_buckets(x, k, n, buckets, (w_q, w_scale) + ((bias,) if has_bias else ()))
