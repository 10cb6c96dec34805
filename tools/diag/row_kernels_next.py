"""Diagnostic prepared for the next H200 session: two row-layout prototypes that follow the W8A16 result
(benchmarks/row_gemv_probe.json: whole weight rows per program read at 3.5-4.1 TB/s), each checked against float64
and timed next to cuBLAS bf16 and the op it might replace (µs per call from CUDA-graph replay, rotating weights).

  F. FP8 block at M <= 16: `_fp8_row_dot_kernel`, the FP8 [N, K] weight's rows owned by BLOCK_N-row programs
     (swapped AB: W x^T on the FP8 tensor cores, per-128-K promotion with the block scales, bias and cast in the
     kernel). Today's Triton kernel runs 128-wide N tiles of 64 rows: N / 128 programs (16 for N = 2048), and the
     fp8_block engine on mlp-large is 0.49x fp16 at batch 1.
  G. INT4 g128 at M = 1: `_int4_chunk_gemv_kernel` on a pre-shuffled row layout: words [N, K/8] where, in each
     chunk of 1024 k (128 words), nibble i of word j holds k = 1024 c + 128 i + j. Each nibble position then
     reads a contiguous slice of x and belongs to one group of 128, so its scale is one value per row. (The
     row prototype in row_gemv_probe.py packed 8 consecutive k per word and reduced per group: slower.)

    LD_PRELOAD=... python3 tools/diag/row_kernels_next.py [FG]      # H200
    TRITON_INTERPRET=1 python3 tools/diag/row_kernels_next.py --check-cpu    # the prototypes' math on CPU
Not part of the product; not yet run on the GPU.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from qcompile.plugins.int4_gemm.kernel import _nibble_plus_136

CHUNK = 1024  # k per chunk of the pre-shuffled INT4 layout (8 nibbles x 128 words)
GROUP = 128


@triton.jit
def _fp8_row_dot_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, KB: tl.constexpr,
                        HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_M: tl.constexpr):
    """y[m, n] for BLOCK_N weight rows (inside one 128-row scale block) and up to BLOCK_M rows of x: per 128-K
    block, the FP8 dot W[n, k] xq[m, k] scaled by w_scale[n // 128, kb] * x_scale[m, kb], added in float32."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    row_block = (pid_n * BLOCK_N) // 128
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * 128 + tl.arange(0, 128)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + k[None, :], mask=mask_n[:, None],
                    eviction_policy="evict_first")
        xt = tl.load(xq_ptr + offs_m[None, :] * K + k[:, None], mask=mask_m[None, :])
        if FP32_DOT:
            part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(w, xt)
        sx = tl.load(xs_ptr + offs_m * KB + kb, mask=mask_m, other=0.0)
        sw = tl.load(ws_ptr + row_block * KB + kb)
        acc += part * (sw * sx)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _int4_chunk_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, KW: tl.constexpr, G: tl.constexpr,
                            CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr):
    """M = 1. Per chunk: nibble i as 136 + q (the INT4 plugin's `_nibble_plus_136`); x's slice for nibble i is
    multiplied by the row's scale of group 8c + i, so one FMA per weight accumulates sum x s (136 + q); the 136
    comes off at the end through sum_g s[n, g] * sum(x in g)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_j = tl.arange(0, 128)
    acc = tl.zeros((BLOCK_N, 128), dtype=tl.float32)
    corr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(0, CHUNKS):
        words = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * KW + (c * 128 + offs_j)[None, :],
                        mask=mask_n[:, None], other=0, eviction_policy="evict_first")
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + c * 1024 + i * 128 + offs_j).to(tl.float32)
            si = tl.load(s_ptr + offs_n * G + (c * 8 + i), mask=mask_n, other=0.0).to(tl.float32)
            acc += (xi[None, :] * si[:, None]) * _nibble_plus_136(words, i)
            corr += si * tl.sum(xi, axis=0)
    y = tl.sum(acc, axis=1) - 136.0 * corr
    y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def pack_int4_chunks(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values q [N, K] (K a multiple of 1024) -> words int32 [N, K/8] of the chunk layout above."""
    n, k = q.shape
    nib = (q.to(torch.int64) & 0xF).reshape(n, k // CHUNK, 8, 128)
    shifts = (4 * torch.arange(8, device=q.device, dtype=torch.int64)).reshape(1, 1, 8, 1)
    words = (nib << shifts).sum(dim=2).reshape(n, k // 8)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def fp8_row_dot(xq, sx, w_q, w_scale, bias, out_dtype, block_n=32, num_warps=4, num_stages=3, fp32_dot=False):
    m, k = xq.shape
    n = w_q.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    _fp8_row_dot_kernel[(triton.cdiv(n, block_n),)](
        xq, sx, w_q, w_scale, w_scale if bias is None else bias, y, m, n, k, KB=k // 128, HAS_BIAS=bias is not None,
        FP32_DOT=fp32_dot, BLOCK_N=block_n, BLOCK_M=16, num_warps=num_warps, num_stages=num_stages)
    return y


def int4_chunk_gemv(x, words, scale_ng, bias, block_n=8, num_warps=4, num_stages=1):
    n, kw = words.shape
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _int4_chunk_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, words, scale_ng, bias, y, n, KW=kw, G=kw * 8 // GROUP, CHUNKS=kw * 8 // CHUNK, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages)
    return y


def rel_err(y, ref) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


def fp8_case(m, k, n, device, dtype):
    from qcompile.plugins.fp8_block_gemm.format import dequantize_blocks, quantize_activation_blocks, \
        quantize_weight_blocks
    w_q, w_scale = quantize_weight_blocks(torch.randn(n, k, device=device) * 0.05)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    xq, sx = quantize_activation_blocks(x)
    ref = (dequantize_blocks(xq, sx, 1).double() @ dequantize_blocks(w_q, w_scale, 128).double().t()
           + bias.double()).cpu()
    return x, xq, sx, w_q, w_scale, bias, ref


def int4_case(k, n, device, dtype):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int32, device=device)
    scale_ng = (torch.rand(n, k // GROUP, device=device) * 0.01 + 1e-3).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    w = q.double() * scale_ng.double().repeat_interleave(GROUP, dim=1)
    return q, scale_ng, x, bias, (x.double() @ w.t() + bias.double()).cpu()


def check_cpu() -> None:
    """The prototypes' math under the Triton interpreter (float32 dots; no FP8 dot on CPU)."""
    x, xq, sx, w_q, w_scale, bias, ref = fp8_case(5, 512, 256, "cpu", torch.float32)
    err = rel_err(fp8_row_dot(xq, sx, w_q, w_scale, bias, torch.float32, fp32_dot=True), ref)
    print(f"F fp8 row dot (interpreter, fp32 dot): rel err {err:.2e}")
    assert err < 1e-6
    q, scale_ng, x, bias, ref = int4_case(2048, 24, "cpu", torch.float32)
    err = rel_err(int4_chunk_gemv(x, pack_int4_chunks(q), scale_ng, bias), ref)
    print(f"G int4 chunk GEMV (interpreter): rel err {err:.2e}")
    assert err < 1e-5


def part_f(k, n, results):
    from gpu_timing import bench, rotating
    from qcompile.plugins.fp8_block_gemm.kernel import fp8_block_gemm_triton

    for m in (1, 16):
        x, xq, sx, w_q, w_scale, bias, ref = fp8_case(m, k, n, "cuda", torch.bfloat16)
        nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        nwq = rotating(lambda: w_q.clone(), n * k)
        res = {"bf16": bench(lambda: torch.nn.functional.linear(x, nbf(), bias)),
               "triton_now": bench(lambda: fp8_block_gemm_triton(xq, sx, nwq(), w_scale, bias,
                                                                 out_dtype=torch.bfloat16))}
        for bn, warps, stages in ((16, 4, 3), (32, 4, 3), (32, 4, 4), (64, 4, 3), (64, 8, 3), (128, 8, 3)):
            run = lambda w, bn=bn, warps=warps, stages=stages: fp8_row_dot(xq, sx, w, w_scale, bias, torch.bfloat16,
                                                                          bn, warps, stages)
            err = rel_err(run(w_q), ref)
            res[f"row{bn}w{warps}p{stages}"] = bench(lambda: run(nwq())) if err < 1e-2 else f"wrong {err:.3g}"
        results[f"F {k}x{n} M={m}"] = res
        print(f"F {k}x{n} M={m}: " + " ".join(f"{c}:{v:.1f}" if isinstance(v, float) else f"{c}:{v}"
                                              for c, v in res.items()), flush=True)


def part_g(k, n, results):
    from gpu_timing import bench, rotating
    from qcompile.plugins.int4_gemm.format import to_engine
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm  # noqa: F401  (registers the op)

    q, scale_ng, x, bias, ref = int4_case(k, n, "cuda", torch.bfloat16)
    words_kn, scale_kn, words = to_engine(q.t()), scale_ng.t().contiguous(), pack_int4_chunks(q)
    nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
    nkn = rotating(lambda: words_kn.clone(), n * k // 2)
    nw = rotating(lambda: words.clone(), n * k // 2)
    res = {"bf16": bench(lambda: torch.nn.functional.linear(x, nbf(), bias)),
           "op": bench(lambda: torch.ops.qcompile.int4_groupwise_gemm(x, nkn(), scale_kn, None, bias, GROUP))}
    for bn, warps, stages in ((4, 4, 1), (8, 4, 1), (8, 4, 2), (16, 4, 1), (16, 8, 1), (8, 8, 2), (32, 8, 1)):
        run = lambda w, bn=bn, warps=warps, stages=stages: int4_chunk_gemv(x, w, scale_ng, bias, bn, warps, stages)
        err = rel_err(run(words), ref)
        res[f"chunk{bn}w{warps}p{stages}"] = bench(lambda: run(nw())) if err < 1e-2 else f"wrong {err:.3g}"
    results[f"G {k}x{n}"] = res
    print(f"G {k}x{n} M=1: " + " ".join(f"{c}:{v:.1f}" if isinstance(v, float) else f"{c}:{v}"
                                        for c, v in res.items()), flush=True)


def main() -> None:
    if "--check-cpu" in sys.argv:
        check_cpu()
        return
    sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/, for gpu_timing
    from gpu_timing import MODE
    from probe_util import run_part, save
    MODE["graph"] = True
    parts = sys.argv[1] if len(sys.argv) > 1 else "FG"
    results = {}
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (2048, 5632), (5632, 2048)):
        for p, fn in (("F", part_f), ("G", part_g)):
            if p in parts and not (p == "G" and k % CHUNK):
                run_part(results, f"{p} {k}x{n}", fn, k, n, results)
    save(results, "row_kernels_next.json")

if __name__ == "__main__":
    main()
