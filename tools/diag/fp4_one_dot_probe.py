"""Diagnostic (H200): NVFP4 / MXFP4 on the tensor cores with the INT4 one-dot design, next to the FP4 op, the
INT4 op and cuBLAS bf16 (CUDA-graph replay, rotating weights; every configuration checked against float64
first). Not part of the product.

Why: the FP4 tile kernel converts each decoded tile's layout through shared memory, as the INT4 tile kernel did
before `plugins/int4_gemm/one_dot.py` replaced it (1.14-1.37x at M = 16 on the H200). Since then the FP4 op has
fallen behind INT4 at 16-64 rows (0.60-0.85x of INT4's speed, benchmarks/fp4_int4_gemm_s16.json).

Layout: the E2M1 codes in INT4's planar order (`int4_gemm.format.to_engine` of the codes as signed nibbles):
in each 64 K, word c holds k = 16 j + 2 c + t in nibble j + 4 t, so nibbles j and j + 4 are a (k, k + 1) pair.
Scales as the engine stores them, [N, K/B]: a row's scales of one 128-K step are 8 (NVFP4) or 4 (MXFP4)
consecutive bytes, loaded at once and split into per-tile vectors in registers.

Decoding a pair without a table: code `s e1 e0 m` -> 16-bit float bits `(code & 7) << 9 | (code & 8) << 12`
(fp16) or `(code & 7) << 6 | (code & 8) << 12` (bf16) is the E2M1 value times 2^-14 (fp16) or 2^-126 (bf16),
the zero-exponent codes included (they become subnormals: +-0.5 is 2^-15 in fp16, 2^-127 in bf16). Each 16-K
tile is then multiplied by its block scale times a power of two that brings it back (one HMUL2 per pair):
NVFP4 `s * 2^6` (fp16) / `s * 2^118` (bf16), leaving 2^-8 for the fp32 epilogue with the global scale; MXFP4
`2^(e - 127 + 14)` / `2^(e - 127 + 126)`, exact (built as fp32 bits: scale codes up to 129 for bf16). bf16
depends on the tensor cores' HMUL2.BF16 keeping subnormal inputs: the float64 check before timing shows whether
it does.

    OUT=... python3 tools/diag/fp4_one_dot_probe.py [--shapes KxN ...] [--ms 1 16 64]

Written in the sixteenth session after its device time was spent: checked on the CPU only (the interpreter, fp16,
against float64, NVFP4 and MXFP4, split K or not); run on the H200 in the seventeenth (below). Its SASS for sm_90
(compiled on the CPU, bf16) is 7.6-8.5 instructions per weight at 16 rows (NVFP4) and 6.4-7.7 (MXFP4), against the
FP4 tile kernel's 7.2 and the INT4 one-dot kernel's 4.5. The block scales are most of the difference: without the
`* scale` the NVFP4 16 x 64 loop was 355 instructions per step instead of 558 (PRMT, F2FP, HADD2 and FMUL for
converting a scale per 16-K tile and bringing it into the weight tile's layout; the 32 HMUL2, one per pair,
are the floor). Loading a step's scales as one [BLOCK_N, 8] tile and splitting it in registers (this version)
saved 12 LDG but added LDS, 546 in all. So it may not win as it stands; the run will tell, and the scales' path
into the operand layout is the place to work next.

H200, seventeenth session (benchmarks/fp4_one_dot_probe_s17.json): every configuration matched float64 (bf16
keeps the subnormal intermediates), and the best one per cell ran 0.93-1.11x the FP4 op at M = 16 and 64 on the
four layers, while the INT4 op was 1.3-1.7x faster than both. Not adopted.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/

from qcompile.plugins.int4_gemm.one_dot import _cat_k  # noqa: E402
from qcompile.plugins.triton_tiles import store_tile  # noqa: E402

STEP = 128  # K per step


@triton.jit
def _fp4_tile16(words, j: tl.constexpr, scale, BLOCK_N: tl.constexpr, dt: tl.constexpr):
    """[BLOCK_N, 16] E2M1 values of k = 16 j .. 16 j + 15 of a 64-K block (words [BLOCK_N, 8]) times `scale`
    [BLOCK_N] (dt; it carries the decoding's power of two)."""
    t = words >> (4 * j)
    if dt == tl.float16:
        p = ((t & 0x00070007) << 9) | ((t & 0x00080008) << 12)
    else:
        p = ((t & 0x00070007) << 6) | ((t & 0x00080008) << 12)
    lo = p.to(tl.int16).to(dt, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(dt, bitcast=True)
    return tl.join(lo, hi).reshape(BLOCK_N, 16) * scale[:, None]


@triton.jit
def _step_scales(s_ptr, k0, offs_n, KB, MX: tl.constexpr, dt: tl.constexpr):
    """The 128-K step's scales for each row, [BLOCK_N, 8] (NVFP4: 8 blocks; MXFP4: 4 blocks, each twice), in dt
    times the decoding's power of two (see the module doc). Scales [N, K/B] as stored in the engine: a row's
    blocks of one step are 8 (4) consecutive bytes, one load."""
    if MX:
        raw = tl.load(s_ptr + offs_n.to(tl.int64)[:, None] * KB + (k0 // 32 + tl.arange(0, 8) // 2)[None, :])
        e = raw.to(tl.int32) + (14 if dt == tl.float16 else 126)  # 2^(e - 127 + 14) / 2^(e - 127 + 126)
        return (e << 23).to(tl.float32, bitcast=True).to(dt)
    raw = tl.load(s_ptr + offs_n.to(tl.int64)[:, None] * KB + (k0 // 16 + tl.arange(0, 8))[None, :])
    up: tl.constexpr = 64.0 if dt == tl.float16 else 3.3230699894622794e35  # 2^6, 2^118
    return (raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * up).to(dt)


@triton.jit
def _block64(w_ptr, kb, offs_n, N, s0, s1, s2, s3, BLOCK_N: tl.constexpr, dt: tl.constexpr):
    """[BLOCK_N, 64] weights of the 64-K block kb, 16-K tile j times s_j [BLOCK_N]."""
    words = tl.load(w_ptr + (kb * 8 + tl.arange(0, 8)).to(tl.int64)[None, :] * N + offs_n[:, None],
                    eviction_policy="evict_first")
    return _cat_k(_cat_k(_fp4_tile16(words, 0, s0, BLOCK_N, dt), _fp4_tile16(words, 1, s1, BLOCK_N, dt), BLOCK_N, 16),
                  _cat_k(_fp4_tile16(words, 2, s2, BLOCK_N, dt), _fp4_tile16(words, 3, s3, BLOCK_N, dt), BLOCK_N, 16),
                  BLOCK_N, 32)


@triton.jit
def _split8(sc, BLOCK_N: tl.constexpr):
    """The 8 columns of sc [BLOCK_N, 8] as [BLOCK_N] vectors (register splits, no shared memory)."""
    ev, od = tl.split(sc.reshape(BLOCK_N, 4, 2))
    e0, e1 = tl.split(ev.reshape(BLOCK_N, 2, 2))
    o0, o1 = tl.split(od.reshape(BLOCK_N, 2, 2))
    s0, s4 = tl.split(e0)
    s2, s6 = tl.split(e1)
    s1, s5 = tl.split(o0)
    s3, s7 = tl.split(o1)
    return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _step(x_ptr, w_ptr, s_ptr, k0, offs_m, mask_m, offs_n, N, KB, stride_xm, MX: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """(scaled weights [BLOCK_N, 128], x^T [128, BLOCK_M]) of the step at k0."""
    dt: tl.constexpr = x_ptr.dtype.element_ty
    s0, s1, s2, s3, s4, s5, s6, s7 = _split8(_step_scales(s_ptr, k0, offs_n, KB, MX, dt), BLOCK_N)
    a = _cat_k(_block64(w_ptr, k0 // 64, offs_n, N, s0, s1, s2, s3, BLOCK_N, dt),
               _block64(w_ptr, k0 // 64 + 1, offs_n, N, s4, s5, s6, s7, BLOCK_N, dt), BLOCK_N, 64)
    xt = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (k0 + tl.arange(0, 128))[:, None],
                 mask=mask_m[None, :], other=0.0)
    return a, xt


@triton.jit
def _fp4_one_dot_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, KB, stride_xm, k_per_split, post,
                        STEPS: tl.constexpr, MX: tl.constexpr, ATOMIC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y^T tile [BLOCK_N, BLOCK_M] (times `post`: NVFP4 2^8 * global, MXFP4 1) over STEPS 128-K steps, one dot
    each, the first peeled off the loop (one accumulator, wgmmas in flight across steps). Whole tiles only."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_lo = tl.program_id(1) * k_per_split
    a, xt = _step(x_ptr, w_ptr, s_ptr, k_lo, offs_m, mask_m, offs_n, N, KB, stride_xm, MX, BLOCK_N)
    acc = tl.dot(a, xt)
    for step in range(1, STEPS):
        a, xt = _step(x_ptr, w_ptr, s_ptr, k_lo + step * 128, offs_m, mask_m, offs_n, N, KB, stride_xm, MX,
                      BLOCK_N)
        acc = tl.dot(a, xt, acc)
    store_tile(y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], acc * post, mask_m[None, :], ATOMIC)


def to_planar(w_packed: torch.Tensor, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 engine weight (uint8 [N, K/2] ONNX bytes, scales [N, K/B]) -> (planar words int32 [K/8, N], scale
    bits uint8 [N, K/B], as stored)."""
    from qcompile.plugins.int4_gemm.format import to_engine
    codes = torch.stack([w_packed & 0xF, w_packed >> 4], dim=-1).reshape(w_packed.shape[0], -1)  # [N, K]
    q = codes.to(torch.int16)
    q = torch.where(q >= 8, q - 16, q)  # the nibble as a signed int4 value: same bits
    return to_engine(q.t().contiguous(), 64), w_scale.view(torch.uint8).contiguous()


def launch(x, words, scale_bits, w_global: float, mx: bool, cfg: dict, num_sms: int = 132) -> torch.Tensor:
    """fp32 -> x.dtype `x @ dequant(W)^T` from the planar words (w_global: NVFP4's global scale, a float)."""
    from probe_util import even_splits
    m, k = x.shape
    n = words.shape[1]
    tiles, splits, per_steps = even_splits(k, n, cfg, STEP, num_sms)
    y = (torch.zeros if splits > 1 else torch.empty)((m, n), device=x.device, dtype=torch.float32)
    post = 1.0 if mx else 256.0 * w_global  # a host float: .item() inside a CUDA-graph capture fails
    _fp4_one_dot_kernel[(tiles, splits, triton.cdiv(m, cfg["BLOCK_M"]))](
        x, words, scale_bits, y, m, n, scale_bits.shape[1], x.stride(0), per_steps * STEP, post, STEPS=per_steps,
        MX=mx, ATOMIC=splits > 1, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return y.to(x.dtype)


def configs(m: int):
    bm = 16 if m <= 16 else 64
    for bn, stages, waves in itertools.product((64, 128), (3, 4), (1, 2, 4, 8)):
        yield f"one_dot {bn}x{bm} s{stages} w{waves}", dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=stages,
                                                           waves=waves)


def cell(k: int, n: int, m: int) -> dict:
    from bench_fp4_gemm import FP4, GROUP, make_fp4, make_int4
    from gpu_timing import bench, rotating
    from qcompile.plugins.fp4_gemm.op import fp4_gemm
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm
    dtype = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    res = {}
    wb = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["cublas bf16"] = bench(lambda: torch.nn.functional.linear(x, wb()), copies=4, rep=40)
    w4 = rotating(lambda: make_int4(k, n), k * n // 2)
    res["int4 op"] = bench(lambda: int4_groupwise_gemm(x, *w4(), None, None, GROUP), copies=4, rep=40)
    line = f"{k}x{n} M={m}: bf16 {res['cublas bf16']:.1f} | int4 op {res['int4 op']:.1f}"
    for fmt, block in FP4.items():
        mx = fmt == "mxfp4"
        sets = [make_fp4(fmt, k, n) for _ in range(max(2, min(8, (512 << 20) // (k * n // 2))))]
        res[f"{fmt} op"] = bench(lambda it=itertools.cycle(sets): fp4_gemm(x, *next(it), None, None, block),
                                 copies=4, rep=40)
        ref = x.double() @ dequantize_weight(*sets[0], block).double().t()
        planar = [to_planar(w, s) + (1.0 if g is None else float(g),) for w, s, g in sets]
        timed = {}
        for name, cfg in configs(m):
            key = f"{fmt} {name}"
            try:
                y = launch(x, planar[0][0], planar[0][1], planar[0][2], mx, cfg)
                err = float((y.double() - ref).norm() / ref.norm())
                if err > 2e-2:
                    res[key] = f"wrong: rel err {err:.3g}"
                    continue
                res[key] = timed[key] = bench(lambda it=itertools.cycle(planar): launch(x, *next(it), mx, cfg),
                                              copies=4, rep=40)
            except Exception as e:  # noqa: BLE001  (a configuration Triton cannot build)
                res[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        line += f" | {fmt} op {res[f'{fmt} op']:.1f}"
        if timed:
            best = min(timed, key=timed.get)
            res[f"best {fmt}"] = best
            line += (f" probe {timed[best]:.1f} ({best[len(fmt) + 9:]}) {res[f'{fmt} op'] / timed[best]:.2f}x op "
                     f"{res['cublas bf16'] / timed[best]:.2f}x bf16")
        else:
            line += " probe: " + str(next((v for c, v in res.items() if c.startswith(fmt + " one")), "none"))
    print(line, flush=True)
    return res


def main():
    from gpu_timing import MODE
    from probe_util import run_grid
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x14336", "14336x4096", "8192x28672"])
    ap.add_argument("--ms", type=int, nargs="*", default=[16, 64])
    args = ap.parse_args()
    MODE["graph"] = True
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_grid(cell, [tuple(map(int, s.split("x"))) for s in args.shapes], args.ms, "fp4_one_dot_probe.json")


if __name__ == "__main__":
    main()
