"""Diagnostic (H200): an FP4 (NVFP4 / MXFP4) GEMV at M = 1 on packed half2, as the INT4 GEMV now does.

The FP4 op has no GEMV: at M = 1 its split-K tile kernel streams about 1 TB/s (0.43-0.68x of the INT4 op,
benchmarks/fp4_int4_gemm_half2.json). This probe decodes each uint32 word of the engine layout [N, K/8] (8 E2M1
codes along K) into four fp16 pairs (codes j, j + 4): the sign to bit 15, `e1 e0 m` to bits 9..11, i.e. the
fp16 `e2m1 * 2**-14` (subnormal code 1 included), two shifts, an AND and a LOP3 per pair, then four HFMA2
against fp16 x pairs scaled by a power of two (largest |x| of the step in [2**13, 2**14)), fp32 from there: the
block scale per word, the global scale at the end. Times it against cuBLAS bf16, the FP4 op and the INT4 op
(CUDA-graph replay, rotating weights), checks it against float64 first. Not part of the product.

Run on the H200 (twelfth session, benchmarks/fp4_gemv_probe.json): 1.1-2.2x the INT4 op's time, barely faster
than the FP4 op. The step's largest |x| is a reduction across the whole program here (K is spread over the
threads in this layout): shared memory and a barrier per step. `--column` times the product's GEMV
(plugins/fp4_gemm/gemv.py), which scales x per word column instead: 1.3-1.6x faster than the FP4 op
(benchmarks/fp4_gemv_probe_col.json). SASS (`sass_count.compile_sass`, sm_90): 9.3-10.2 instructions per weight
with x read per word, 5.7 with x pre-packed (`fp4_x_pairs`), of which the E2M1 decoding is about 2 (two
shifts, an AND and a LOP3 per pair: no shift-and-mask layout of the E2M1 bits can do a pair in one operation,
since {9, 10, 11, 15} does not tile 16 bits).

    OUT=... python3 tools/diag/fp4_gemv_probe.py [--column]
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/
from bench_fp4_gemm import make_fp4, make_int4  # noqa: E402
from gpu_timing import MODE, bench, rotating  # noqa: E402
from probe_util import run_part, save  # noqa: E402

from qcompile.plugins.fp4_gemm.gemv import GEMV, e2m1_dot8, launch_gemv, word_columns  # noqa: E402
from qcompile.plugins.fp4_gemm.kernel import _scale_multiplier  # noqa: E402
from qcompile.plugins.gemm_dispatch import split_for_waves  # noqa: E402
from qcompile.plugins.int4_gemm.half2 import x_of_words, x_pair  # noqa: E402
from qcompile.plugins.triton_tiles import store_tile  # noqa: E402

COLUMN_ONLY = "--column" in sys.argv  # second run: only the per-column kernel, fp16 x
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (4096, 6144), (4096, 28672)]


@triton.jit
def _fp4_gemv_kernel(x_ptr, stride_xm, w_ptr, s_ptr, g_ptr, y_ptr, N, K, kw_per_split, steps,
                     MX: tl.constexpr, B: tl.constexpr, HAS_GLOBAL: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    wp = w_ptr.to(tl.pointer_type(tl.uint32))
    sp = s_ptr.to(tl.pointer_type(tl.uint8))
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    x_row = x_ptr + tl.program_id(2) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    shape: tl.constexpr = (BLOCK_N, BLOCK_KW)
    for step in range(0, steps):
        kw = tl.program_id(1) * kw_per_split + step * BLOCK_KW + tl.arange(0, BLOCK_KW)
        words, bits, ok = word_columns(wp, sp, rows, mask_n, kw, K, B)
        x0, x1, x2, x3, x4, x5, x6, x7, big = x_of_words(x_row, kw, ok)
        e = tl.maximum((tl.max(big, axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF, 14)
        up = ((267 - e) << 23).to(tl.float32, bitcast=True)  # largest |x| * up in [2**13, 2**14)
        down = ((e - 13 + 14) << 23).to(tl.float32, bitcast=True)  # 1 / up, times 2**14 (the decode's 2**-14)
        part = e2m1_dot8(words, tl.broadcast_to(x_pair(x0, x4, up)[None, :], shape),
                         tl.broadcast_to(x_pair(x1, x5, up)[None, :], shape),
                         tl.broadcast_to(x_pair(x2, x6, up)[None, :], shape),
                         tl.broadcast_to(x_pair(x3, x7, up)[None, :], shape))
        acc += part * (_scale_multiplier(bits, MX, 0, 1.0) * down)
    out = tl.sum(acc, axis=1)
    if HAS_GLOBAL:
        out = out * tl.load(g_ptr)
    store_tile(y_ptr + offs_n, out, mask_n, ATOMIC)


def fp4_x_pairs(x2d):
    """(int32 [M, K/8, 4] fp16 pairs (x_j, x_j+4) * up, fp32 [M] down = 2**14 / up), up a power of two per row
    putting the row's largest |x| in [2**13, 2**14) (torch ops: an engine's Inductor fuses them)."""
    m, k = x2d.shape
    xf = x2d.float()
    _, ex = torch.frexp(xf.abs().amax(dim=1, keepdim=True))
    up = torch.ldexp(torch.ones_like(xf[:, :1]), 14 - ex)
    v = (xf * up).view(m, k // 8, 2, 4).transpose(2, 3).to(torch.float16).contiguous()
    return v.view(torch.int32).view(m, k // 8, 4), torch.ldexp(torch.ones_like(xf[:, 0]), ex[:, 0])


@triton.jit
def _fp4_gemv_packed_kernel(xp_ptr, d_ptr, w_ptr, s_ptr, g_ptr, y_ptr, N, K, kw_per_split, steps,
                            MX: tl.constexpr, B: tl.constexpr, HAS_GLOBAL: tl.constexpr, ATOMIC: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """As `_fp4_gemv_kernel` with x pre-packed (`fp4_x_pairs`): four int32 loads per word column, no scaling."""
    wp = w_ptr.to(tl.pointer_type(tl.uint32))
    sp = s_ptr.to(tl.pointer_type(tl.uint8))
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    xp = xp_ptr + tl.program_id(2) * (K // 2)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    shape: tl.constexpr = (BLOCK_N, BLOCK_KW)
    for step in range(0, steps):
        kw = tl.program_id(1) * kw_per_split + step * BLOCK_KW + tl.arange(0, BLOCK_KW)
        words, bits, ok = word_columns(wp, sp, rows, mask_n, kw, K, B)
        part = e2m1_dot8(words, tl.broadcast_to(tl.load(xp + kw * 4, mask=ok, other=0)[None, :], shape),
                         tl.broadcast_to(tl.load(xp + kw * 4 + 1, mask=ok, other=0)[None, :], shape),
                         tl.broadcast_to(tl.load(xp + kw * 4 + 2, mask=ok, other=0)[None, :], shape),
                         tl.broadcast_to(tl.load(xp + kw * 4 + 3, mask=ok, other=0)[None, :], shape))
        acc += part * _scale_multiplier(bits, MX, 0, 1.0)
    out = tl.sum(acc, axis=1) * tl.load(d_ptr + tl.program_id(2))
    if HAS_GLOBAL:
        out = out * tl.load(g_ptr)
    store_tile(y_ptr + offs_n, out, mask_n, ATOMIC)


def _time_gemv(res, label, kernel, x_args, w, ref, wf, fmt, block, n, k, bn, bkw, warps, waves, x_args_timed=None):
    """One GEMV configuration: checked on weights `w` against `ref` (float64), then timed on rotating weights
    `wf`; with `x_args_timed`, also timed with x's preparation inside the call ("+pack")."""
    tiles = triton.cdiv(n, bn)
    splits, per = split_for_waves(k, tiles, bkw * 8, waves, 132)

    def run(w, xa):
        y = (torch.zeros if splits > 1 else torch.empty)(n, dtype=torch.float32, device="cuda")
        c = kernel[(tiles, splits, 1)](
            *xa, w[0], w[1], w[2] if w[2] is not None else w[1], y, n, k, per // 8, per // (bkw * 8),
            MX=fmt == "mxfp4", B=block, HAS_GLOBAL=w[2] is not None, ATOMIC=splits > 1, BLOCK_N=bn, BLOCK_KW=bkw,
            num_warps=warps)
        return c, y
    c, y = run(w, x_args())
    name = f"{label} {bn}x{bkw} w{warps} waves{waves} splits{splits} regs{c.n_regs}"
    res[name + " err"] = round(float((y.double() - ref[0]).norm() / ref.norm()), 6)
    res[name] = bench(lambda: run(wf(), x_args()))
    if x_args_timed is not None:
        res[name + " +pack"] = bench(lambda: run(wf(), x_args_timed()))


def part(k, n):
    from qcompile.plugins.fp4_gemm.op import fp4_gemm
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm
    res = {}
    for dtype in (torch.float16,) if COLUMN_ONLY else (torch.bfloat16, torch.float16):
        dn = str(dtype)[6:]
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        wb = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
        res[f"cublas {dn}"] = bench(lambda: torch.nn.functional.linear(x, wb()))
        w4 = rotating(lambda: tuple(t.to(dtype) if t.is_floating_point() else t for t in make_int4(k, n)), k * n // 2)
        res[f"int4 op {dn}"] = bench(lambda: int4_groupwise_gemm(x, *w4(), None, None, 128))
        for fmt, block in (("nvfp4", 16), ("mxfp4", 32)):
            wf = rotating(lambda: make_fp4(fmt, k, n), k * n // 2)
            w = wf()
            ref = x.double() @ dequantize_weight(*w, block).double().t()
            res[f"{fmt} op {dn}"] = bench(lambda: fp4_gemm(x, *wf(), None, None, block))
            if COLUMN_ONLY:  # the product's GEMV (plugins/fp4_gemm/gemv.py: x's power of two per word column), on
                # row-GEMV-like tiles (W8A16's: 8 rows x 256 words); recorded before it moved there as the probe's
                # _fp4_gemv_col_kernel (commit 3de754d, benchmarks/fp4_gemv_probe_col.json), without its epilogue
                for bn, bkw, warps in [(4, 128, 4), (8, 256, 4), (4, 256, 4), (8, 128, 4), (16, 128, 4), (2, 256, 2),
                                       (8, 256, 8), (16, 256, 8), (8, 512, 8)]:
                    cfg = dict(GEMV, BLOCK_N=bn, BLOCK_KW=bkw, num_warps=warps)
                    name = f"{fmt} {dn} col {bn}x{bkw} w{warps}"
                    y = launch_gemv(x, *w, None, block, cfg)
                    res[name + " err"] = round(float((y.double() - ref).norm() / ref.norm()), 6)
                    res[name] = bench(lambda: launch_gemv(x, *wf(), None, block, cfg))
                continue
            for cfg in [(8, 64, 4, 0), (8, 64, 4, 4), (16, 32, 4, 4), (4, 128, 4, 4), (16, 64, 8, 2), (32, 16, 4, 4),
                        (8, 32, 2, 8), (4, 64, 2, 8)]:
                _time_gemv(res, f"{fmt} {dn} gemv", _fp4_gemv_kernel, lambda: (x, x.stride(0)), w, ref, wf, fmt, block,
                           n, k, *cfg)
            packed = fp4_x_pairs(x)
            for cfg in [(64, 8, 1, 4), (128, 8, 2, 4), (256, 8, 4, 4), (128, 8, 2, 16), (64, 16, 2, 4), (128, 16, 4, 4),
                        (256, 8, 4, 16), (32, 8, 1, 8)]:
                _time_gemv(res, f"{fmt} {dn} packed", _fp4_gemv_packed_kernel, lambda: packed, w, ref, wf, fmt, block,
                           n, k, *cfg, x_args_timed=lambda: fp4_x_pairs(x))
    line = " | ".join(f"{c}: {v:.1f}" if isinstance(v, float) and not c.endswith("err") else f"{c}: {v}"
                      for c, v in res.items())
    print(f"{k}x{n}: {line}", flush=True)
    return res


def main():
    MODE["graph"] = True
    results = {}
    for k, n in SHAPES:
        run_part(results, f"{k}x{n}", part, k, n)
        save(results, "fp4_gemv_probe_col.json" if COLUMN_ONLY else "fp4_gemv_probe.json")


if __name__ == "__main__":
    main()
