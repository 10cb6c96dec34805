"""Diagnostic (H200): an INT4 GEMV (M = 1) in which each program owns a few weight columns over all of K, next to
the INT4 op and cuBLAS bf16 (CUDA-graph replay, rotating weights; every configuration checked against float64
first). Not part of the product.

Why: the shipped GEMV (`int4_gemm/gemv.py::_int4_gemv_kernel`) splits K until about 32 waves of programs stream
the weight, so every call pays a zero fill, fp32 atomics and a separate bias/cast epilogue: three launches. On
4096 x 4096 the INT4 op takes 13.5 µs where the FP4 GEMV (`fp4_gemm/gemv.py`: each program owns 4 weight rows
over all of K, x's pairs made by a first small kernel, the epilogue in the GEMV) takes 8.1 µs, although FP4 moves
more bytes (BENCHMARKS.md, eighteenth session). INT4's engine layout is [K/8, N] with N contiguous, so here a
program owns BLOCK_N (4-32) columns and reads [BLOCK_KW word rows, BLOCK_N] tiles down all of K (32-128 bytes of
each word row): no split, no zero fill, no atomics, bias and cast in the kernel.

x is prepared once per call by `int4_gemv_pairs_probe.pairs_of` (torch.compile'd: one kernel, as Inductor would
make it; inside an engine it could fuse into x's producer): per word row the 8 x in `dot8`'s pair order times a
power of two, as fp16 pairs, and `down = 1 / up`. The group scale of each word row is loaded per (word row,
column): duplicate addresses within a group, served by L1.

    OUT=... python3 tools/diag/int4_gemv_full_k_probe.py [--shapes KxN ...]

Reports per shape: bf16, the INT4 op, the probe's best configuration with the preparation (two launches) and the
kernel alone on ready pairs (what an engine that fuses the preparation would pay).

H200, twentieth session (benchmarks/int4_gemv_full_k_probe_s20.json): every configuration matched float64; the
best (16 columns x 256 word rows, 4-8 warps) was 1.1-1.5x the op on the Llama-3-8B decode layers with the
preparation (4096 x 4096: 14.3 -> 9.2 µs) and 0.96x on 8192 x 28672. Built into the op for layers of up to 2^27
weights (commit d5eb307), it made the decode engine slower: its kernels took 112.7 µs per step plus 8 µs of pair
kernels, against 101 µs for the split GEMV, and w4a16_awq ran 1.59x fp16 at batch 1 against 1.67x
(benchmarks/decode-llama3-8b-layers-full-k_s20.json). The op's time includes the split GEMV's zero fill and
epilogue launches, which inside the engine cost little; the split GEMV kernel itself is the faster one. Not
adopted (reverted in the next commit).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from int4_gemv_pairs_probe import baselines, pairs_of, time_checked  # noqa: E402
from qcompile.plugins.gemm_dispatch import cdiv, optional_arg  # noqa: E402
from qcompile.plugins.int4_gemm.format import is_planar  # noqa: E402
from qcompile.plugins.int4_gemm.half2 import dot8, dot8_emulated, ptx_available  # noqa: E402

GROUP = 128


@triton.jit
def _gemv_full_k_kernel(p_ptr, d_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, group_size,
                        K_STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_KW: tl.constexpr, ASM: tl.constexpr):
    """y[row, n] = sum_k x[row, k] dequant(W)[k, n] (+ bias[n]) for BLOCK_N columns n over all of K."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pairs = p_ptr.to(tl.pointer_type(tl.int32)) + row * (K // 2)  # [K/8, 4] int32 per row of x
    downs = d_ptr + row * (K // 8)
    offs_w = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    shape: tl.constexpr = (BLOCK_KW, BLOCK_N)
    for step in range(0, K_STEPS):
        kw = step * BLOCK_KW + offs_w
        ok = kw < K // 8
        m2 = ok[:, None] & mask_n[None, :]
        words = tl.load(w_ptr + kw.to(tl.int64)[:, None] * N + offs_n[None, :], mask=m2, other=0,
                        eviction_policy="evict_first")
        s = tl.load(s_ptr + (kw * 8 // group_size)[:, None] * N + offs_n[None, :], mask=m2, other=0.0)
        p04 = tl.broadcast_to(tl.load(pairs + kw * 4, mask=ok, other=0)[:, None], shape)
        p15 = tl.broadcast_to(tl.load(pairs + kw * 4 + 1, mask=ok, other=0)[:, None], shape)
        p26 = tl.broadcast_to(tl.load(pairs + kw * 4 + 2, mask=ok, other=0)[:, None], shape)
        p37 = tl.broadcast_to(tl.load(pairs + kw * 4 + 3, mask=ok, other=0)[:, None], shape)
        down = tl.load(downs + kw, mask=ok, other=0.0)
        if ASM:
            part = dot8(words, p04, p15, p26, p37)
        else:
            part = dot8_emulated(words, p04, p15, p26, p37)
        acc += part * (down[:, None] * s.to(tl.float32))
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


PREP = {"fn": pairs_of}


def launch_kernel(pairs, down, w_packed, w_scale, bias, x_dtype, cfg: dict) -> torch.Tensor:
    m, k = pairs.shape[0], pairs.shape[1] * 8
    n = w_packed.shape[1]
    y = torch.empty((m, n), dtype=x_dtype, device=w_packed.device)
    _gemv_full_k_kernel[(cdiv(n, cfg["BLOCK_N"]), m)](
        pairs, down, w_packed, w_scale, optional_arg(bias, w_scale), y, n, k, GROUP,
        K_STEPS=cdiv(k // 8, cfg["BLOCK_KW"]), HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_KW=cfg["BLOCK_KW"], ASM=ptx_available(), num_warps=cfg["num_warps"], num_stages=1)
    return y


def launch(x2d, w_packed, w_scale, cfg: dict, bias=None) -> torch.Tensor:
    pairs, down = PREP["fn"](x2d, is_planar(x2d.shape[1], GROUP))
    return launch_kernel(pairs, down, w_packed, w_scale, bias, x2d.dtype, cfg)


def configs():
    for bn, bkw, w in [(4, 512, 4), (8, 256, 4), (8, 512, 4), (8, 512, 8), (8, 128, 2), (16, 128, 4),
                       (16, 256, 4), (16, 256, 8), (16, 64, 2), (32, 128, 4), (32, 64, 2), (32, 256, 8)]:
        yield f"full-k {bn}x{bkw} w{w}", dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=w)


def cell(k: int, n: int, m: int) -> dict:
    from gpu_timing import bench
    x, bias, sets, ref, res = baselines(k, n, m, PREP["fn"])
    op_err = res["int4 op rel err"]
    pairs, down = PREP["fn"](x, is_planar(k, GROUP))
    timed = time_checked(configs(), lambda w, sc, cfg: launch(x, w, sc, cfg, bias), ref, op_err, sets, res)
    alone = {}
    for name, cfg in configs():
        if name in timed:
            res[name + " kernel alone"] = alone[name] = bench(
                lambda it=itertools.cycle(sets), cfg=cfg: launch_kernel(pairs, down, *next(it), bias, x.dtype, cfg),
                copies=4, rep=40)
    line = f"{k}x{n} M={m}: bf16 {res['cublas bf16']:.1f} | int4 op {res['int4 op']:.1f} (err {op_err:.2g})"
    if timed:
        best = min(timed, key=timed.get)
        best_alone = min(alone, key=alone.get)
        res["best"], res["best kernel alone"] = best, best_alone
        line += (f" | full-k + prep {timed[best]:.1f} ({best}) {res['int4 op'] / timed[best]:.2f}x op "
                 f"{res['cublas bf16'] / timed[best]:.2f}x bf16 | kernel alone {alone[best_alone]:.1f} "
                 f"({best_alone}) {res['int4 op'] / alone[best_alone]:.2f}x op | prep {res['pairs_of alone']:.1f}")
    else:
        line += " | full-k: " + str(next((v for c, v in res.items() if c.startswith("full-k ")), "none"))
    print(line, flush=True)
    return res


def main():
    from gpu_timing import MODE
    from probe_util import run_grid
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x6144", "4096x14336", "14336x4096",
                                                    "4096x28672", "8192x28672"])
    args = ap.parse_args()
    MODE["graph"] = True
    PREP["fn"] = torch.compile(pairs_of, dynamic=False)
    run_grid(cell, [tuple(map(int, s.split("x"))) for s in args.shapes], [1], "int4_gemv_full_k_probe.json")


if __name__ == "__main__":
    main()
