"""Diagnostic (H200): why do the INT4 M = 1 kernels stream weights at about 2 TB/s when W8A16's reach 3.5-4.1?

For each decode shape (K x N) at M = 1, µs per call from CUDA-graph replay with rotating weights:
  S. pure reads of the INT4 weight [K/8, N] int32: a flat stream, and the GEMV's own tile/split/atomic pattern
     with the math taken out (an integer add per word);
  G. the GEMV kernel as shipped before this probe (`_int4_gemv_kernel`, now its HALF2=False fp32 path) over
     tiles, warps and split-K waves, with its registers;
  H. a GEMV that decodes and multiplies on packed half2: per int32 word one shift, four LOP3 (two fp16
     `1024 + u` / `1024 + 16 u` per LOP3), four HSUB2 and four HFMA2 against fp16 x pairs (x / 16 for the
     high nibbles), then fp32 (about 2 instructions per weight against the shipped 5.3). fp16 x, and bf16 x
     converted to fp16 in the kernel. Its one-word dot is now the product's `half2.dot8` (the same PTX the
     recorded runs used), and the x pairs are packed by `half2.x_pair`;
  W. the W8A16 op on an int8 weight of the same bytes (K/2 x N), cuBLAS bf16 / fp16, the shipped INT4 op.
Every GEMV variant is checked against float64 before it is timed. Not part of the product.

    OUT=... python3 tools/diag/int4_stream_probe.py
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/
from gpu_timing import MODE, bench, rotating  # noqa: E402
from probe_util import run_part, save  # noqa: E402

from qcompile.plugins.gemm_dispatch import split_for_waves  # noqa: E402
from qcompile.plugins.int4_gemm import gemv as g4  # noqa: E402
from qcompile.plugins.int4_gemm.half2 import dot8, x_pair  # noqa: E402
from qcompile.plugins.triton_tiles import store_tile  # noqa: E402

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 28672), (4096, 14336)]
PARTS = (os.environ.get("PROBE_PARTS") or "SGHW").upper()
GROUP = 128


@triton.jit
def _stream_flat_kernel(w_ptr, y_ptr, n_words, per_prog, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * per_prog
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, per_prog, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_first")
    tl.store(y_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _stream_kn_kernel(w_ptr, y_ptr, N, KW, kw_per_split, steps, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_KW: tl.constexpr):
    """The GEMV's loads (tiles [BLOCK_KW, BLOCK_N] of [K/8, N], split K, atomics) with an add per word."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.int32)
    for step in range(0, steps):
        kw = tl.program_id(1) * kw_per_split + step * BLOCK_KW + tl.arange(0, BLOCK_KW)
        acc += tl.load(w_ptr + kw.to(tl.int64)[:, None] * N + offs_n[None, :],
                       mask=(kw < KW)[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
    out = tl.sum(acc, axis=0)
    store_tile(y_ptr + offs_n, out, mask_n, ATOMIC)


@triton.jit
def _pair(x_row, kw, j: tl.constexpr, ok, DIV16: tl.constexpr):
    """int32 of the fp16 pair (x[8 kw + j], x[8 kw + j + 4]) (each / 16 when DIV16; no range scaling)."""
    a = tl.load(x_row + kw * 8 + j, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(x_row + kw * 8 + j + 4, mask=ok, other=0.0).to(tl.float32)
    return x_pair(a, b, 0.0625 if DIV16 else 1.0)


@triton.jit
def _int4_gemv_h2_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, group_size, kw_per_split, steps,
                         ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for step in range(0, steps):
        kw = tl.program_id(1) * kw_per_split + step * BLOCK_KW + tl.arange(0, BLOCK_KW)
        ok = kw < K // 8
        words = tl.load(w_ptr + kw.to(tl.int64)[:, None] * N + offs_n[None, :], mask=ok[:, None] & mask_n[None, :],
                        other=0, eviction_policy="evict_first")
        k0 = (tl.program_id(1) * kw_per_split + step * BLOCK_KW) * 8
        s = tl.load(s_ptr + (k0 // group_size) * N + offs_n, mask=mask_n & (k0 < K), other=0.0).to(tl.float32)
        shape: tl.constexpr = (BLOCK_KW, BLOCK_N)
        part = dot8(words, tl.broadcast_to(_pair(x_row, kw, 0, ok, False)[:, None], shape),
                        tl.broadcast_to(_pair(x_row, kw, 1, ok, True)[:, None], shape),
                        tl.broadcast_to(_pair(x_row, kw, 2, ok, False)[:, None], shape),
                        tl.broadcast_to(_pair(x_row, kw, 3, ok, True)[:, None], shape))
        acc += part * s[None, :]
    out = tl.sum(acc, axis=0)
    store_tile(y_ptr + row * N + offs_n, out, mask_n, ATOMIC)


_H2_DECODE = """
        shr.u32 w2, {w}, 8;
        lop3.b32 a0, {w}, 0x000F000F, c0, 0x6a;
        lop3.b32 a1, {w}, 0x00F000F0, c1, 0x6a;
        lop3.b32 a2, w2, 0x000F000F, c0, 0x6a;
        lop3.b32 a3, w2, 0x00F000F0, c1, 0x6a;
        sub.f16x2 a0, a0, c0;
        sub.f16x2 a1, a1, c1;
        sub.f16x2 a2, a2, c0;
        sub.f16x2 a3, a3, c1;
        fma.rn.f16x2 t, a0, {x0}, t;
        fma.rn.f16x2 t, a1, {x1}, t;
        fma.rn.f16x2 t, a2, {x2}, t;
        fma.rn.f16x2 t, a3, {x3}, t;"""

_DOT16_ASM = tl.constexpr(
    "{ .reg .b32 w2, a0, a1, a2, a3, c0, c1, t; .reg .b16 lo, hi; .reg .f32 flo, fhi, s;"
    "mov.b32 c0, 0x64086408; mov.b32 c1, 0x64806480; mov.b32 t, 0;"
    + _H2_DECODE.format(w="$1", x0="$3", x1="$4", x2="$5", x3="$6")
    + _H2_DECODE.format(w="$2", x0="$7", x1="$8", x2="$9", x3="$10")
    + "mov.b32 {lo, hi}, t; cvt.f32.f16 flo, lo; cvt.f32.f16 fhi, hi; add.f32 s, flo, fhi; mov.b32 $0, s; }")


@triton.jit
def _dot16_h2(wa, wb, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3):
    """`half2.dot8` over two words (16 products per fp32 result, 8 per fp16 half accumulated in the chain)."""
    out = tl.inline_asm_elementwise(
        asm=_DOT16_ASM,
        constraints="=r,r,r,r,r,r,r,r,r,r,r", args=[wa, wb, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3], dtype=tl.int32,
        is_pure=True, pack=1)
    return out.to(tl.float32, bitcast=True)


def x_pairs(x2d):
    """int32 [M, K/8, 4]: fp16 pairs (x[8w + j], x[8w + j + 4]), j = 0..3, odd j divided by 16 (torch ops: an
    engine's Inductor fuses them into the kernel that produces x)."""
    m, k = x2d.shape
    v = x2d.float().view(m, k // 8, 2, 4).transpose(2, 3)
    odd = (torch.arange(4, device=x2d.device) % 2).view(1, 1, 4, 1)
    v = torch.where(odd == 1, v * 0.0625, v)
    return v.to(torch.float16).contiguous().view(torch.int32).view(m, k // 8, 4)


@triton.jit
def _xp(xp_row, kw, j: tl.constexpr, ok, shape: tl.constexpr):
    return tl.broadcast_to(tl.load(xp_row + kw * 4 + j, mask=ok, other=0)[:, None], shape)


@triton.jit
def _int4_gemv_h2b_kernel(xp_ptr, w_ptr, s_ptr, y_ptr, N, K, group_size, kw_per_split, steps,
                          ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """As `_int4_gemv_h2_kernel` with x pre-packed (`x_pairs`) and two words per fp32 conversion (the step's
    first and second halves of word rows)."""
    H: tl.constexpr = BLOCK_KW // 2
    shape: tl.constexpr = (H, BLOCK_N)
    row = tl.program_id(2)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    xp_row = xp_ptr + row * (K // 2)
    acc = tl.zeros(shape, dtype=tl.float32)
    for step in range(0, steps):
        kw0 = tl.program_id(1) * kw_per_split + step * BLOCK_KW
        kwa = kw0 + tl.arange(0, H)
        kwb = kwa + H
        oka = kwa < K // 8
        okb = kwb < K // 8
        wa = tl.load(w_ptr + kwa.to(tl.int64)[:, None] * N + offs_n[None, :], mask=oka[:, None] & mask_n[None, :],
                     other=0, eviction_policy="evict_first")
        wb = tl.load(w_ptr + kwb.to(tl.int64)[:, None] * N + offs_n[None, :], mask=okb[:, None] & mask_n[None, :],
                     other=0, eviction_policy="evict_first")
        s = tl.load(s_ptr + (kw0 * 8 // group_size) * N + offs_n, mask=mask_n & (kw0 * 8 < K), other=0.0)
        part = _dot16_h2(wa, wb, _xp(xp_row, kwa, 0, oka, shape), _xp(xp_row, kwa, 1, oka, shape),
                         _xp(xp_row, kwa, 2, oka, shape), _xp(xp_row, kwa, 3, oka, shape),
                         _xp(xp_row, kwb, 0, okb, shape), _xp(xp_row, kwb, 1, okb, shape),
                         _xp(xp_row, kwb, 2, okb, shape), _xp(xp_row, kwb, 3, okb, shape))
        acc += part * s.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=0)
    store_tile(y_ptr + row * N + offs_n, out, mask_n, ATOMIC)


def _weights(k, n):
    q = torch.randint(-8, 8, (k, n), dtype=torch.int32, device="cuda")
    packed = torch.zeros(k // 8, n, dtype=torch.int32, device="cuda")
    for j in range(8):
        packed |= (q[j::8] & 0xF) << (4 * j)
    scale = (torch.rand(k // GROUP, n, device="cuda") * 0.02 + 0.01).to(torch.float16)
    return q, packed, scale


def _reference(x, q, scale):
    w = q.double() * scale.double().repeat_interleave(GROUP, 0)
    return x.double() @ w


def _rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def part_s(k, n):
    kw = k // 8
    nxt = rotating(lambda: torch.randint(-2**31, 2**31 - 1, (kw, n), dtype=torch.int32, device="cuda"), kw * n * 4)
    res = {}
    y = torch.zeros(n, dtype=torch.int32, device="cuda")
    words = kw * n
    for progs, block, warps in [(528, 2048, 4), (1056, 2048, 8), (2112, 1024, 4), (4224, 1024, 4)]:
        per = triton.cdiv(triton.cdiv(words, progs), block) * block
        res[f"flat p{progs} b{block} w{warps}"] = bench(lambda: _stream_flat_kernel[(triton.cdiv(words, per),)](
            nxt(), y, words, per, BLOCK=block, num_warps=warps))
    for bn, bkw, warps, waves in [(512, 4, 2, 32), (512, 4, 2, 4), (512, 4, 2, 0), (512, 8, 4, 8), (256, 8, 2, 8),
                                  (1024, 4, 4, 8), (512, 16, 4, 2), (128, 16, 2, 4)]:
        tiles = triton.cdiv(n, bn)
        splits, per = split_for_waves(k, tiles, bkw * 8, waves, 132)
        res[f"kn {bn}x{bkw} w{warps} waves{waves} splits{splits}"] = bench(
            lambda: _stream_kn_kernel[(tiles, splits)](nxt(), y, n, kw, per // 8, per // (bkw * 8),
                                                       ATOMIC=splits > 1, BLOCK_N=bn, BLOCK_KW=bkw, num_warps=warps))
    return _report("S", k, n, res, kw * n * 4)


def _report(tag, k, n, res, nbytes):
    best = min((v for v in res.values() if isinstance(v, float)), default=None)
    print(f"{tag} {k}x{n}: " + " | ".join(f"{c}: {v:.1f}" if isinstance(v, float) else f"{c}: {v}"
                                          for c, v in res.items()), flush=True)
    if best:
        print(f"{tag} {k}x{n}: best {best:.1f} us = {nbytes / best / 1e6:.2f} TB/s", flush=True)
    return res


def part_g(k, n):
    q, packed, scale = _weights(k, n)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = _reference(x, q, scale)
    nxt = rotating(lambda: packed.clone(), packed.numel() * 4)
    res = {}
    for bn, bk, warps, waves in [(512, 32, 2, 32), (512, 32, 2, 8), (512, 32, 2, 2), (512, 32, 2, 0),
                                 (512, 64, 4, 32), (256, 32, 2, 32), (1024, 32, 4, 32), (512, 32, 4, 32),
                                 (256, 64, 4, 8), (128, 128, 4, 4)]:
        tiles = triton.cdiv(n, bn)
        splits, per = split_for_waves(k, tiles, bk, waves, 132)

        def run(w):
            y = (torch.zeros if splits > 1 else torch.empty)((1, n), dtype=torch.float32, device="cuda")
            return g4._int4_gemv_kernel[(tiles, splits, 1)](
                x, w, scale, scale, y, n, k, x.stride(0), GROUP, per, K_STEPS=per // bk, HAS_ZERO=False,
                ATOMIC=splits > 1, HALF2=False, ASM=True, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3), y
        compiled, y = run(packed)
        label = f"{bn}x{bk} w{warps} waves{waves} splits{splits} regs{compiled.n_regs}"
        res[label] = bench(lambda: run(nxt()))
        res[label + " err"] = round(_rel(y, ref), 5)
    return _report("G", k, n, res, packed.numel() * 4 + scale.numel() * 2)


def part_h(k, n):
    q, packed, scale = _weights(k, n)
    nxt = rotating(lambda: packed.clone(), packed.numel() * 4)
    res = {}
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        ref = _reference(x, q, scale)
        for bn, bkw, warps, waves in [(512, 4, 2, 32), (512, 4, 2, 8), (512, 4, 2, 2), (512, 8, 4, 8),
                                      (512, 8, 2, 8), (256, 8, 2, 8), (256, 16, 4, 4), (1024, 4, 4, 8),
                                      (1024, 8, 8, 4), (512, 16, 4, 2), (128, 16, 2, 4), (256, 4, 1, 16)]:
            if dtype == torch.bfloat16 and (bn, bkw, warps) not in [(512, 4, 2), (512, 8, 4), (256, 8, 2)]:
                continue
            tiles = triton.cdiv(n, bn)
            splits, per = split_for_waves(k, tiles, bkw * 8, waves, 132)

            def run(w):
                y = (torch.zeros if splits > 1 else torch.empty)((1, n), dtype=torch.float32, device="cuda")
                return _int4_gemv_h2_kernel[(tiles, splits, 1)](
                    x, w, scale, y, n, k, x.stride(0), GROUP, per // 8, per // (bkw * 8), ATOMIC=splits > 1,
                    BLOCK_N=bn, BLOCK_KW=bkw, num_warps=warps), y
            compiled, y = run(packed)
            label = f"{str(dtype)[6:]} {bn}x{bkw} w{warps} waves{waves} splits{splits} regs{compiled.n_regs}"
            res[label + " err"] = round(_rel(y, ref), 5)
            res[label] = bench(lambda: run(nxt()))
        xp_in = x_pairs(x)
        for bn, bkw, warps, waves in [(512, 4, 2, 32), (512, 8, 2, 8), (512, 8, 4, 8), (1024, 8, 4, 8),
                                      (256, 8, 2, 8), (512, 16, 4, 4), (1024, 16, 8, 2), (256, 4, 1, 16),
                                      (512, 16, 4, 2), (512, 32, 8, 2), (256, 16, 2, 4), (512, 16, 8, 4)]:
            if dtype == torch.bfloat16 and (bn, bkw, warps) not in [(512, 8, 2), (512, 8, 4)]:
                continue
            tiles = triton.cdiv(n, bn)
            splits, per = split_for_waves(k, tiles, bkw * 8, waves, 132)

            def run_b(w, xp):
                y = (torch.zeros if splits > 1 else torch.empty)((1, n), dtype=torch.float32, device="cuda")
                return _int4_gemv_h2b_kernel[(tiles, splits, 1)](
                    xp, w, scale, y, n, k, GROUP, per // 8, per // (bkw * 8), ATOMIC=splits > 1,
                    BLOCK_N=bn, BLOCK_KW=bkw, num_warps=warps), y
            compiled, y = run_b(packed, xp_in)
            label = f"{str(dtype)[6:]} b{bn}x{bkw} w{warps} waves{waves} splits{splits} regs{compiled.n_regs}"
            res[label + " err"] = round(_rel(y, ref), 5)
            res[label] = bench(lambda: run_b(nxt(), xp_in))
            res[label + " +pack"] = bench(lambda: run_b(nxt(), x_pairs(x)))
    return _report("H", k, n, res, packed.numel() * 4 + scale.numel() * 2)


def part_w(k, n):
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm
    from qcompile.plugins.int8_wo_gemm.op import int8_weight_only_gemm
    res = {}
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype)[6:]
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        wb = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
        res[f"cublas {name}"] = bench(lambda: torch.nn.functional.linear(x, wb()))
        q, packed, scale = _weights(k, n)
        nxt = rotating(lambda: packed.clone(), packed.numel() * 4)
        sc = scale.to(dtype)
        res[f"int4 op {name}"] = bench(lambda: int4_groupwise_gemm(x, nxt(), sc, None, None, GROUP))
        x2 = torch.randn(1, k // 2, device="cuda", dtype=dtype)
        w8 = rotating(lambda: torch.randint(-127, 128, (n, k // 2), dtype=torch.int8, device="cuda"), n * k // 2)
        s8 = torch.rand(n, device="cuda", dtype=dtype) * 0.01
        res[f"w8a16 op K/2 {name}"] = bench(lambda: int8_weight_only_gemm(x2, w8(), s8, None))
    return _report("W", k, n, res, k * n // 2)


def main():
    MODE["graph"] = True
    results = {}
    for k, n in SHAPES:
        for tag, fn in (("S", part_s), ("G", part_g), ("H", part_h), ("W", part_w)):
            if tag not in PARTS:
                continue
            run_part(results, f"{tag} {k}x{n}", fn, k, n)
        save(results, "int4_stream_probe.json")


if __name__ == "__main__":
    main()
