"""Diagnostic (H200): does a row-major weight layout ([N, K], K contiguous) let a Triton GEMV stream weights faster
than our [K, N] split-K GEMVs, and does `torch._scaled_mm` take a bias with block-wise FP8 scaling?

Prints one table per part (µs per call from CUDA-graph replay, rotating weights so they come from HBM):
  A. raw read bandwidth of the row layout (a kernel that only sums the weight words);
  B. W8A16 at M = 1: cuBLAS bf16, our op, and a row GEMV prototype with the scale and bias fused (one kernel);
  C. INT4 g128 at M = 1: cuBLAS bf16, our op, and a row GEMV prototype (scales [N, K/128]);
  D. W8A16 at M = 16: a swap-AB tensor-core prototype on the row layout (y^T = W x^T);
  E. FP8 block: our quantization kernel alone per row block, `_scaled_mm` with and without `bias=`, the op with
     and without a bias.
Prototypes are checked against float64 before they are timed. Not part of the product. The run recorded in
benchmarks/row_gemv_probe.json timed W8A16 prototypes that then became `plugins/int8_wo_gemm`'s
`gemv._row_gemv_kernel` and `kernel._row_dot_kernel` (parts B and D now time those, through `launch_gemv` /
`launch_dot`; this form of the probe has not run on the GPU). Part C's prototype decodes nibbles with the INT4 plugin's
`nibble_plus_136` since that run (the recorded one XOR-ed 0x88888888 into each word, then OR-ed 128.0's bits
in: the same values).
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/
from gpu_timing import MODE, SHAPES, bench, rotating  # noqa: E402
from probe_util import run_part, save  # noqa: E402

from qcompile.plugins.int4_gemm.gemv import nibble_plus_136  # noqa: E402


@triton.jit
def _stream_rows_kernel(w_ptr, out_ptr, N, KW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32)
    for kw in range(0, KW, BLOCK_KW):
        offs = kw + tl.arange(0, BLOCK_KW)
        acc += tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * KW + offs[None, :],
                       mask=(offs_n < N)[:, None] & (offs < KW)[None, :], other=0, eviction_policy="evict_first")
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1), mask=offs_n < N)


@triton.jit
def _w4_row_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, KW: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """INT4 g128 (16 words of 8 nibbles per group, nibble i of a word = k 8w+i, two's complement):
    nibble ^ 8 placed in bits 16..19 of 128.0 -> 136 + q; 136 * (group sum of x) comes off per group, then the
    group scale [N, K/128] multiplies. Fused bias and cast."""
    BLOCK_KW: tl.constexpr = GROUPS * 16
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g0 in range(0, G, GROUPS):
        offs = g0 * 16 + tl.arange(0, BLOCK_KW)
        ok = offs < KW
        words = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * KW + offs[None, :], mask=mask_n[:, None] & ok[None, :],
                        other=0, eviction_policy="evict_first")
        acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_KW,), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + 8 * offs + i, mask=ok, other=0.0).to(tl.float32)
            xsum += xi
            acc += xi[None, :] * nibble_plus_136(words, i)
        gsum = tl.sum(tl.reshape(acc, (BLOCK_N, GROUPS, 16)), axis=2)
        gx = tl.sum(tl.reshape(xsum, (GROUPS, 16)), axis=1)
        offs_g = g0 + tl.arange(0, GROUPS)
        sc = tl.load(s_ptr + offs_n[:, None] * G + offs_g[None, :], mask=mask_n[:, None] & (offs_g < G)[None, :],
                     other=0.0).to(tl.float32)
        out += tl.sum((gsum - 136.0 * gx[None, :]) * sc, axis=1)
    out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def checked_time(run, weight, ref, next_weight, label) -> float:
    """µs of `run(next_weight())` if `run(weight)` is within 1% of `ref` (float64), else NaN (and says so)."""
    err = rel_err(run(weight), ref)
    if err >= 1e-2:
        print(f"{label}: WRONG rel err {err:.3g}")
        return float("nan")
    return bench(lambda: run(next_weight()))


def part_a(k, n):
    kw = k // 4
    nxt = rotating(lambda: torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device="cuda"), n * k)
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    res = {}
    for bn, bkw, warps in [(1, 1024, 4), (2, 512, 4), (4, 256, 4), (4, 512, 4), (8, 256, 4), (8, 256, 8),
                           (16, 128, 4), (16, 256, 8)]:
        t = bench(lambda: _stream_rows_kernel[(triton.cdiv(n, bn),)](nxt(), out, n, kw, BLOCK_N=bn, BLOCK_KW=bkw,
                                                                    num_warps=warps))
        res[f"{bn}x{bkw}w{warps}"] = t
    best = min(res, key=res.get)
    print(f"A {k}x{n}: read best {best} {res[best]:.1f} us = {n * k / res[best] / 1e6:.2f} TB/s | "
          + " ".join(f"{c}:{t:.1f}" for c, t in res.items()), flush=True)
    return res


def w8_case(k, n, m, dtype):
    """x [m, k], bias, scale, the [N, K] weight, float64 reference, rotating weight copies, and the first results:
    cuBLAS bf16 and our W8A16 op, µs."""
    from qcompile.plugins.int8_wo_gemm.op import int8_weight_only_gemm

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    scale = (torch.rand(n, device="cuda") * 0.01 + 0.001).to(dtype)
    w_kn = torch.randint(-127, 128, (k, n), dtype=torch.int8, device="cuda")
    ref = (x.double() @ (w_kn.double() * scale.double())) + bias.double()
    w_nk = w_kn.t().contiguous()
    res = {}
    nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["bf16"] = bench(lambda: torch.nn.functional.linear(x, nbf(), bias))
    nw = rotating(lambda: w_nk.clone(), n * k)
    res["op"] = bench(lambda: int8_weight_only_gemm(x, nw(), scale, bias))
    return x, bias, scale, w_nk, ref, nw, res


def part_b(k, n, dtype=torch.bfloat16):
    from qcompile.plugins.int8_wo_gemm import gemv

    x, bias, scale, w_nk, ref, nw, res = w8_case(k, n, 1, dtype)
    for bn, bkw, warps in [(2, 256, 4), (4, 128, 4), (4, 256, 4), (8, 128, 4), (8, 256, 8), (16, 64, 4),
                           (4, 512, 8), (2, 512, 4)]:
        cfg = dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=warps)
        res[f"row{bn}x{bkw}w{warps}"] = checked_time(
            lambda w: gemv.launch_gemv(x, w, scale, bias, cfg), w_nk, ref, nw, f"B {k}x{n} row{bn}x{bkw}")
    best = min((c for c in res if c.startswith("row")), key=lambda c: res[c])
    print(f"B {k}x{n} M=1: bf16 {res['bf16']:.1f} op {res['op']:.1f} ({res['bf16'] / res['op']:.2f}x) "
          f"row best {best} {res[best]:.1f} ({res['bf16'] / res[best]:.2f}x, {n * k / res[best] / 1e6:.2f} TB/s) | "
          + " ".join(f"{c}:{t:.1f}" for c, t in res.items() if c.startswith("row")), flush=True)
    return res


def part_c(k, n, dtype=torch.bfloat16):
    from qcompile.plugins.int4_gemm.format import pack_sequential, to_engine
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm  # noqa: F401  (registers the op)

    g = 128
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int32, device="cuda")
    scale_ng = (torch.rand(n, k // g, device="cuda") * 0.01 + 0.001).to(dtype)
    w = q.double() * scale_ng.double().repeat_interleave(g, dim=1)
    ref = x.double() @ w.t() + bias.double()
    words = pack_sequential(q.t()).t().contiguous()  # the row layout: sequential words, [N, K/8]
    words_kn = to_engine(q.t(), g)  # the op's engine words
    res = {}
    nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["bf16"] = bench(lambda: torch.nn.functional.linear(x, nbf(), bias))
    scale_kn = scale_ng.t().contiguous()
    nkn = rotating(lambda: words_kn.clone(), n * k // 2)
    res["op"] = bench(lambda: torch.ops.qcompile.int4_groupwise_gemm(x, nkn(), scale_kn, None, bias, g))
    nw = rotating(lambda: words.clone(), n * k // 2)
    for bn, groups, warps in [(2, 8, 4), (4, 4, 4), (4, 8, 4), (8, 2, 4), (8, 4, 8), (16, 2, 8), (2, 16, 4),
                              (4, 2, 2)]:
        if (k // g) % groups:
            continue

        def run(w, bn=bn, groups=groups, warps=warps):
            y = torch.empty(1, n, device="cuda", dtype=dtype)
            _w4_row_gemv_kernel[(triton.cdiv(n, bn),)](x, w, scale_ng, bias, y, n, k // 8, k // g, BLOCK_N=bn,
                                                       GROUPS=groups, num_warps=warps)
            return y
        res[f"row{bn}x{groups}g w{warps}"] = checked_time(run, words, ref, nw, f"C {k}x{n} row{bn}x{groups}g")
    best = min((c for c in res if c.startswith("row")), key=lambda c: res[c])
    print(f"C {k}x{n} M=1: bf16 {res['bf16']:.1f} op {res['op']:.1f} ({res['bf16'] / res['op']:.2f}x) row best {best} "
          f"{res[best]:.1f} ({res['bf16'] / res[best]:.2f}x, {n * k / 2 / res[best] / 1e6:.2f} TB/s) | "
          + " ".join(f"{c}:{t:.1f}" for c, t in res.items() if c.startswith("row")), flush=True)
    return res


def part_d(k, n, m=16, dtype=torch.bfloat16):
    from qcompile.plugins.int8_wo_gemm import kernel as w8

    x, bias, scale, w_nk, ref, nw, res = w8_case(k, n, m, dtype)
    for bn, bk, waves, warps, stages in [(16, 256, 0, 4, 4), (32, 128, 0, 4, 4), (32, 256, 0, 4, 3),
                                         (64, 128, 0, 4, 4), (32, 256, 2, 4, 3), (32, 256, 0, 4, 5)]:
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, waves=waves)
        c = f"dot{bn}x{bk}v{waves}w{warps}p{stages}"
        res[c] = checked_time(lambda w: w8.launch_dot(x, w, scale, bias, cfg), w_nk, ref, nw, f"D {k}x{n} {c}")
    best = min((c for c in res if c.startswith("dot")), key=lambda c: res[c])
    print(f"D {k}x{n} M={m}: bf16 {res['bf16']:.1f} op {res['op']:.1f} ({res['bf16'] / res['op']:.2f}x) "
          f"dot best {best} {res[best]:.1f} ({res['bf16'] / res[best]:.2f}x) | "
          + " ".join(f"{c}:{t:.1f}" for c, t in res.items() if c.startswith("dot")), flush=True)
    return res


def part_e(k, n, m, dtype=torch.bfloat16):
    from qcompile.plugins.fp8_block_gemm.format import quantize_weight_blocks
    from qcompile.plugins.fp8_block_gemm.kernel import quantize_blocks_triton
    from qcompile.plugins.fp8_block_gemm.op import fp8_block_gemm

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda") * 0.05
    w_q, w_scale = quantize_weight_blocks(w)
    res = {}
    nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["bf16"] = bench(lambda: torch.nn.functional.linear(x, nbf(), bias))
    for bm in (16, 32, 64):
        res[f"quant{bm}"] = bench(lambda bm=bm: quantize_blocks_triton(x, 4, block_m=bm))
    xq, sx = quantize_blocks_triton(x, 4)
    nwq = rotating(lambda: w_q.clone(), n * k)
    res["mm"] = bench(lambda: torch._scaled_mm(xq, nwq().t(), sx, w_scale.t(), out_dtype=torch.bfloat16))
    y0 = torch._scaled_mm(xq, w_q.t(), sx, w_scale.t(), out_dtype=torch.bfloat16)
    try:
        yb = torch._scaled_mm(xq, w_q.t(), sx, w_scale.t(), bias=bias, out_dtype=torch.bfloat16)
        diff = float(((yb.float() - (y0.float() + bias.float())).abs().max()))
        res["mm_bias"] = bench(lambda: torch._scaled_mm(xq, nwq().t(), sx, w_scale.t(), bias=bias,
                                                        out_dtype=torch.bfloat16))
        res["bias_maxdiff"] = diff
    except Exception as e:  # noqa: BLE001
        res["mm_bias"] = float("nan")
        res["bias_error"] = str(e).splitlines()[0][:200]
    res["mm_add"] = bench(lambda: torch._scaled_mm(xq, nwq().t(), sx, w_scale.t(), out_dtype=torch.bfloat16) + bias)
    res["op"] = bench(lambda: fp8_block_gemm(x, nwq(), w_scale, bias))
    res["op_nobias"] = bench(lambda: fp8_block_gemm(x, nwq(), w_scale, None))
    print(f"E {k}x{n} M={m}: " + " ".join(f"{c}:{v:.1f}" if isinstance(v, float) else f"{c}:{v}"
                                          for c, v in res.items())
          + f" | bf16/op {res['bf16'] / res['op']:.2f}x bf16/(quant+mm_bias) "
            f"{res['bf16'] / (min(res['quant16'], res['quant32'], res['quant64']) + res['mm_bias']):.2f}x", flush=True)
    return res


def main():
    MODE["graph"] = True
    parts = sys.argv[1] if len(sys.argv) > 1 else "ABCDE"
    results = {}
    for k, n in SHAPES:
        for p, fn in (("A", part_a), ("B", part_b), ("C", part_c), ("D", part_d)):
            if p in parts:
                run_part(results, f"{p} {k}x{n}", fn, k, n)
    if "E" in parts:
        for k, n in SHAPES:
            for m in (256, 1024, 4096):
                run_part(results, f"E {k}x{n} M={m}", part_e, k, n, m)
    save(results, "row_gemv_probe.json")


if __name__ == "__main__":
    main()
