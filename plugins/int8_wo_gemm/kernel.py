"""Triton kernels of `qcompile::int8_weight_only_gemm` (CUDA only; imported lazily: CPU machines have no Triton).

The weight is `w_q` int8 [N, K], K contiguous (the engine layout; the lowering transposes ONNX's [K, N] once).
Each output feature's weights are then one contiguous run, so a program owning a few rows streams long runs of
memory. In the previous [K, N] layout every program read a 128-byte strip of each of K rows and needed split-K
atomics, a zero fill and a separate epilogue; on the H200 the row layout reads at 3.5-4.1 TB/s
(`tools/diag/row_gemv_probe.py`, benchmarks/row_gemv_probe.json).

Paths, chosen per call from M (the row count of x, dynamic):

- M <= 16, 16-bit x, N wide enough to fill the GPU with wide tiles: `split_mma` (x split into two int8 planes
  with per-chunk scales, the int8 weight straight into the INT8 tensor cores; see its docstring). At M = 1 only
  on its widest tiles (`split_mma.runs_one_row`): the GEMV below won on the others.
- otherwise, M = 1 (K a multiple of 4): `gemv._row_gemv_kernel` (gemv.py), a GEMV on the CUDA cores. It reads
  the weight as int32 words (four consecutive k of one row) and turns bytes into floats with bit operations (see
  its docstring). Each program owns BLOCK_N rows over all of K and finishes them: the scale, the bias and the
  cast are in the kernel (one launch per call).
- M <= gemm_dispatch.SMALL_M_MAX (16): `_row_dot_kernel`, the same row ownership on the tensor cores with A and
  B swapped (y^T = W x^T: the weight tile is the MMA's wide operand, the at most 16 rows of x the narrow one),
  int8 -> x.dtype in registers (exact: |q| <= 127), float32 accumulation (float32 x: an IEEE dot). The
  epilogue is in the kernel too, unless the N tiles are too few to fill the GPU: then K is split and the
  partial sums meet in float32 atomics (zeroed buffer, epilogue after; or, with "finish" in the configuration,
  the last split of each tile writes it: opt-in). `DOT` has x as the MMA's first operand ("plain").
- larger M: the buckets of `LARGE_M`: `_row_dot_kernel` on row tiles of 32 / 64 up to 128 rows, `_tile_kernel` (a
  plain tiled GEMM reading the [N, K] weight as the transposed B operand) up to 256, then `_dequant_kernel` (W in
  x.dtype, one pass) and cuBLAS with the bias in its epilogue (`gemm_dispatch.linear_bias`), as the INT4 and FP4
  ops do from 129 rows.

Dispatch on M: a Python branch when M is a concrete int (eager); with a symbolic M (torch.export,
AOTInductor with a dynamic row count) a chain of `torch.cond(M <= limit, ...)` (`gemm_dispatch.run_by_buckets`),
so every path is compiled and the choice is made at run time.

The launchers take `wrap` (identity for raw Triton: tests run them under TRITON_INTERPRET=1 on CPU tensors;
`torch.library.wrap_triton` from the op, so AOTInductor compiles the kernels into the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import (DEFAULT_SMS, SMALL_M_MAX, add_bias, cdiv, identity, linear_bias,
                                             optional_arg, run_by_buckets, split_for_waves, split_k_outputs,
                                             whole_tiles)
from qcompile.plugins.int4_gemm.half2 import ptx_available
from qcompile.plugins.int8_wo_gemm import gemv, mma_rows, split_mma
from qcompile.plugins.int8_wo_gemm.gemv import scale_bias_store
from qcompile.plugins.int8_wo_gemm.reference import check_args
from qcompile.plugins.triton_tiles import finish_swapped_tile, jit_any_m, load_tile, load_xt_step, store_tile

# 1 < M <= 16: weight rows per program, K per step, pipelining (same sweep: 1.20-1.35x bf16 at M = 16); `waves`:
# split K while the N tiles are fewer than this many waves of SMs; `plain`: x as the MMA's first operand
# (`_row_dot_kernel`'s PLAIN; 22% fewer instructions per weight). On the H100 at M = 16 plain took 4096 x 4096 from
# 12.9 to 12.4 µs and 14336 x 4096 from 31.2 to 28.2 (benchmarks/tune_w8a16_dot_warps-h100_s57c.json).
DOT = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=5, waves=1, plain=True)
DOT_BLOCK_M = 16  # rows of x per program (tl.dot's minimum)
# 1 <= M <= 16, fp16 x: the fp16 tensor-core kernel (`mma_rows`) in place of every path above, where it applies
# (`warps`: warps per 16-row tile, K split among them; `blocks`: 64-K blocks a warp loads a step ahead). None (off):
# on the H100 it lost to the paths above on 7 of the 8 kernel-target cells (BENCHMARKS.md, forty-third session).
MMA_ROWS = None


@triton.jit
def _int8_to(w, dtype: tl.constexpr):
    """int8 -> dtype, exactly. fp16: byte ^ 0x6480 is the fp16 1152 + q (ulp 1 in [1024, 2048)), minus 1152: a
    PRMT, a LOP3 and half of an HADD2 per weight, where Triton's own conversion issues one I2F (a quarter-rate
    instruction on the H200) per weight: with it the row dot kernel at M = 16 took 1.4-1.7x as long
    (benchmarks/w8_fp16_convert_ab.log). bf16 (already converted with integer ops by Triton) and float32 as Triton
    converts them."""
    if dtype == tl.float16:
        return (w.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
    return w.to(dtype)


@triton.jit
def _int8_to_16bit_opaque(w, dtype: tl.constexpr):
    """int8 -> bf16 / fp16 (dtype), exactly, in inline PTX that Triton cannot see through (impure). Triton sizes
    both operands' MMA fragments by the narrowest load it can trace either one back to: after `_int8_to` that is
    the int8 weight, so x's fragments hold 4 K a thread and are assembled from 64-bit shared loads and register
    moves (DOT's sm_90 loop: 32 LDS.64 + 57 IMAD.MOV of its 294 instructions a step). Behind this conversion both
    operands get 16-bit fragments and x comes through ldmatrix; the converted weight then makes one trip through
    shared memory. Same bit tricks as Triton's bf16 conversion (`0x43 b` is 128 + (b & 127) when bit 7 is masked
    off, and 256 when only bit 7 is kept: their difference is the signed byte) and as `_int8_to`'s fp16 one.
    Opt-in ("x_ldmatrix" in a row dot configuration; no configuration sets it): `DOT`'s loop falls from 294 to 249
    instructions a step with bf16 x and from 332 to 217 with fp16 (`tools/diag/sass_count.py
    w8a16_row_dot_plain_ldsm`), but on the H100 at 16 rows it took 15.0 µs on 4096 x 4096 against `DOT`'s 12.5
    (benchmarks/tune_w8a16-ldsm-h100_s60.json): the weight's extra trip through shared memory (a store, a barrier
    and ldmatrix every step) costs more than the instructions it saves."""
    # literals, not globals: AOTInductor copies the kernel's source into its generated code
    if dtype == tl.bfloat16:
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 p, a, c; "
            "prmt.b32 p, 0x43, $2, 0x0504; and.b32 a, p, 0xff7fff7f; and.b32 c, p, 0xff80ff80; "
            "sub.rn.bf16x2 $0, a, c; "
            "prmt.b32 p, 0x43, $2, 0x0706; and.b32 a, p, 0xff7fff7f; and.b32 c, p, 0xff80ff80; "
            "sub.rn.bf16x2 $1, a, c; }",
            "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=False, pack=4)
    else:
        out = tl.inline_asm_elementwise(
            "{ .reg .b32 p, c; mov.b32 c, 0x64806480; "
            "prmt.b32 p, $2, 0x64, 0x4140; xor.b32 p, p, 0x00800080; sub.rn.f16x2 $0, p, c; "
            "prmt.b32 p, $2, 0x64, 0x4342; xor.b32 p, p, 0x00800080; sub.rn.f16x2 $1, p, c; }",
            "=r,=r,r", [w], dtype=tl.float16, is_pure=False, pack=4)
    return out


@triton.jit
def _row_dot_part(acc, w_tile, x_cols, k0, mask_n, mask_m, K, EVEN: tl.constexpr, PART_K: tl.constexpr,
                  FP32_DOT: tl.constexpr, PLAIN: tl.constexpr, X_LDMATRIX: tl.constexpr = False):
    """acc plus the products of the weight rows and x over K k0 .. k0 + PART_K - 1 (w_tile, x_cols: the pointers at
    K 0 .. PART_K - 1): acc [BLOCK_M, BLOCK_N] with PLAIN (x the MMA's first operand), else [BLOCK_N, BLOCK_M]."""
    offs_k = tl.arange(0, PART_K)
    w = load_tile(w_tile + k0, mask_n[:, None] & (k0 + offs_k < K)[None, :], EVEN, STREAM=True)
    xt = load_xt_step(x_cols, k0, mask_m, K, EVEN, PART_K)
    if FP32_DOT:
        w = w.to(tl.float32)
        xt = xt.to(tl.float32)
    elif X_LDMATRIX:
        w = _int8_to_16bit_opaque(w, xt.dtype)
    else:
        w = _int8_to(w, xt.dtype)
    precision: tl.constexpr = "ieee" if FP32_DOT else None
    if PLAIN:
        acc = tl.dot(tl.trans(xt), tl.trans(w), acc, input_precision=precision)
    else:
        acc = tl.dot(w, xt, acc, input_precision=precision)
    return acc


@jit_any_m
def _row_dot_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, out_ptr, M, N, K, stride_xm, k_per_split, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, FP32_DOT: tl.constexpr, K_STEPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PART_K: tl.constexpr,
    EVEN: tl.constexpr = False, PLAIN: tl.constexpr = False, FINISH: tl.constexpr = False,
    X_LDMATRIX: tl.constexpr = False,
):
    """acc[n, m] = sum_k q[n, k] x[m, k] over one K slice for BLOCK_N weight rows and BLOCK_M rows of x (grid axis
    2 runs over row tiles: one when M <= BLOCK_M, as at M <= 16); ATOMIC: float32 partial sums added into y
    (zeroed), else the scale/bias epilogue and a store in y's dtype. FINISH: each split's sum is scaled here and
    `finish_swapped_tile` writes the result to out_ptr in out's dtype (split K: y_ptr is the zeroed fp32
    accumulator [M * N], then one count per tile; the last split of a tile adds the bias and stores it), so a
    split K needs no epilogue kernel after this one (else out_ptr is not read). No configuration sets it: on the
    H100 at 16 rows (benchmarks/tune_w8a16-finish-m16-h100_s58.json) it lost to `DOT`'s whole K on 4096 x 4096
    (13.6 against 12.8 µs) and won on 14336 x 4096 (29.0 against `split_mma`'s 31.5), where the H200 had
    `split_mma` ahead of the unfinished tile (24.8 against 28.0 µs).
    The step's pointers are formed once (a step adds its K offset); EVEN (N in whole tiles, K in whole steps of
    every split): the weight and K masks are left out. That cut the sm_90 loop from 393 to 377 instructions per
    step but did not move the H200 time (4096 x 4096 at M = 16: 1.31x bf16, 1.34x before; BENCHMARKS.md).

    PLAIN: x is the MMA's first operand and the converted weight tile its second (acc^T, transposed once at the
    end). With the swapped operands Triton lays 4 warps out 2 x 2 over a [32, 16] tile, so two warps convert each
    weight; with x first they split the weight rows and each converts its own: 4.59 instead of 5.89 sm_90
    instructions per weight for 32 x 256 on 4 warps (`tools/diag/sass_count.py`; DOT sets it, timed on the H100,
    not yet on the H200).

    PART_K < BLOCK_K (a configuration's "part_k"; opt-in, no faster on the H100): each K step as dots of PART_K, summed
    alternately into two accumulators (added at the end). A warp's MMAs into one accumulator form a chain,
    each waiting for the one before: with one dot a step, `DOT`'s tile issues 16 dependent HMMA.16816 per warp and
    step (sm_90 SASS), and one warp per scheduler has nothing else to run in their latency. Alternating dots make
    two chains whose MMAs ptxas interleaves (two dots of 128 K each did not: it issued one, then the other). For
    `DOT`'s tile (`tools/diag/sass_count.py w8a16_row_dot_plain_part64 --mma-chains`, a model of in-order issue
    with 33-cycle HMMAs): PART_K 64 308 instructions and 503 cycles a step, 32 348 and 434 (its copies 8 bytes wide),
    against 294 and 575 without. Timed on the H100 at 16 rows (benchmarks/tune_w8a16-parts-m16-h100_s59.json), the
    model did not hold: part_k 64 took 12.8 µs on 4096 x 4096 (the op 12.6), 32 took 16.1 and 16 took 20.3, about in
    proportion to the instructions; so the MMA chains do not bound the kernel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, PART_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    w_tile = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    x_cols = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N) if PLAIN else (BLOCK_N, BLOCK_M), dtype=tl.float32)
    other = acc  # the second chain: the odd parts (PART_K < BLOCK_K)
    for step in range(0, K_STEPS):  # steps past K (last split) are masked
        k0 = pid_k * k_per_split + step * BLOCK_K
        for j in tl.static_range(0, BLOCK_K // PART_K):
            if j % 2 == 0:
                acc = _row_dot_part(acc, w_tile, x_cols, k0 + j * PART_K, mask_n, mask_m, K, EVEN, PART_K, FP32_DOT,
                                    PLAIN, X_LDMATRIX)
            else:
                other = _row_dot_part(other, w_tile, x_cols, k0 + j * PART_K, mask_n, mask_m, K, EVEN, PART_K,
                                      FP32_DOT, PLAIN, X_LDMATRIX)
    if PART_K < BLOCK_K:
        acc += other
    if PLAIN:
        acc = tl.trans(acc)
    at = offs_m[None, :] * N + offs_n[:, None]
    y_ptrs = y_ptr + at
    mask = mask_n[:, None] & mask_m[None, :]
    if FINISH:
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        finish_swapped_tile(acc, at, mask, offs_m, offs_n, M, N, y_ptr, out_ptr, b_ptr, ATOMIC, HAS_BIAS)
    elif ATOMIC:
        store_tile(y_ptrs, acc, mask, ATOMIC)
    else:
        scale_bias_store(y_ptrs, acc, s_ptr, b_ptr, offs_n, mask, mask_n, HAS_BIAS)


@jit_any_m
def _tile_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, k_per_split,
    K_STEPS: tl.constexpr, ATOMIC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 tile of x @ q^T (no scale) for the large-M buckets: x [M, K] rows against the [N, K] weight read as
    the transposed B operand; K split when ATOMIC (partial sums added into a zeroed y)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_STEPS):
        kk = pid_k * k_per_split + step * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        w = tl.load(w_cols + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0,
                    eviction_policy="evict_first")
        xk = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(xk.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xk, _int8_to(w, xk.dtype), acc)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    store_tile(y_ptrs, acc, mask_m[:, None] & mask_n[None, :], ATOMIC)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] = q[n, k] * scale[n] in out's dtype (a float32 product rounded once, as
    `reference.dequantize_weight`), one [BLOCK_N, BLOCK_K] tile per program."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    at = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    q = tl.load(w_ptr + at, mask=mask, other=0, eviction_policy="evict_first")
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (q.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def launch_dequant(w_q, w_scale, dtype, cfg: dict | None = None, *, wrap=identity) -> torch.Tensor:
    """`dequant(W)` [N, K] as `dtype` in one pass (for the dequantize + cuBLAS bucket); w_q K-contiguous."""
    cfg = cfg or DEQUANT
    n, k = w_q.shape
    out = torch.empty((n, k), dtype=dtype, device=w_q.device)
    wrap(_dequant_kernel)[(cdiv(k, cfg["BLOCK_K"]), cdiv(n, cfg["BLOCK_N"]))](
        w_q, w_scale, out, n, k, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return out


def launch_dot(x2d, w_q, w_scale, bias, cfg: dict | None = None, *, wrap=identity,
               num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """`x2d @ dequant(w_q)^T + bias` in x.dtype with the row dot kernel: `cfg["BLOCK_M"]` (default DOT_BLOCK_M)
    rows of x per program, so one row tile up to that many rows (M may be 0). The split of K is chosen from the N
    tiles alone (M is symbolic in an engine). With "finish" in `cfg` a split K is finished in the kernel (no
    epilogue kernels after it; see `_row_dot_kernel`'s FINISH)."""
    cfg = cfg or DOT
    m, k = x2d.shape
    n = w_q.shape[0]
    block_m = cfg.get("BLOCK_M", DOT_BLOCK_M)
    row_tiles = cdiv(m, block_m) if "BLOCK_M" in cfg else 1  # the small-M configurations: one tile (M <= 16)
    tiles = cdiv(n, cfg["BLOCK_N"])
    part_k = cfg.get("part_k", cfg["BLOCK_K"])
    if part_k != cfg["BLOCK_K"] and cfg["BLOCK_K"] % (2 * part_k):
        raise ValueError(f"row dot configuration {cfg}: part_k must be BLOCK_K or divide BLOCK_K / 2")
    splits, per = split_for_waves(k, tiles, cfg["BLOCK_K"], cfg["waves"], num_sms)
    atomic, finish = splits > 1, cfg.get("finish", False)
    y, out = split_k_outputs(m, n, splits, row_tiles * tiles, x2d.dtype, x2d.device, finish)
    wrap(_row_dot_kernel)[(tiles, splits, row_tiles)](
        x2d, w_q, w_scale, optional_arg(bias, w_scale), y, y if out is None else out, m, n, k, x2d.stride(0), per,
        HAS_BIAS=bias is not None, ATOMIC=atomic, FP32_DOT=x2d.dtype == torch.float32, K_STEPS=per // cfg["BLOCK_K"],
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        EVEN=whole_tiles(n, cfg["BLOCK_N"], splits, per, k), PLAIN=cfg.get("plain", False), FINISH=finish,
        PART_K=part_k, X_LDMATRIX=cfg.get("x_ldmatrix", False) and ptx_available() and x2d.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if finish:
        return out
    return _epilogue(y, w_scale, bias, x2d.dtype) if atomic else y


def launch_tiles(x2d, w_q, cfg: dict, *, wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """float32 `x2d @ w_q^T` ([M, N], unscaled) with the tiled kernel, K split only while the N tiles are fewer
    than `cfg["waves"]` waves of SMs (a narrow N)."""
    m, k = x2d.shape
    n = w_q.shape[0]
    # the split is chosen from the N tiles alone: M is symbolic in an engine, and inside torch.cond's branches
    # (traced by Dynamo) `isinstance(m, int)` holds for it, so counting its tiles puts a guard on M
    splits, per = split_for_waves(k, cdiv(n, cfg["BLOCK_N"]), cfg["BLOCK_K"], cfg.get("waves", 0), num_sms)
    y = (torch.zeros if splits > 1 else torch.empty)((m, n), dtype=torch.float32, device=x2d.device)
    grid = (cdiv(n, cfg["BLOCK_N"]), splits, cdiv(m, cfg["BLOCK_M"]))
    wrap(_tile_kernel)[grid](
        x2d, w_q, y, m, n, k, x2d.stride(0), per,
        K_STEPS=per // cfg["BLOCK_K"], ATOMIC=splits > 1, FP32_DOT=x2d.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y


# Paths above SMALL_M_MAX rows by M bucket: "dot" (`_row_dot_kernel` on row tiles of BLOCK_M), a tile configuration
# of `_tile_kernel`, or "dequant" (`_dequant_kernel` + cuBLAS). Chosen from an H100 run of
# tools/tune_fp8_block_w8a16.py --ops w8a16 (benchmarks/tune_fp8_block_w8a16-h100_s33.json), the best single
# configuration of each kind summed over the four kernel-target layers: the row dot kernel took 207 µs at 32 rows
# (tiles 345, cuBLAS bf16 267), 232 at 64 (tiles 364, bf16 269) and 407 at 128 (tiles 468); the tiles 685 at 256
# (dequantize + cuBLAS 702); dequantize + cuBLAS 887 at 512 (tiles 1130) and 1386 at 1024 (tiles 2104, bf16 1110).
LARGE_M = [
    (32, dict(kernel="dot", BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4, waves=1)),
    (128, dict(kernel="dot", BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, waves=1)),
    (256, dict(kernel="tiles", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, waves=1)),
    (None, dict(kernel="dequant")),
]
DEQUANT = dict(BLOCK_N=16, BLOCK_K=512, num_warps=4)  # tile of `_dequant_kernel` (not tuned)


def _epilogue(acc, w_scale, bias, dtype):
    """`acc * w_scale + bias` in float32 (w_scale None: already applied), cast to `dtype`."""
    y = acc if w_scale is None else acc.to(torch.float32) * w_scale.to(torch.float32)
    return add_bias(y, bias, dtype)


def int8_wo_gemm_triton(x, w_q, w_scale, bias, *, wrap=identity, num_sms: int = DEFAULT_SMS,
                        large_m: dict | None = None) -> torch.Tensor:
    """The op's GPU path. Up to 16 rows of fp16 x, with `MMA_ROWS` set, where `mma_rows.applies`: the fp16
    tensor-core kernel. Else up to 16 rows of 16-bit x on a layer wide enough for
    `split_mma.pick_config`: the INT8 tensor-core path (at M = 1 where `split_mma.runs_one_row`, else the GEMV);
    else the GEMV at M = 1 and the row dot kernel up to 16 rows.
    The `LARGE_M` buckets above (or the one path `large_m`)."""
    check_args(x, w_q, w_scale, bias)
    # K and N are weight dims, static in an engine; int() specializes them when a compiler made them symbolic
    n, k = int(w_q.shape[0]), int(w_q.shape[1])
    w_q = w_q if w_q.stride(1) == 1 else w_q.contiguous()
    has_bias = bias is not None

    def finished(launch, **kwargs):  # the small-M kernels apply the scale and the bias themselves
        def run(x2d, w_q, w_scale, *rest):
            return launch(x2d, w_q, w_scale, rest[0] if has_bias else None, wrap=wrap, **kwargs)
        return run

    def large(cfg):
        def run(x2d, w_q, w_scale, *rest):
            bias = rest[0] if has_bias else None
            if cfg["kernel"] == "dequant":
                return linear_bias(x2d, launch_dequant(w_q, w_scale, x2d.dtype, wrap=wrap).t(), bias, x2d.dtype)
            if cfg["kernel"] == "dot":  # the small-M row dot kernel on row tiles of cfg["BLOCK_M"]
                return launch_dot(x2d, w_q, w_scale, bias, cfg, wrap=wrap, num_sms=num_sms)
            return _epilogue(launch_tiles(x2d, w_q, cfg, wrap=wrap, num_sms=num_sms), w_scale, bias, x2d.dtype)
        return run

    mma = None if x.dtype == torch.float32 else split_mma.pick_config(n, k, num_sms)
    one_row = [(1, finished(gemv.launch_gemv))] if k % 4 == 0 else []  # the GEMV reads 4-byte words along K
    if MMA_ROWS and ptx_available() and mma_rows.applies(x, w_q):
        small = [(rows, finished(mma_rows.launch, cfg=MMA_ROWS, rows=rows)) for rows in (1, SMALL_M_MAX)]
    elif mma is not None and split_mma.runs_one_row(mma):  # the widest tiles: the INT8 tensor cores from one row
        small = [(rows, finished(split_mma.launch, cfg=mma, rows=rows)) for rows in (1, SMALL_M_MAX)]
    elif mma is not None:  # narrower tiles or a split K: the INT8 tensor cores above one row, the GEMV at M = 1
        small = one_row + [(SMALL_M_MAX, finished(split_mma.launch, cfg=mma, rows=SMALL_M_MAX))]
    else:
        small = one_row + [(SMALL_M_MAX, finished(launch_dot, num_sms=num_sms))]
    above = [(None, large_m)] if large_m else LARGE_M
    buckets = small + [(limit, large(c)) for limit, c in above]
    return run_by_buckets(x, k, n, buckets, (w_q, w_scale) + ((bias,) if has_bias else ()))
