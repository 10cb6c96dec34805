"""Triton kernels of `qcompile::int4_groupwise_gemm` (CUDA only; imported lazily: CPU machines have no Triton).

Kernels (all read the engine layout of `format.py`: int32 words [K/8, N], N contiguous, K in the sequential or
the planar order; mm_t and mm read it sequentially, so on planar words x's columns are gathered first):

- `gemv._int4_gemv_kernel` (one row of x per program; M = 1): streams the weight and multiplies without tensor
  cores, on packed fp16x2 for 16-bit x (`gemv.py`).
- `mma_gemv._int4_gemv_mma_kernel` (one row of fp16 x, planar words; opt-in, a GEMV bucket's "mma"): the GEMV
  on tensor cores, mma.sync with the words as the A operand: 1.9 instructions per weight.
- `one_dot._int4_one_dot_kernel` (2-128 rows of 16-bit x, planar words): one tensor-core MMA per K step, the
  weight decoded by one LOP3 per pair straight into the MMA operand's layout (see `one_dot.py`).
- `_int4_mm_t_kernel` (swapped operands, small M; the fallback of the one_dot buckets):
  `y^T = dequant(W)^T @ x^T`, so the dequantized weight tile is the MMA's first operand and the few rows of x
  its narrow side; nibbles unpacked in registers with `tl.interleave`. Split-K like the GEMV. Triton writes each
  decoded tile to shared memory and reads it back in the MMA's layout. Kernels of this kind are bound by their
  own loop, not HBM: a planar variant with a dot per 16 K (tools/diag/int4_planar_probe.py) was only 2-23%
  faster with its weight read from L2 than from HBM.
- `_int4_mm_kernel` (tiles of BLOCK_M rows, any M, grouped tile order): the plain orientation, with
  in-register (`UNPACK`) or duplicate-address nibble loads. It lost to mm_t and to dequantize + cuBLAS on
  the H200; it runs for groups that are not whole steps of >= 16 (e.g. 8), which mm_t and the GEMV cannot take.
- `_int4_dequant_kernel`: `dequant(W)` in x.dtype, for the dequantize-then-cuBLAS path of large M (bias in
  cuBLAS's epilogue: `gemm_dispatch.linear_bias`).
- `dequant_fp8._int4_dequant_t_kernel`: W^T in FP8 for the opt-in FP8 path above 128 rows (`fp8_large_m`,
  `plugins/fp8_large_m.py`: the bucket kind "fp8" that `int4_gemm_triton` puts in place of "dequant").

Dequantization tricks (what makes a weight cost a few integer/float ops, never an int->float conversion):
- "magic number" conversion: a signed nibble u (two's complement, value q) XOR 8 is q + 8 in [0, 15]; OR-ed
  into the mantissa of a float whose exponent makes the mantissa ulp 1, it becomes that float + q + 8
  (fp32: 2^23, bits 0x4B000000; bf16: 128, bits 0x4300; fp16: 1024, bits 0x6400). One XOR with the
  constant does both, then one subtraction of (magic + 8 + zero point) gives q - zp exactly;
- group scales are applied to each K step's partial product (`SCALE_ACC`) when the step lies inside one
  group: the dot then sees exact small integers, and the scale costs one multiply per output per step
  instead of one per weight; otherwise the weight tile is scaled before the dot.
- weights are loaded `evict_first` (streamed once), so L2 keeps the activations.

W4A8: x is float8_e4m3fn with a per-row scale `x_row_scale` (per-tensor static scales are broadcast by
the op). By default its values are converted exactly to the activations' float type and run through the
W4A16 kernels, the row scale applied in the epilogue: FP8 numerics on bf16/fp16 tensor cores. The tile
kernels can instead feed FP8 tiles and the weight integers q - zp ([-15, 15], exact in E4M3) to FP8 dots
(`fp8_dot` in a configuration); on the H200 that measured slower (benchmarks/int4_tune_v2b.json), so no
default bucket uses it.

Dispatch on M (`int4_gemm_triton`): configurations per M bucket (`CONFIGS`, tuned on the H200 with
tools/tune_int4_gemm.py). A Python branch when M is a concrete int (eager); with a symbolic M (torch.export,
AOTInductor with a dynamic row count) a chain of `torch.cond(M <= limit, ...)`, so every bucket's kernel is
compiled and the choice is made at run time (no guard on M).

Split K leaves the op three kernels per call: a zero fill, the kernel (fp32 atomics) and the bias/cast epilogue.
A GEMV or one-dot bucket whose configuration sets "finish" (`finished`) writes `y + bias` in the output dtype from
the kernel instead: the last split of each tile, counted by an atomic, stores it (`triton_tiles.finish_split_tile`),
so no epilogue kernel follows. The 16- and 64-row one-dot buckets ship with it; the 128-row bucket does not, and
the GEMV only in eager calls (see `CONFIGS`).

`launch_*` and `int4_gemm_triton` take `wrap` (identity for raw Triton: tests run them under
TRITON_INTERPRET=1 on CPU tensors; `torch.library.wrap_triton` from the op, so AOTInductor compiles the
kernels into the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins import fp8_large_m as fp8_large_m_path
from qcompile.plugins.gemm_dispatch import (DEFAULT_SMS, add_bias, cdiv, from_rows, identity, linear_bias,
                                             optional_arg, run_by_buckets, split_for_waves, traced, unpack_optional)
from qcompile.plugins.int4_gemm import gemv, one_dot
from qcompile.plugins.int4_gemm.dequant_fp8 import fp8_weight
from qcompile.plugins.int4_gemm.format import PACK, columns_in_words_order, is_planar
from qcompile.plugins.int4_gemm.gemv import k_step, nibble_plus_136
from qcompile.plugins.int4_gemm.half2 import ptx_available, word_k
from qcompile.plugins.int4_gemm.reference import check_args, fp8_linear
from qcompile.plugins.triton_tiles import grouped_tile, jit_any_m, store_tile

FP32_MAGIC = 8388616.0  # 2^23 + 8: the fp32 whose mantissa bits 0..3 hold q + 8
MAGIC16 = {torch.bfloat16: (0x4308, 136.0), torch.float16: (0x6408, 1032.0)}  # (bits XOR-ed in, value - q)

# M buckets -> launch configuration (kernel "gemv" | "one_dot" | "mm_t" | "mm" | "dequant" (dequantize + cuBLAS);
# tile sizes; split-K target waves; fp8_dot: W4A8 on FP8 dots instead of exact conversion to the float type).
# The last bucket has limit None (every larger M). Chosen from tools/tune_int4_gemm.py runs on the H200
# (benchmarks/int4_tune_v2b.json, then int4_tune_v2c.json around its winners; the M = 1 tile GEMV from
# benchmarks/int4_tune_gemv.json: within 7% of each decode shape's best but 4096x1024, 1.12x there). The
# one_dot buckets (planar words, 16-bit x) from benchmarks/int4_tune_one_dot.json (M = 16 and 64 on the four
# Llama-sized layers): the configuration whose worst cell is closest to that cell's best (M = 16: within 10%,
# M = 64: within 3%); "fallback" runs sequential words, fp32 x, and groups that are not multiples of 64 (the
# earlier mm_t buckets). The 16-row bucket's waves = 7.5 gives each of the four layers the split count of its
# best cell in benchmarks/int4_tune_one_dot_s17.json (the fewest power-of-two splits with >= ~3.9 waves of
# programs: 8 / 4 / 8 / 2 splits); waves = 4 was 4-11% slower on 4096 x 14336 and 8192 x 28672, waves = 8 20%
# slower on 4096 x 4096 (16 splits of 2 steps). The 64-row kernel holds 147 registers per thread (sm_90, triton
# 3.6.0), so 3 programs fit on an SM (`resident`): with it, 8192 x 28672 splits K in two (448 tiles overflow the
# 396 slots), 14-16% faster at 32 and 64 rows; the other layers keep their split. Where K is not split (4096 x
# 14336), the scale goes on the weight tile (`one_dot.scale_on_weight`): 28.3 against 30.8 µs at 64 rows
# (benchmarks/int4_tune_one_dot-scale_w-s22.json; 128-row tiles lost with it on every layer). 65-128 rows take 128-row
# tiles, one M tile that reads the weight once: at M = 128, 13-35% faster than two 64-row tiles on the four layers
# and the best 128-row tile on each (benchmarks/int4_tune_one_dot-m32-128-s19.json, -w16-s19.json); at 80, 100 and
# 128 rows the shipped tile is the sweep's best or within 7% of it (int4_tune_one_dot-m80-128-s20.json).
# "finish" (`finished`) on the 16- and 64-row buckets: the llama3-8b-layers w4a16_awq engine ran 16 rows in 0.2223 /
# 0.2139 / 0.2133 against 0.2291 / 0.2167 / 0.2174 ms, 64 rows in 0.3108 / 0.3160 against 0.3152 / 0.3181 (H100,
# CUDA graph, three runs, BENCHMARKS.md thirty-seventh session). Not on the 128-row bucket: 128 rows took 0.4129 /
# 0.4132 against 0.4047 / 0.4012 ms with it. Not on the GEMV in engines: finished, each GEMV took 1.0-2.6 µs more,
# more than the 1.2 µs cast kernel it saves (0.1884 against 0.1883 ms per step). Called eagerly (no "finish" set:
# `_finishes`), the GEMV finishes, where the op would otherwise launch a bias add and a cast after it: the op with a
# bias 5-35% faster at one row on the four kernel-target layers (13.25 against 9.81 µs on 4096 x 4096; H100, CUDA
# graph, benchmarks/int4_gemm-gemv-*-finish-h100_s50.*).
# "x_pairs" on the GEMV (`gemv.launch_gemv`; fp16 x, planar words, no zero points: every CUDA engine's symmetric INT4
# layer): x's own fp16 values as the pairs, one scale per program; 3.23 SASS instructions per weight against 3.75.
# In the llama3-8b-layers w4a16_awq engine at one row each of the 8 GEMVs took 5-10% less (162.4 against 169.9 µs
# of kernels per step) and the step 0.1859 against 0.1900 ms (H100, CUDA graph; BENCHMARKS.md forty-first session).
# Its pairs as int32 words (x 4-byte aligned): 3.05 instructions per weight; the op 0.2-1.5% faster on the four
# decode layers against the same kernel on x 2-byte aligned (H100; BENCHMARKS.md forty-second session).
# "mma" (a dict: warps, waves, paired) on a GEMV bucket runs the tensor-core GEMV (`mma_gemv`) where it applies.
# Not set: on the H100 the op was 1-2% faster on the down projection and 2-16% slower on the other decode layers,
# and the w4a16_awq decode step 0.1956 against 0.1833 ms (BENCHMARKS.md forty-second session). Paired, on the H200:
# its 8 GEMVs 84 against 92 µs of kernel time, the graph-replayed step 0.1706 against 0.1700 ms, and 0.1788 built
# with --pdl (BENCHMARKS.md forty-eighth session).
#
# TMA tiles of the 16- and 64-row buckets (a one-dot config's "tma", `one_dot.use_tma`): on layers at least min_n
# wide the weight and x load through TMA descriptors, with these keys over the bucket's.
# The op with them, host descriptors in 128-byte boxes, against the pointer loads (bias, bf16 out, µs;
# benchmarks/fp4_int4_gemm-tma128-s23.json, every layer's tiles from N = 4096): 4096 x 14336 24.1 against 28.2 at
# 16 rows; 8192 x 28672 58.4 / 90.8 / 92.4 against 68.7 / 99.7 / 103.0 at 16 / 40 / 64 rows. Where they lost:
# 4096 x 4096 (0.93-0.98x), and 4096 x 14336 at 40 / 64 rows (0.89 / 0.87x: its 128-wide tiles split K there, so
# the op pays fp32 partial sums and an epilogue it otherwise skips), hence min_n. 14336 x 4096 gained 2-6%, which
# min_n leaves out with 4096 x 4096. The AOTInductor package test with them passes on the H200
# (test_cuda_aoti_package_dynamic_rows, bf16-wide; benchmarks/gpu-tests-tma-aoti-s23.log).
TMA_TILES = {16: dict(min_n=8192, BLOCK_N=128, waves=4),
             64: dict(min_n=16384, BLOCK_N=128, waves=2, resident=0, SCALE_W=False)}

_MM_T_64_ROWS = dict(kernel="mm_t", BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, waves=2,
                     SCALE_ACC=False)
CONFIGS = [
    (1, dict(kernel="gemv", BLOCK_N=512, MIN_TILES=8, BLOCK_K=32, num_warps=2, num_stages=3,
             waves=32, x_pairs=True)),
    (16, dict(kernel="one_dot", BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3, waves=7.5, SCALE_W=False,
              finish=True, tma=TMA_TILES[16],
              fallback=dict(kernel="mm_t", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, waves=8,
                            SCALE_ACC=False))),
    (64, dict(kernel="one_dot", BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, waves=2, resident=3,
              SCALE_W="unsplit", finish=True, tma=TMA_TILES[64], fallback=_MM_T_64_ROWS)),
    (128, dict(kernel="one_dot", BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, waves=2, SCALE_W=False,
               fallback=_MM_T_64_ROWS)),
    (None, dict(kernel="dequant")),
]


def pointer_tiles(configs: list = CONFIGS) -> list:
    """`configs` without their TMA tiles: every load through pointers (to time and test against them)."""
    return [(limit, {key: v for key, v in cfg.items() if key != "tma"}) for limit, cfg in configs]


def finished(configs: list, kinds: tuple[str, ...] = ("gemv", "one_dot"), finish: bool = True) -> list:
    """`configs` with the buckets of these kernels finishing in the kernel ("finish": their split tiles counted, the
    last one writes `y + bias` in x's dtype; no cast kernel after them), or with finish=False not (fp32 sums, then
    a cast kernel); the other buckets as they are (`tools/bench_engines.py` variants int4-gemv-finish,
    int4-unfinished)."""
    return [(limit, dict(cfg, finish=finish) if cfg["kernel"] in kinds else cfg) for limit, cfg in configs]


DEQUANT = dict(BLOCK_KW=8, BLOCK_N=256, num_warps=4)  # tile of `_int4_dequant_kernel`: 7 within 3% (benchmarks/dequant.json)


@triton.jit
def _nibbles(w_ptr, offs_k, offs_n, mask, N):
    """[BLOCK_K, BLOCK_N] int32: nibble of q[k, n] in bits 0..3 (row k reads word k // 8)."""
    words = tl.load(w_ptr + (offs_k // 8).to(tl.int64)[:, None] * N + offs_n[None, :], mask=mask, other=0,
                    eviction_policy="evict_first")
    return (words >> ((offs_k % 8) * 4)[:, None]) & 0xF


@triton.jit
def _unpack_k_rows(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Words [BLOCK_K/8, BLOCK_N] -> nibbles [BLOCK_K, BLOCK_N] (row 8w + j = nibble j of word row w)."""
    n0, n1, n2, n3 = words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF
    n4, n5, n6, n7 = (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF
    a = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(tl.permute(a, (0, 2, 3, 4, 1)), (BLOCK_K, BLOCK_N))  # j = 4*t0 + 2*t1 + t2


@triton.jit
def _unpack_k_cols(words):
    """Words [BLOCK_N, BLOCK_K/8] (K last) -> nibbles [BLOCK_N, BLOCK_K] (column 8w + j = nibble j of word w)."""
    n0, n1, n2, n3 = words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF
    n4, n5, n6, n7 = (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF
    return tl.interleave(tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6)),
                         tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7)))


@jit_any_m
def _int4_mm_t_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, y_ptr,
    M, N, K, stride_xm, group_size, k_per_split,
    K_STEPS: tl.constexpr, HAS_ZERO: tl.constexpr, ROW_SCALE: tl.constexpr, ATOMIC: tl.constexpr,
    SCALE_ACC: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Swapped operands: y^T [BLOCK_N, BLOCK_M] = dequant(W)^T @ x^T, so the dequantized weight tile is the
    MMA's first (register) operand and a small M is the MMA's narrow side. Steps lie in one group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for step in range(0, K_STEPS):
        k0 = k_lo + step * BLOCK_K
        kw = k0 // 8 + offs_w
        words = tl.load(w_ptr + kw.to(tl.int64)[None, :] * N + offs_n[:, None],
                        mask=mask_n[:, None] & (kw < K // 8)[None, :], other=0, eviction_policy="evict_first")
        nib = _unpack_k_cols(words)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None],
                     mask=mask_m[None, :] & (offs_k < K)[:, None], other=0.0)
        g = k0 // group_size
        smask = mask_n & (k0 < K)
        s = tl.load(s_ptr + g * N + offs_n, mask=smask, other=0.0).to(tl.float32)[:, None]
        c = tl.full((BLOCK_N, 1), MAGIC_VALUE, tl.float32)
        if HAS_ZERO:
            c += tl.load(z_ptr + g * N + offs_n, mask=smask, other=0).to(tl.float32)[:, None]
        if MAGIC_BITS == 0x4B000008:
            w = (nib ^ MAGIC_BITS).to(tl.float32, bitcast=True) - c
        else:
            w = (nib ^ MAGIC_BITS).to(tl.int16).to(dot_dtype, bitcast=True) - c.to(dot_dtype)
        if SCALE_ACC:
            if dot_dtype == tl.float32:
                acc += tl.dot(w, xt, input_precision="ieee") * s
            else:
                acc += tl.dot(w.to(dot_dtype), xt) * s
        else:
            if dot_dtype == tl.float32:
                acc = tl.dot(w * s, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot((w * s.to(w.dtype)).to(dot_dtype), xt, acc)
    if ROW_SCALE:
        acc = acc * tl.load(rs_ptr + offs_m, mask=mask_m, other=0.0)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    ymask = mask_m[None, :] & mask_n[:, None]
    store_tile(y_ptrs, acc, ymask, ATOMIC)


@jit_any_m
def _int4_mm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, y_ptr,
    M, N, K, stride_xm, group_size, k_per_split,
    K_STEPS: tl.constexpr, HAS_ZERO: tl.constexpr, ROW_SCALE: tl.constexpr, ATOMIC: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    SCALE_ACC: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr, UNPACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for step in range(0, K_STEPS):  # steps past K (last split) are masked
        k0 = k_lo + step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_n[None, :]
        if UNPACK:  # load each word once, unpack in registers
            kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(w_ptr + kw.to(tl.int64)[:, None] * N + offs_n[None, :],
                            mask=(kw < K // 8)[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
            nib = _unpack_k_rows(words, BLOCK_K, BLOCK_N)
        else:  # row k loads word k // 8 (duplicate addresses)
            nib = _nibbles(w_ptr, offs_k, offs_n, wmask, N)
        if GROUP_ALIGNED:  # the step lies in one group: one scale (and zero point) row
            g = k0 // group_size
            smask = mask_n & (k0 < K)
            s = tl.load(s_ptr + g * N + offs_n, mask=smask, other=0.0).to(tl.float32)[None, :]
            c = tl.full((1, BLOCK_N), MAGIC_VALUE, tl.float32)
            if HAS_ZERO:
                c += tl.load(z_ptr + g * N + offs_n, mask=smask, other=0).to(tl.float32)[None, :]
        else:  # per-row scale rows (a group smaller than the step, or not a divisor of it)
            gp = (offs_k // group_size).to(tl.int64)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + gp, mask=wmask, other=0.0).to(tl.float32)
            c = tl.full((BLOCK_K, BLOCK_N), MAGIC_VALUE, tl.float32)
            if HAS_ZERO:
                c += tl.load(z_ptr + gp, mask=wmask, other=0).to(tl.float32)
        if MAGIC_BITS == 0x4B000008:  # fp32 magic (fp32 and fp8 dots)
            w = (nib ^ MAGIC_BITS).to(tl.float32, bitcast=True) - c
        else:  # 16-bit magic: the tile never leaves 16 bits
            w = (nib ^ MAGIC_BITS).to(tl.int16).to(dot_dtype, bitcast=True) - c.to(dot_dtype)
        if SCALE_ACC:  # exact integers q - zp in the dot, group scale on the partial product
            if dot_dtype == tl.float32:
                part = tl.dot(xt, w.to(dot_dtype), input_precision="ieee")
            else:
                part = tl.dot(xt, w.to(dot_dtype))
            acc += part * s
        else:
            if dot_dtype == tl.float32:
                acc = tl.dot(xt, w * s, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, (w * s.to(w.dtype)).to(dot_dtype), acc)
    if ROW_SCALE:
        acc = acc * tl.load(rs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    store_tile(y_ptrs, acc, ymask, ATOMIC)


@triton.jit
def _int4_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, group_size, stride_w,
    HAS_ZERO: tl.constexpr, GROUP_ALIGNED: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr,
    PLANAR: tl.constexpr = False,
):
    """dequant(W) [K, N] in out's dtype from [BLOCK_KW word rows, BLOCK_N] tiles: nibble j of word row w is
    K row `word_k(w, j, PLANAR)` (8w + j in the sequential order), placed in bits 16..19 of 128.0 (136 + q, as in
    the GEMV), `((136 + q) - (136 + zp)) * s` in
    fp32 (exact, then one rounding to out's dtype, as the reference). When the tile's 8 * BLOCK_KW rows lie in
    one group (`GROUP_ALIGNED`) its scale and zero-point row is loaded once, not once per row. stride_w: the row
    stride of the words, scales and zero points (N, or more for a slice of a wider weight's columns)."""
    kw = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (kw < K // 8)[:, None] & mask_n[None, :]
    words = tl.load(w_ptr + kw.to(tl.int64)[:, None] * stride_w + offs_n[None, :], mask=mask, other=0,
                    eviction_policy="evict_first")
    if GROUP_ALIGNED:
        g = (tl.program_id(0) * BLOCK_KW * 8) // group_size
        s = tl.load(s_ptr + g * stride_w + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c = tl.full((1, BLOCK_N), 136.0, tl.float32)
        if HAS_ZERO:
            c += tl.load(z_ptr + g * stride_w + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    for j in tl.static_range(8):
        kk = word_k(kw, j, PLANAR)
        if not GROUP_ALIGNED:
            gp = (kk // group_size).to(tl.int64)[:, None] * stride_w + offs_n[None, :]
            s = tl.load(s_ptr + gp, mask=mask, other=0.0).to(tl.float32)
            c = tl.full((BLOCK_KW, BLOCK_N), 136.0, tl.float32)
            if HAS_ZERO:
                c += tl.load(z_ptr + gp, mask=mask, other=0).to(tl.float32)
        w = (nibble_plus_136(words, j) - c) * s
        tl.store(out_ptr + kk.to(tl.int64)[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def launch_mm(x2d, w_packed, w_scale, w_zero, group_size: int, cfg: dict, *, x_row_scale=None,
              out_dtype=torch.float32, wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """`x2d @ dequant(W)` [M, N] (times x_row_scale per row) with the tiled kernel: fp32 when split-K
    (atomics), else `out_dtype`. These kernels read K in the sequential order: planar words are the sequential
    packing of W's rows in `planar_order`, so x's columns are gathered in that order first (a fallback: 16-bit x
    runs `one_dot` on planar words)."""
    m, k = x2d.shape
    x2d = columns_in_words_order(x2d, group_size)
    n = w_packed.shape[1]
    fp8 = x2d.dtype == torch.float8_e4m3fn
    block_k, aligned = k_step(cfg["BLOCK_K"], k, group_size)
    if fp8 and not aligned:
        raise ValueError(f"W4A8 kernel: group size {group_size} must be a multiple of 16")
    magic_bits, magic_value = MAGIC16.get(x2d.dtype, (0x4B000008, FP32_MAGIC))
    tiles_n = cdiv(n, cfg["BLOCK_N"])
    # the split is chosen from the N tiles alone (M is symbolic in an engine; see int8_wo_gemm.launch_tiles)
    splits, per = split_for_waves(k, tiles_n, block_k, cfg["waves"], num_sms)
    y = (torch.zeros((m, n), dtype=torch.float32, device=x2d.device) if splits > 1
         else torch.empty((m, n), dtype=out_dtype, device=x2d.device))
    common = dict(K_STEPS=per // block_k, HAS_ZERO=w_zero is not None, ROW_SCALE=x_row_scale is not None,
                  ATOMIC=splits > 1, SCALE_ACC=(cfg["SCALE_ACC"] or fp8) and aligned,
                  MAGIC_BITS=magic_bits, MAGIC_VALUE=magic_value,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    args = (x2d, w_packed, w_scale, optional_arg(w_zero, w_scale),
            optional_arg(x_row_scale, w_scale), y, m, n, k, x2d.stride(0), group_size, per)
    if cfg["kernel"] == "mm_t" and aligned:
        wrap(_int4_mm_t_kernel)[(tiles_n, splits, cdiv(m, cfg["BLOCK_M"]))](*args, **common)
    else:
        grid = (cdiv(m, cfg["BLOCK_M"]) * tiles_n, splits)
        wrap(_int4_mm_kernel)[grid](*args, GROUP_ALIGNED=aligned, UNPACK=cfg.get("UNPACK", False),
                                    GROUP_M=cfg.get("GROUP_M", 1), **common)
    return y


def launch_dequant(w_packed, w_scale, w_zero, group_size: int, dtype, *, wrap=identity,
                   cfg: dict | None = None) -> torch.Tensor:
    """`dequant(W)` as `dtype` [K, N] (for a dequantize-then-cuBLAS path); `cfg` (default `DEQUANT`): tile. The
    words, scales and zero points may be the same column slice of a wider weight (one row stride for all three)."""
    cfg = cfg or DEQUANT
    kw, n = w_packed.shape
    present = [t for t in (w_packed, w_scale, w_zero) if t is not None]
    strides = {t.stride(0) for t in present if t.shape[0] > 1} or {n}  # a single row's stride is not used
    if len(strides) != 1 or any(t.stride(1) != 1 for t in present):
        raise ValueError(f"int4 dequantize: the words, scales and zero points need rows of one stride and "
                         f"contiguous columns, got row strides {sorted(strides)}")
    out = torch.empty((kw * PACK, n), dtype=dtype, device=w_packed.device)
    rows = cfg["BLOCK_KW"] * PACK
    aligned = group_size % rows == 0 or group_size == kw * PACK
    wrap(_int4_dequant_kernel)[(cdiv(kw, cfg["BLOCK_KW"]), cdiv(n, cfg["BLOCK_N"]), 1)](
        w_packed, w_scale, optional_arg(w_zero, w_scale), out, n, kw * PACK, group_size, strides.pop(),
        HAS_ZERO=w_zero is not None, GROUP_ALIGNED=aligned, BLOCK_KW=cfg["BLOCK_KW"], BLOCK_N=cfg["BLOCK_N"],
        PLANAR=is_planar(kw * PACK, group_size), num_warps=cfg["num_warps"],
    )
    return out


def _epilogue(acc, bias, dtype, row_scale=None):
    """`acc (* row_scale per row) + bias` in float32, cast to `dtype` (aten ops: Inductor fuses them)."""
    if row_scale is None:
        return add_bias(acc, bias, dtype)
    return add_bias(acc.to(torch.float32) * row_scale.reshape(-1, 1).to(torch.float32), bias, dtype)


def _finishes(cfg: dict, x2d) -> bool:
    """Whether a bucket's kernel writes `y + bias` in the output dtype itself: its "finish" (`finished`). A GEMV
    bucket that does not say finishes in eager calls, where nothing after the op would take in its epilogue, and not
    when traced into an engine, whose compiler fuses the cast and bias with the ops around them (see CONFIGS)."""
    if "finish" in cfg:
        return cfg["finish"]
    return cfg["kernel"] == "gemv" and not cfg.get("mma") and not traced(x2d)


def run_bucket(cfg: dict, x2d, w_words, w_scale, w_zero, bias, group_size: int, *, x_row_scale=None,
               out_dtype=None, wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """One M bucket's path: `x2d @ dequant(W) (* x_row_scale) + bias` [M, N] in out_dtype. w_words: the planar
    words [K / 8, N], or their view for TMA loads (`one_dot.tma_words`).

    FP8 x (W4A8) is converted to out_dtype exactly (E4M3 values are bf16/fp16 values) and its row scale
    applied in the epilogue, unless the configuration asks for FP8 dots (`fp8_dot`, "mm"/"mm_t" only)."""
    out_dtype = out_dtype or x2d.dtype
    w_packed = one_dot.planar_words(w_words)
    if cfg["kernel"] == "fp8":  # plugins/fp8_large_m.py: W8 in the words' K order, x quantized, then gathered to it
        w8, col_scale = fp8_weight(w_packed, w_scale, w_zero, group_size, wrap=wrap)
        return fp8_linear(x2d, x_row_scale, w8, col_scale, bias, group_size, out_dtype)
    if cfg["kernel"] == "gemv" and not k_step(cfg["BLOCK_K"], int(x2d.shape[1]), group_size)[1]:
        cfg = CONFIGS[1][1]["fallback"]  # the GEMV needs groups in whole steps of >= 16; mm/mm_t take any group
    kind = cfg["kernel"]
    if x2d.dtype == torch.float8_e4m3fn and not (kind in ("mm", "mm_t") and cfg.get("fp8_dot")):
        return _epilogue(run_bucket(cfg, x2d.to(out_dtype), w_words, w_scale, w_zero, None, group_size,
                                    out_dtype=torch.float32, wrap=wrap, num_sms=num_sms),
                         bias, out_dtype, x_row_scale)
    if kind == "one_dot" and not one_dot.supports(x2d.dtype, int(x2d.shape[1]), group_size):
        return run_bucket(cfg["fallback"], x2d, w_packed, w_scale, w_zero, bias, group_size, out_dtype=out_dtype,
                          wrap=wrap, num_sms=num_sms)
    finish = _finishes(cfg, x2d) and (out_dtype != torch.float32 or bias is not None)
    if kind == "gemv" and finish:  # the cast and bias in the GEMV, not in a kernel after it
        return gemv.launch_gemv(x2d, w_packed, w_scale, w_zero, group_size, cfg, bias=bias, out_dtype=out_dtype,
                           wrap=wrap, num_sms=num_sms)
    if kind == "gemv":
        acc = gemv.launch_gemv(x2d, w_packed, w_scale, w_zero, group_size, cfg, wrap=wrap, num_sms=num_sms)
    elif kind == "one_dot" and finish:
        return one_dot.launch(x2d, w_words, w_scale, w_zero, group_size, cfg, asm=ptx_available(),
                              out_dtype=out_dtype, bias=bias, finish=True, wrap=wrap, num_sms=num_sms)
    elif kind == "one_dot":
        acc = one_dot.launch(x2d, w_words, w_scale, w_zero, group_size, cfg, asm=ptx_available(),
                             out_dtype=out_dtype, wrap=wrap, num_sms=num_sms)
    elif kind == "dequant":  # the bias in cuBLAS's epilogue
        return linear_bias(x2d, launch_dequant(w_packed, w_scale, w_zero, group_size, x2d.dtype, wrap=wrap), bias,
                           out_dtype)
    else:
        acc = launch_mm(x2d, w_packed, w_scale, w_zero, group_size, cfg, x_row_scale=x_row_scale,
                        out_dtype=out_dtype, wrap=wrap, num_sms=num_sms)
    return _epilogue(acc, bias, out_dtype)


def int4_gemm_triton(x, w_packed, w_scale, w_zero, bias, group_size: int, *, x_row_scale=None, out_dtype=None,
                     wrap=identity, num_sms: int = DEFAULT_SMS, configs=None,
                     fp8_large_m: bool = False) -> torch.Tensor:
    """The op's GPU path: `x @ dequant(W) + bias` in out_dtype (default x.dtype), dispatched on M
    (`configs`, default `CONFIGS`). `fp8_large_m`: from `fp8_large_m.MIN_ROWS` rows the FP8 path
    (`plugins/fp8_large_m.py`) where it can run, instead of dequantize + cuBLAS bf16.

    W4A8: x is float8_e4m3fn [..., K] with `x_row_scale` float32 [M] (one scale per row of x), and
    `out_dtype` the activations' float type."""
    if x_row_scale is None:
        check_args(x, w_packed, w_scale, w_zero, bias, group_size)
    elif x.dtype != torch.float8_e4m3fn or out_dtype is None:
        raise ValueError("int4_gemm_triton: W4A8 needs x as float8_e4m3fn and out_dtype")
    # K and N are weight dims, static in an engine; int() specializes them (a guard) when a compiler
    # made them symbolic (torch.compile(dynamic=True)): the launch configuration needs Python ints
    k = int(x.shape[-1])
    n = int(w_packed.shape[1])
    has_zero, has_bias, has_rs = w_zero is not None, bias is not None, x_row_scale is not None

    def bucket(cfg):
        def run(x2d, w_words, w_scale, *rest):
            w_zero, bias, row_scale = unpack_optional(rest, has_zero, has_bias, has_rs)
            return run_bucket(cfg, x2d, w_words, w_scale, w_zero, bias, group_size, x_row_scale=row_scale,
                              out_dtype=out_dtype, wrap=wrap, num_sms=num_sms)
        return run

    configs = configs or CONFIGS
    if fp8_large_m and fp8_large_m_path.usable(x.device, k, n):
        configs = from_rows(configs, fp8_large_m_path.MIN_ROWS, dict(kernel="fp8"))
    if any(one_dot.tma_layer(cfg, n, k) for _, cfg in configs):  # the words' TMA view, made outside the
        w_packed = one_dot.tma_words(w_packed)  # buckets' torch.cond, where a bucket may take TMA
    weights = (w_packed, w_scale) + tuple(t for t in (w_zero, bias, x_row_scale) if t is not None)
    return run_by_buckets(x, k, n, [(limit, bucket(c)) for limit, c in configs], weights)
