"""Diagnostic prepared for the next H200 session: does INT4 decode cost matter once the MMA accumulates in place?

The pair kernel of commit 84a741e (two nibbles -> two 16-bit floats per `lop3`, 3.6 instructions per weight in its
loop against mm_t's 7.2) lost to the shipped kernels everywhere (benchmarks/int4_pair_dot.json). It also differed
from mm_t in one more way: it scaled each step's fresh `tl.dot` (`acc += dot(w, x) * s`), where mm_t scales the
weight tile and accumulates in place (`acc = dot(w * s, x, acc)`), which lets the wgmma stay asynchronous across
steps. `_int4_pair_acc_kernel` is mm_t with only the decoding replaced: per shifted word, one inline-PTX block
(`lop3`, a packed subtraction of magic + zp, a packed multiply by the group scale) makes two scaled weights; x's tile
is loaded in the pairs' K order (`pair_order`). The same numerics as mm_t (the weight tile rounded to x.dtype).

    LD_PRELOAD=... python3 tools/diag/int4_pair_inplace.py          # H200: checks vs float64, then timing
    TRITON_INTERPRET=1 python3 tools/diag/int4_pair_inplace.py --check-cpu   # the plain-Triton twin, CPU
    python3 tools/diag/int4_pair_inplace.py --sass                   # loop instructions per weight (sm_90, no GPU)
Not part of the product; not yet run on a GPU.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

MAGIC = {torch.bfloat16: (0x43084308, 136.0), torch.float16: (0x64086408, 1032.0)}  # both halves: (bits, value - q)


@triton.jit
def pair_order(r):
    """K offset inside its word of tile position r (0..7): r = 4a + 2b + h holds nibble p + 4h, p = 2b + a."""
    return 2 * ((r >> 1) & 1) + (r >> 2) + 4 * (r & 1)


@triton.jit
def _scaled_pairs(words, c_bits, s_bits, MAGIC_BITS: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_ASM: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words [BLOCK_N, BLOCK_K/8] -> [BLOCK_N, BLOCK_K] DOT_DTYPE (q - zp) * s in `pair_order` along K. c_bits,
    s_bits [BLOCK_N]: the 16-bit floats magic + zp and s, their bits in both halves of an int32."""
    t = tl.join(tl.join(words, words >> 4), tl.join(words >> 8, words >> 12))  # [.., a, b] = words >> 4(2b + a)
    if USE_ASM:
        both = tl.reshape(tl.join(t, t), (BLOCK_N, BLOCK_K))
        magic = tl.full((BLOCK_N, BLOCK_K), MAGIC_BITS, tl.int32)
        c = tl.broadcast_to(c_bits[:, None], (BLOCK_N, BLOCK_K))
        s = tl.broadcast_to(s_bits[:, None], (BLOCK_N, BLOCK_K))
        if MAGIC_BITS == 0x43084308:
            out = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, $3, 0x6A; sub.bf16x2 t, t, $5; "
                    "mul.rn.bf16x2 $0, t, $7; }",
                constraints="=r,r,r,r,r,r,r,r,r", args=[both, magic, c, s], dtype=tl.bfloat16, is_pure=True,
                pack=2)
        else:
            out = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, $3, 0x6A; sub.f16x2 t, t, $5; "
                    "mul.rn.f16x2 $0, t, $7; }",
                constraints="=r,r,r,r,r,r,r,r,r", args=[both, magic, c, s], dtype=tl.float16, is_pure=True, pack=2)
    else:
        half = MAGIC_BITS & 0xFFFF
        lo = ((t & 0xF) ^ half).to(tl.int16)
        hi = (((t >> 16) & 0xF) ^ half).to(tl.int16)
        v = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(DOT_DTYPE, bitcast=True)
        cv = (c_bits & 0xFFFF).to(tl.int16).to(DOT_DTYPE, bitcast=True)
        sv = (s_bits & 0xFFFF).to(tl.int16).to(DOT_DTYPE, bitcast=True)
        out = ((v - cv[:, None]) * sv[:, None]).to(DOT_DTYPE)
    return out


@triton.jit
def _bits_pair(v):
    """16-bit float v -> its bits in both halves of an int32."""
    b = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _int4_pair_acc_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, k_per_split,
    K_STEPS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ATOMIC: tl.constexpr,
    MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """mm_t (acc^T [BLOCK_N, BLOCK_M] = W_tile @ x^T, accumulated in place) with `_scaled_pairs` decoding."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_K)
    k_in_step = (r // 8) * 8 + pair_order(r % 8)
    mask_n = offs_n < N
    mask_m = offs_m < M
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K_STEPS):
        k0 = pid_k * k_per_split + step * BLOCK_K
        kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(w_ptr + kw.to(tl.int64)[None, :] * N + offs_n[:, None],
                        mask=mask_n[:, None] & (kw < K // 8)[None, :], other=0, eviction_policy="evict_first")
        g = k0 // GROUP
        smask = mask_n & (k0 < K)
        s_bits = _bits_pair(tl.load(s_ptr + g * N + offs_n, mask=smask, other=0.0).to(dot_dtype))
        if HAS_ZERO:
            zp = tl.load(z_ptr + g * N + offs_n, mask=smask, other=0).to(tl.float32)
            c_bits = _bits_pair((zp + MAGIC_VALUE).to(dot_dtype))
        else:
            c_bits = tl.full((BLOCK_N,), MAGIC_BITS, tl.int32)
        w = _scaled_pairs(words, c_bits, s_bits, MAGIC_BITS, dot_dtype, USE_ASM, BLOCK_N, BLOCK_K)
        offs_k = k0 + k_in_step
        xt = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None],
                     mask=mask_m[None, :] & (offs_k < K)[:, None], other=0.0)
        if USE_ASM:
            acc = tl.dot(w, xt, acc)
        else:  # the interpreter's dot misreads 16-bit floats made by bitcasts
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    mask = mask_n[:, None] & mask_m[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def pair_acc(x2d, words, scale, zero, group, cfg, num_sms=132):
    """`x2d @ dequant(W)` [M, N] on the INT4 engine layout [K/8, N]: float32 when K is split, else x.dtype."""
    from qcompile.plugins.gemm_dispatch import cdiv, split_for_waves
    m, k = x2d.shape
    n = words.shape[1]
    block_k = min(cfg["BLOCK_K"], group)
    tiles = cdiv(n, cfg["BLOCK_N"])
    splits, per = split_for_waves(k, tiles, block_k, cfg["waves"], num_sms)
    y = (torch.zeros((m, n), dtype=torch.float32, device=x2d.device) if splits > 1
         else torch.empty((m, n), dtype=x2d.dtype, device=x2d.device))
    bits, value = MAGIC[x2d.dtype]
    _int4_pair_acc_kernel[(tiles, splits, cdiv(m, cfg["BLOCK_M"]))](
        x2d, words, scale, zero if zero is not None else scale, y, m, n, k, x2d.stride(0), per,
        K_STEPS=per // block_k, GROUP=group, HAS_ZERO=zero is not None, ATOMIC=splits > 1, MAGIC_BITS=bits,
        MAGIC_VALUE=value, USE_ASM=x2d.device.type == "cuda", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def case(m, k, n, group, dtype, device, zero=False, seed=0):
    """(x, engine words, scale [K/g, N] in x.dtype, int8 zero points or None, float64 reference)."""
    from qcompile.plugins.int4_gemm.format import to_engine
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (k, n), dtype=torch.int32, generator=g)
    scale = (torch.rand(k // group, n, generator=g) * 0.01 + 1e-3).to(dtype)
    zp = torch.randint(-3, 4, (k // group, n), generator=g, dtype=torch.int8) if zero else None
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (q.double() - (zp.double().repeat_interleave(group, 0) if zero else 0)) \
        * scale.double().repeat_interleave(group, 0)
    to = dict(device=device)
    return (x.to(**to), to_engine(q).to(**to), scale.to(**to), zp.to(**to) if zero else None, x.double() @ w)


def rel_err(y, ref) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


def check(device: str, cases, cfg, bound: float) -> None:
    for m, k, n, group, dtype, zero in cases:
        x, words, scale, zp, ref = case(m, k, n, group, dtype, device, zero)
        err = rel_err(pair_acc(x, words, scale, zp, group, cfg, num_sms=4 if device == "cpu" else 132), ref)
        print(f"check M={m} {k}x{n} g{group} {str(dtype)[6:]} zero={zero}: rel err {err:.2e}", flush=True)
        assert err < bound, err


def sass() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from sass_count import compile_sass, report
    sig = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*i8", y_ptr="*fp32",
               **{a: "i32" for a in ("M", "N", "K", "stride_xm", "k_per_split")})
    const = dict(K_STEPS=8, GROUP=128, HAS_ZERO=False, ATOMIC=True, MAGIC_BITS=0x43084308, MAGIC_VALUE=136.0,
                 USE_ASM=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)
    div = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "N", "K", "stride_xm", "k_per_split"]
    report("int4_pair_acc (mm_t's tile)", compile_sass(_int4_pair_acc_kernel, sig, const, div, 4, 3), 64)


MM_T = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, waves=8)  # the shipped M <= 16 tile
CONFIGS = [MM_T, dict(MM_T, num_stages=4), dict(MM_T, BLOCK_N=128, num_warps=8), dict(MM_T, waves=4)]


def main() -> None:
    if "--sass" in sys.argv:
        sass()
        return
    if "--check-cpu" in sys.argv:
        check("cpu", [(1, 256, 64, 128, torch.float16, False), (5, 512, 96, 64, torch.float16, True)],
              dict(MM_T, BLOCK_N=32, num_stages=1, waves=4), 2e-3)
        return
    sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/, for gpu_timing
    from gpu_timing import MODE, bench, rotating
    from probe_util import save
    from qcompile.plugins.int4_gemm import kernel as k4
    MODE["graph"] = True
    check("cuda", [(1, 4096, 4096, 128, torch.bfloat16, False), (7, 4096, 1024, 64, torch.float16, True),
                   (16, 14336, 4096, 128, torch.bfloat16, True)], MM_T, 1e-2)
    results = {}
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)):
        _, words, scale, _, _ = case(1, k, n, 128, torch.bfloat16, "cuda")
        nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        nw = rotating(lambda: words.clone(), n * k // 2)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            mm_t = dict(CONFIGS[0], kernel="mm_t", SCALE_ACC=False)
            res = {"bf16": bench(lambda: torch.nn.functional.linear(x, nbf())),
                   "op": bench(lambda: k4.int4_gemm_triton(x, nw(), scale, None, None, 128)),
                   "mm_t": bench(lambda: k4.run_bucket(mm_t, x, nw(), scale, None, None, 128))}
            for i, cfg in enumerate(CONFIGS):
                res[f"pair_acc{i}"] = bench(lambda cfg=cfg: pair_acc(x, nw(), scale, None, 128, cfg).to(x.dtype))
            results[f"{k}x{n} M={m}"] = res
            print(f"{k}x{n} M={m}: " + " ".join(f"{c}:{v:.1f}" for c, v in res.items()), flush=True)
    save(results, "int4_pair_inplace.json")


if __name__ == "__main__":
    main()
