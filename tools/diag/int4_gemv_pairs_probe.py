"""Diagnostic (H200): the INT4 GEMV (M = 1) with x's fp16 pairs prepared once per call, next to the INT4 op and
cuBLAS bf16 (CUDA-graph replay, rotating weights; every configuration checked against float64 first). Not part
of the product.

Why: the shipped GEMV (`int4_gemm/gemv.py::_int4_gemv_kernel`) is about 3.7 sm_90 SASS instructions per weight,
and only 2 of them are the products (`half2.dot8`). Most of the rest builds x's pairs: each thread loads the 8 x
of every word row it holds, takes their largest |x|, a power of two, four fp16 pairs, for only the 8 columns it
owns (`tools/diag/sass_count.py`: LDG, FMNMX, F2F, PRMT, FMUL). At 8192 x 28672 the GEMV streams 2.3 TB/s where
cuBLAS bf16 streams 4.3. The FP4 GEMV (`fp4_gemm/gemv.py`) reads ready-made pairs and is as fast or faster on
every decode shape while decoding a harder format.

Here x is prepared by aten ops (`pairs_of`, which Inductor could fuse into x's producer): per word row of the
engine layout (sequential or planar K order), the 8 x in `dot8`'s pair order, times a power of two `up` that puts
their largest |x| in [256, 512) (15/16 of them times 1/16 as `dot8` wants), as fp16; and `down = 1 / up` per word
row. The kernel then loads 4 int32 pairs and one float per word row (broadcast loads) and runs `dot8`.

    OUT=... python3 tools/diag/int4_gemv_pairs_probe.py [--shapes KxN ...] [--compiled-prep]

Kernel configurations: BLOCK_N x BLOCK_K on a number of warps, split-K `waves`, including 64 words per thread.
sm_90 SASS of the loop (compiled on the CPU): 2.96 instructions per weight at the shipped tile (512 x 32, 2 warps),
2.72 at 64 words per thread, against the shipped GEMV's 3.75.

H200, eighteenth session (benchmarks/int4_gemv_pairs_probe_s18.json, ..._compiled_prep_s18.json): every
configuration matched float64. With x prepared by eager aten ops (24-26 µs: a dozen launches) the probe lost
(0.40-0.75x the op). With `--compiled-prep` (one fused kernel, 2.4-2.6 µs) it was 0.99-1.08x the op on the six
shapes. The kernel and its epilogue alone took 0.81-0.89x the op's time. Not adopted. Inside an engine, where
the preparation could fuse into x's producer, the gain would be at most that.
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

from qcompile.plugins.gemm_dispatch import add_bias, cdiv, split_for_waves  # noqa: E402
from qcompile.plugins.int4_gemm.format import is_planar  # noqa: E402
from qcompile.plugins.int4_gemm.half2 import dot8, dot8_emulated, ptx_available  # noqa: E402
from qcompile.plugins.triton_tiles import store_tile  # noqa: E402

GROUP = 128
_FACTORS: dict = {}
PAIR_FACTORS = (1.0, 1.0, 0.0625, 0.0625, 1.0, 1.0, 0.0625, 0.0625)  # (x0, x4), (x1, x5) / 16, (x2, x6), (x3, x7) / 16


def pairs_of(x2d: torch.Tensor, planar: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs fp16 [M, K/8, 8], down fp32 [M, K/8]) in aten ops: each word row's 8 x in `dot8`'s order
    (x0, x4, x1, x5, x2, x6, x3, x7), scaled by `up` (and 1/16 for the odd pairs); down = 1 / up."""
    m, k = x2d.shape
    xf = x2d.float()
    if planar:  # K = 64 b + 16 a + 2 r + c for nibble j = 4 c + a of word row 8 b + r
        xw = xf.view(m, k // 64, 4, 8, 2).permute(0, 1, 3, 2, 4).reshape(m, k // 8, 8)
    else:  # K = 8 kw + 4 c + a
        xw = xf.view(m, k // 8, 2, 4).transpose(-1, -2).reshape(m, k // 8, 8)
    e = torch.clamp((xw.abs().amax(-1).view(torch.int32) >> 23) & 0xFF, min=9)
    up = ((262 - e) << 23).view(torch.float32)
    down = ((e - 8) << 23).view(torch.float32)
    factors = _FACTORS.get(x2d.device)
    if factors is None:  # made once, outside any CUDA-graph capture (a host-to-device copy cannot be captured)
        factors = _FACTORS[x2d.device] = torch.tensor(PAIR_FACTORS, device=x2d.device)
    return (xw * up[..., None] * factors).to(torch.float16), down


@triton.jit
def _gemv_pairs_kernel(p_ptr, d_ptr, w_ptr, s_ptr, y_ptr, N, K, group_size, k_per_split,
                       K_STEPS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pairs = p_ptr.to(tl.pointer_type(tl.int32)) + row * (K // 2)  # [K/8, 4] int32 per row of x
    downs = d_ptr + row * (K // 8)
    offs_w = tl.arange(0, BLOCK_K // 8)
    w_cols = w_ptr + offs_w.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    shape: tl.constexpr = (BLOCK_K // 8, BLOCK_N)
    for step in range(0, K_STEPS):
        k0 = pid_k * k_per_split + step * BLOCK_K
        kw = k0 // 8 + offs_w
        ok = kw < K // 8
        words = tl.load(w_cols + (k0 // 8).to(tl.int64) * N, mask=ok[:, None] & mask_n[None, :], other=0,
                        eviction_policy="evict_first")
        p04 = tl.broadcast_to(tl.load(pairs + kw * 4, mask=ok, other=0)[:, None], shape)
        p15 = tl.broadcast_to(tl.load(pairs + kw * 4 + 1, mask=ok, other=0)[:, None], shape)
        p26 = tl.broadcast_to(tl.load(pairs + kw * 4 + 2, mask=ok, other=0)[:, None], shape)
        p37 = tl.broadcast_to(tl.load(pairs + kw * 4 + 3, mask=ok, other=0)[:, None], shape)
        down = tl.load(downs + kw, mask=ok, other=0.0)
        s = tl.load(s_ptr + (k0 // group_size) * N + offs_n, mask=mask_n & (k0 < K), other=0.0).to(tl.float32)
        if ASM:
            part = dot8(words, p04, p15, p26, p37)
        else:
            part = dot8_emulated(words, p04, p15, p26, p37)
        acc += part * (down[:, None] * s[None, :])
    store_tile(y_ptr + row * N + offs_n, tl.sum(acc, axis=0), mask_n, ATOMIC)


PREP = {"fn": pairs_of}  # --compiled-prep: torch.compile(pairs_of), one fused kernel as Inductor would make it


def launch(x2d, w_packed, w_scale, cfg: dict, bias=None, num_sms: int = 132) -> torch.Tensor:
    m, k = x2d.shape
    n = w_packed.shape[1]
    pairs, down = PREP["fn"](x2d, is_planar(k, GROUP))
    tiles = cdiv(n, cfg["BLOCK_N"])
    splits, per = split_for_waves(k, tiles, cfg["BLOCK_K"], cfg["waves"], num_sms)
    y = (torch.zeros if splits > 1 else torch.empty)((m, n), dtype=torch.float32, device=x2d.device)
    _gemv_pairs_kernel[(tiles, splits, m)](pairs, down, w_packed, w_scale, y, n, k, GROUP, per,
                                           K_STEPS=per // cfg["BLOCK_K"], ATOMIC=splits > 1, BLOCK_N=cfg["BLOCK_N"],
                                           BLOCK_K=cfg["BLOCK_K"], ASM=ptx_available(), num_warps=cfg["num_warps"],
                                           num_stages=3)
    return add_bias(y, bias, x2d.dtype)


def configs():
    for (bn, bk, w), waves in itertools.product([(512, 32, 2), (1024, 32, 4), (1024, 32, 2), (512, 64, 2),
                                                 (2048, 32, 4), (256, 64, 2)], (16, 32)):
        yield f"pairs {bn}x{bk} w{w} waves{waves}", dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, waves=waves)


def weight_sets(make, n_bytes: int) -> list:
    """`make()` as many times (2-8) as copies of n_bytes fit 512 MB, to rotate through so a timed call does not
    find its weight in L2."""
    return [make() for _ in range(max(2, min(8, (512 << 20) // n_bytes)))]


def int4_weight_sets(k: int, n: int) -> list:
    """Random INT4 g128 weights (engine layout, scales) [K, N], `weight_sets`."""
    from bench_fp4_gemm import make_int4
    return weight_sets(lambda: make_int4(k, n), k * n // 2)


def baselines(k: int, n: int, m: int, prep) -> tuple:
    """What every probe cell of an INT4 GEMV with prepared x starts from: (x bf16 [m, k], bias, rotating INT4
    weight sets, the float64 reference on the first set, results with cuBLAS bf16, the INT4 op (time and relative
    error) and `prep(x, planar)` alone timed)."""
    from gpu_timing import bench, rotating
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm
    from qcompile.plugins.int4_gemm.reference import dequantize_weight
    dtype = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    res = {}
    wb = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["cublas bf16"] = bench(lambda: torch.nn.functional.linear(x, wb(), bias), copies=4, rep=40)
    sets = int4_weight_sets(k, n)
    res["int4 op"] = bench(lambda it=itertools.cycle(sets): int4_groupwise_gemm(x, *next(it), None, bias, GROUP),
                           copies=4, rep=40)
    res["pairs_of alone"] = bench(lambda: prep(x, is_planar(k, GROUP)), copies=4, rep=40)
    ref = x.double() @ dequantize_weight(*sets[0], None, GROUP).double().to(x.device) + bias.double()
    res["int4 op rel err"] = float((int4_groupwise_gemm(x, *sets[0], None, bias, GROUP).double() - ref).norm()
                                   / ref.norm())
    return x, bias, sets, ref, res


def wrong(y: torch.Tensor, ref: torch.Tensor, op_err: float) -> str | None:
    """Why y is not accepted (relative L2 error against ref above max(2x the op's, 2e-3)), or None."""
    err = float((y.double() - ref).norm() / ref.norm())
    return f"wrong: rel err {err:.3g} (op {op_err:.3g})" if err > max(2 * op_err, 2e-3) else None


def time_checked(candidates, run, ref: torch.Tensor, op_err: float, sets: list, res: dict) -> dict:
    """Each (name, cfg) of `candidates` checked with `run(w_packed, w_scale, cfg)` on the first weight set
    (`wrong`), then timed on rotating sets: res[name] gets its µs, or why not (wrong, or what Triton could not
    build). Returns {name: µs} of those timed."""
    from gpu_timing import bench
    timed = {}
    for name, cfg in candidates:
        try:
            reason = wrong(run(*sets[0], cfg), ref, op_err)
            if reason:
                res[name] = reason
                continue
            res[name] = timed[name] = bench(lambda it=itertools.cycle(sets), cfg=cfg: run(*next(it), cfg),
                                            copies=4, rep=40)
        except Exception as e:  # noqa: BLE001  (a configuration Triton cannot build)
            res[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return timed


def against_shipped(x, sets: list, ref: torch.Tensor, shipped_call, candidates, run, res: dict, label: str) -> dict:
    """A probe cell's timings beside the kernel the op ships: cuBLAS bf16 on x (res["cublas bf16"]), the shipped
    kernel `shipped_call(*set)` (its relative error against ref on the first set, res["shipped rel err"], and
    res[label], its µs on the rotating sets), then `time_checked` for the candidates with the shipped error as the
    bar. Returns time_checked's {name: µs}."""
    from gpu_timing import bench, rotating
    k, n = x.shape[1], ref.shape[1]
    wb = rotating(lambda: torch.randn(k, n, device=x.device, dtype=x.dtype), k * n * 2)
    res["cublas bf16"] = bench(lambda: x @ wb(), copies=4, rep=40)
    res["shipped rel err"] = err = float((shipped_call(*sets[0]).double() - ref).norm() / ref.norm())
    res[label] = bench(lambda it=itertools.cycle(sets): shipped_call(*next(it)), copies=4, rep=40)
    return time_checked(candidates, run, ref, err, sets, res)


def best_of_each(timed: dict, prefixes, base: float) -> str:
    """' | µs (name; ratio x shipped)' for the fastest timed candidate of each name prefix that has one."""
    line = ""
    for prefix in prefixes:
        of_prefix = {c: t for c, t in timed.items() if c.startswith(prefix)}
        if of_prefix:
            best = min(of_prefix, key=of_prefix.get)
            line += f" | {of_prefix[best]:.1f} ({best}; {base / of_prefix[best]:.2f}x shipped)"
    return line


def cell(k: int, n: int, m: int) -> dict:
    x, bias, sets, ref, res = baselines(k, n, m, PREP["fn"])
    op_err = res["int4 op rel err"]
    timed = time_checked(configs(), lambda w, sc, cfg: launch(x, w, sc, cfg, bias), ref, op_err, sets, res)
    line = f"{k}x{n} M={m}: bf16 {res['cublas bf16']:.1f} | int4 op {res['int4 op']:.1f} (err {op_err:.2g})"
    if timed:
        best = min(timed, key=timed.get)
        res["best"] = best
        line += (f" | pairs {timed[best]:.1f} ({best}) {res['int4 op'] / timed[best]:.2f}x op "
                 f"{res['cublas bf16'] / timed[best]:.2f}x bf16 | pairs_of alone {res['pairs_of alone']:.1f}")
    else:
        line += " | pairs: " + str(next((v for c, v in res.items() if c.startswith("pairs ")), "none"))
    print(line, flush=True)
    return res


def main():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from gpu_timing import MODE
    from probe_util import run_grid
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x6144", "4096x14336", "14336x4096",
                                                    "4096x28672", "8192x28672"])
    ap.add_argument("--compiled-prep", action="store_true", help="prepare x with torch.compile(pairs_of)")
    args = ap.parse_args()
    MODE["graph"] = True
    if args.compiled_prep:
        PREP["fn"] = torch.compile(pairs_of, dynamic=False)
    name = "int4_gemv_pairs_probe" + ("_compiled_prep" if args.compiled_prep else "") + ".json"
    run_grid(cell, [tuple(map(int, s.split("x"))) for s in args.shapes], [1], name)


if __name__ == "__main__":
    main()
