"""Diagnostic: an INT4 small-M kernel whose dequantization costs about one instruction per weight.

Counting the SASS of the shipped kernels (compiled for sm_90 on a CPU machine, `tools/diag/sass_count.py`) shows
where the time goes at M <= 16: the swapped-operand tile kernel spends ~6.7 instructions per weight in its loop
(unpack, int16 packing, bf16 subtract and scale multiply), the M = 1 GEMV ~5.3 (shift, AND and XOR not fused,
FFMA). At 235 M weights (8192 x 28672) that is 40-50 µs of issue slots per call against ~29 µs of HBM time.

`_int4_pair_dot_kernel` (swapped operands, y^T = W x^T, like the shipped mm_t) instead
  * shifts each word by 0, 4, 8, 12 (3 shifts per 8 weights) and turns a shifted word into two bf16 (or fp16)
    values with one `lop3` ((t & 0x000F000F) ^ magic, inline PTX): nibbles p and p + 4 of the word land in the
    low and high half as 136 + q (bf16; fp16: 1032 + q), which is exact and is fed to the MMA as is;
  * loads x's tile in the order these pairs come out (position r of a word's 8 holds k = p + 4h, see `_perm`),
    so no register shuffling is needed to restore k order;
  * takes the 136 (+ zero point) off after the dot, per step: part - c[n] * sum_k x[m, k], then the group scale:
    the step is one group (BLOCK_K divides the group), so both cost a few FMAs per output, not per weight.
The tile goes to tensor cores at any M <= BLOCK_M (M = 1 too: the MMA's narrow side is just padded).

    LD_PRELOAD=... python3 tools/diag/int4_pair_dot.py            # H200: check vs float64, time vs bf16 and the op
    TRITON_INTERPRET=1 python3 tools/diag/int4_pair_dot.py --check-cpu   # the pure-Triton twin of the asm, CPU
Not part of the product.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

MAGIC = {torch.bfloat16: (0x43084308, 136.0), torch.float16: (0x64086408, 1032.0)}  # per half: (bits, value - q)


@triton.jit
def _perm(r):
    """k offset inside a word of tile position r (0..7): r = 4a + 2b + h holds nibble p + 4h, p = 2b + a."""
    return 2 * ((r >> 1) & 1) + (r >> 2) + 4 * (r & 1)


@triton.jit
def _pairs(words, c_bits, MAGIC_BITS: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_ASM: tl.constexpr,
           NATURAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words [BLOCK_N, BLOCK_K/8] -> [BLOCK_N, BLOCK_K] 16-bit floats q - zp in `_perm` order. c_bits [BLOCK_N]:
    the 16-bit float magic + zp of each row, its bits in both halves of an int32."""
    if NATURAL:  # words packed by `pack_natural`: the tile comes out in k order
        t = tl.join(tl.join(words, words >> 8), tl.join(words >> 4, words >> 12))
    else:  # [.., a, b] = words >> 4(2b + a)
        t = tl.join(tl.join(words, words >> 4), tl.join(words >> 8, words >> 12))
    if USE_ASM:
        both = tl.reshape(tl.join(t, t), (BLOCK_N, BLOCK_K))
        magic = tl.full((BLOCK_N, BLOCK_K), MAGIC_BITS, tl.int32)
        c = tl.broadcast_to(c_bits[:, None], (BLOCK_N, BLOCK_K))
        # on the first of each pair of (equal) words: (a & 0x000F000F) ^ magic (LUT 0x6a) puts nibbles p and p + 4
        # in the two halves as magic + q, then one packed subtraction of magic + zp
        if MAGIC_BITS == 0x43084308:
            out = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; lop3.b32 t, $1, 983055, $3, 106; sub.bf16x2 $0, t, $5; }",
                constraints="=r,r,r,r,r,r,r", args=[both, magic, c], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; lop3.b32 t, $1, 983055, $3, 106; sub.f16x2 $0, t, $5; }",
                constraints="=r,r,r,r,r,r,r", args=[both, magic, c], dtype=tl.float16, is_pure=True, pack=2)
    else:
        half = MAGIC_BITS & 0xFFFF
        lo = ((t & 0xF) ^ half).to(tl.int16)
        hi = (((t >> 16) & 0xF) ^ half).to(tl.int16)
        v = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(DOT_DTYPE, bitcast=True)
        cv = (c_bits & 0xFFFF).to(tl.int16).to(DOT_DTYPE, bitcast=True)
        out = (v.to(tl.float32) - cv.to(tl.float32)[:, None]).to(DOT_DTYPE)
    return out


@triton.jit
def _int4_pair_dot_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, k_per_split,
    K_STEPS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ATOMIC: tl.constexpr,
    MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr, USE_ASM: tl.constexpr, NATURAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[n, m] over one K slice: per step (inside one group) dot(q - zp, x) times s[n]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_K // 8)
    r = tl.arange(0, BLOCK_K)
    if NATURAL:
        k_in_step = r
    else:
        k_in_step = (r // 8) * 8 + _perm(r % 8)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K_STEPS):  # steps past K (last split) are masked
        k0 = pid_k * k_per_split + step * BLOCK_K
        kw = k0 // 8 + offs_w
        words = tl.load(w_ptr + kw.to(tl.int64)[None, :] * N + offs_n[:, None],
                        mask=mask_n[:, None] & (kw < K // 8)[None, :], other=0, eviction_policy="evict_first")
        g = k0 // GROUP
        smask = mask_n & (k0 < K)
        s = tl.load(s_ptr + g * N + offs_n, mask=smask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zp = tl.load(z_ptr + g * N + offs_n, mask=smask, other=0).to(tl.float32)
            c16 = (zp + MAGIC_VALUE).to(x_ptr.dtype.element_ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            c_bits = c16 | (c16 << 16)
        else:
            c_bits = tl.full((BLOCK_N,), MAGIC_BITS, tl.int32)
        w = _pairs(words, c_bits, MAGIC_BITS, x_ptr.dtype.element_ty, USE_ASM, NATURAL, BLOCK_N, BLOCK_K)
        offs_k = k0 + k_in_step
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                     mask=mask_m[None, :] & (offs_k < K)[:, None], other=0.0)
        if USE_ASM:
            part = tl.dot(w, xt)
        else:  # the interpreter's dot misreads 16-bit floats made by bitcasts; float32 is exact here as well
            part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        acc += part * s[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * N + offs_n[:, None]
    mask = mask_n[:, None] & mask_m[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def pair_dot(x2d, words, scale, zero, group, cfg, use_asm=True, num_sms=132):
    """float32 (split K) or x.dtype `x2d @ dequant(W)` [M, N] on the INT4 engine layout [K/8, N]."""
    from qcompile.plugins.gemm_dispatch import cdiv, split_for_waves
    m, k = x2d.shape
    n = words.shape[1]
    block_k = min(cfg["BLOCK_K"], group)
    tiles = cdiv(n, cfg["BLOCK_N"])
    splits, per = split_for_waves(k, tiles, block_k, cfg["waves"], num_sms)
    y = (torch.zeros((m, n), dtype=torch.float32, device=x2d.device) if splits > 1
         else torch.empty((m, n), dtype=x2d.dtype, device=x2d.device))
    bits, value = MAGIC[x2d.dtype]
    _int4_pair_dot_kernel[(tiles, splits, cdiv(m, cfg["BLOCK_M"]))](
        x2d, words, scale, zero if zero is not None else scale, y, m, n, k, x2d.stride(0), per,
        K_STEPS=per // block_k, GROUP=group, HAS_ZERO=zero is not None, ATOMIC=splits > 1, MAGIC_BITS=bits,
        MAGIC_VALUE=value, USE_ASM=use_asm, NATURAL=cfg.get('natural', False), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def pack_natural(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 q [K, N] -> int32 words [K/8, N] whose nibble p holds k = 8w + 2p and nibble p + 4 holds
    8w + 2p + 1 (p < 4): the order `_pairs` turns into k order with NATURAL."""
    k, n = q.shape
    nib = (q.to(torch.int64) & 0xF).reshape(k // 8, 4, 2, n)  # [w, p, h, n]: k = 8w + 2p + h
    shifts = (4 * (torch.arange(4).reshape(4, 1) + 4 * torch.arange(2).reshape(1, 2))).reshape(1, 4, 2, 1)
    words = (nib << shifts.to(q.device)).sum(dim=(1, 2))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def case(m, k, n, group, dtype, device, zero=False, seed=0, natural=False):
    """(x, engine words, scale [K/g, N], zero or None, float64 reference of x @ dequant(W))."""
    from qcompile.plugins.int4_gemm.format import to_engine
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (k, n), dtype=torch.int32, generator=g)
    scale = torch.rand(k // group, n, generator=g) * 0.01 + 1e-3
    zp = torch.randint(-3, 4, (k // group, n), generator=g).float() if zero else None
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (q.double() - (zp.double().repeat_interleave(group, 0) if zero else 0)) \
        * scale.to(dtype).double().repeat_interleave(group, 0)
    ref = x.double() @ w
    to = dict(device=device)
    return (x.to(**to), (pack_natural(q) if natural else to_engine(q)).to(**to), scale.to(dtype).to(**to),
            zp.to(dtype).to(**to) if zero else None, ref)


def rel_err(y, ref) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())


def check_cpu() -> None:
    """The pure-Triton twin of the asm (same permutation, same corrections) against float64 (interpreter)."""
    for m, k, n, group, dtype, zero in ((1, 256, 64, 128, torch.bfloat16, False), (5, 512, 96, 64, torch.float16, True),
                                         (16, 256, 64, 128, torch.bfloat16, True)):
        for natural in (False, True):
            x, words, scale, zp, ref = case(m, k, n, group, dtype, "cpu", zero, natural=natural)
            cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1, waves=4, natural=natural)
            err = rel_err(pair_dot(x, words, scale, zp, group, cfg, use_asm=False, num_sms=4), ref)
            print(f"M={m} K={k} N={n} g={group} {dtype} zero={zero} natural={natural}: rel err {err:.2e}")
            assert err < 5e-3, err


CONFIGS = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=st, waves=wv, natural=nat)
           for bn, w, st, wv, nat in ((64, 4, 4, 4, False), (128, 4, 4, 1, False), (128, 4, 4, 4, False),
                                      (128, 8, 4, 4, False), (256, 8, 3, 1, False),
                                      (64, 4, 4, 4, True), (128, 4, 4, 4, True))]
CONFIGS_64 = [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=st, waves=wv, natural=False)
              for bn, w, st, wv in ((64, 4, 4, 4), (128, 4, 3, 1), (128, 8, 4, 2), (256, 8, 3, 1))]
CONFIGS_LARGE = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=st, waves=0, natural=False)
                 for bm, bn, w, st in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 256, 8, 3))]


# the op's M buckets before the pair kernel (GEMV at M = 1, mm_t to 128 rows, dequantize + cuBLAS above)
OLD_CONFIGS = [
    (1, dict(kernel="gemv", BLOCK_N=512, MIN_TILES=8, BLOCK_K=32, num_warps=2, num_stages=3, waves=32)),
    (16, dict(kernel="mm_t", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, waves=8,
              SCALE_ACC=False)),
    (128, dict(kernel="mm_t", BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, waves=2,
               SCALE_ACC=False)),
    (None, dict(kernel="dequant")),
]


def cfg_name(cfg) -> str:
    return (f"bn{cfg['BLOCK_N']}w{cfg['num_warps']}p{cfg['num_stages']}v{cfg['waves']}"
            + ("nat" if cfg["natural"] else ""))


def main() -> None:
    if "--check-cpu" in sys.argv:
        check_cpu()
        return
    sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/, for gpu_timing
    from gpu_timing import MODE, bench, rotating
    from probe_util import save
    from qcompile.plugins.int4_gemm import kernel as k4
    from qcompile.plugins.int4_gemm.op import int4_groupwise_gemm  # noqa: F401  (registers the op)
    MODE["graph"] = True
    results = {}
    # correctness first: asm path, both dtypes, zero points, odd M, group 64 and 128
    for m, k, n, group, dtype, zero in ((1, 4096, 4096, 128, torch.bfloat16, False),
                                         (7, 4096, 1024, 64, torch.float16, True),
                                         (16, 14336, 4096, 128, torch.bfloat16, True),
                                         (50, 4096, 4096, 128, torch.bfloat16, True),
                                         (100, 2048, 1024, 32, torch.float16, False)):
        for cfg in (CONFIGS[0], CONFIGS[4], CONFIGS[-1]) if m <= 16 else CONFIGS_64[:2]:
            x, words, scale, zp, ref = case(m, k, n, group, dtype, "cuda", zero, natural=cfg["natural"])
            for asm in (True, False):
                err = rel_err(pair_dot(x, words, scale, zp, group, cfg, use_asm=asm), ref)
                label = f"check M={m} {k}x{n} g{group} {str(dtype)[6:]} zero={zero} asm={asm} {cfg_name(cfg)}"
                results[label] = err
    checks = {c: e for c, e in results.items() if c.startswith("check")}
    worst = max(checks, key=checks.get)
    print(f"{len(checks)} checks vs float64: worst {checks[worst]:.2e} ({worst})", flush=True)
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (4096, 1024)):
        x1, words, scale, _, _ = case(1, k, n, 128, torch.bfloat16, "cuda")
        nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
        nw = rotating(lambda: words.clone(), n * k // 2)  # the same bytes serve the natural layout's timing
        for m in (1, 16, 64, 256, 1024):
            if m > 64 and k * n < 8192 * 28672:  # large M: the big shape only (time)
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = {"bf16": bench(lambda: torch.nn.functional.linear(x, nbf())),
                   "old": bench(lambda: k4.int4_gemm_triton(x, nw(), scale, None, None, 128, configs=OLD_CONFIGS)),
                   "op": bench(lambda: torch.ops.qcompile.int4_groupwise_gemm(x, nw(), scale, None, None, 128))}
            for cfg in CONFIGS if m <= 16 else CONFIGS_64 if m <= 64 else CONFIGS_LARGE:
                name = cfg_name(cfg)
                try:
                    res[name] = bench(lambda: pair_dot(x, nw(), scale, None, 128, cfg).to(torch.bfloat16))
                except Exception as exc:  # noqa: BLE001 (a configuration that does not compile)
                    res[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
            best = min((v, c) for c, v in res.items() if isinstance(v, float) and c not in ("bf16", "op", "old"))
            results[f"{k}x{n} M={m}"] = res
            print(f"{k}x{n} M={m}: bf16 {res['bf16']:.1f} old {res['old']:.1f} ({res['bf16'] / res['old']:.2f}x) "
                  f"op {res['op']:.1f} ({res['bf16'] / res['op']:.2f}x) "
                  f"best {best[0]:.1f} ({res['bf16'] / best[0]:.2f}x) {best[1]}", flush=True)
        save(results, "int4_pair_dot.json")
    fp4_part(results, bench, rotating)
    save(results, "int4_pair_dot.json")


def fp4_part(results, bench, rotating) -> None:
    """The FP4 plugin's split-K tile kernel with its plain decoding vs pair decoding (`PAIRS`), NVFP4 and MXFP4
    checked against float64, NVFP4 timed at M = 1 and 16 (and the INT4 plugin's pair launcher checked)."""
    from qcompile.algorithms.fp4 import quantize_fp4
    from qcompile.plugins.fp4_gemm import format as F
    from qcompile.plugins.fp4_gemm import kernel as f4
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight
    from qcompile.plugins.int4_gemm import kernel as k4

    x, words, scale, zp, ref = case(9, 4096, 2048, 128, torch.bfloat16, "cuda", True)
    cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, waves=4)
    err = rel_err(k4.launch_pair(x, words, scale, zp.to(torch.int8), 128, cfg), ref)
    results["check plugin int4 launch_pair M=9 zp"] = err
    print(f"check plugin int4 launch_pair M=9 bf16 zp: {err:.2e}", flush=True)
    variants = {"fp4 now": f4.SMALL, "pairs bn64": {**f4.SMALL, "PAIRS": True},
                "pairs bn128": {**f4.SMALL, "BLOCK_N": 128, "PAIRS": True},
                "pairs bn128 p4": {**f4.SMALL, "BLOCK_N": 128, "num_stages": 4, "PAIRS": True}}
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)):
        for fmt in ("nvfp4", "mxfp4") if k == 4096 and n == 4096 else ("nvfp4",):
            qw = quantize_fp4(torch.randn(k, n, device="cuda") * 0.05, fmt)
            packed, wsc = F.pack_codes(qw.codes), qw.scale
            glob = None if qw.global_scale is None else qw.global_scale.to(torch.float32)
            w64 = dequantize_weight(packed, wsc, glob, qw.block_size).double()
            nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16), n * k * 2)
            npk = rotating(lambda: packed.clone(), n * k // 2)
            for m in (1, 16):
                for dtype in (torch.bfloat16, torch.float16) if m == 16 and n == 4096 else (torch.bfloat16,):
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    ref = (x.double() @ w64.t()).cpu()
                    res = {"bf16": bench(lambda: torch.nn.functional.linear(x, nbf()))} if dtype == torch.bfloat16 else {}
                    for name, c in variants.items():
                        run = lambda p, c=c: f4.launch_gemm(x, p, wsc, glob, None, qw.block_size, c)  # noqa: E731
                        e = rel_err(run(packed), ref)
                        res[name + " err"] = e
                        if dtype == torch.bfloat16 and fmt == "nvfp4" and e < 2e-2:
                            res[name] = bench(lambda run=run: run(npk()).to(dtype))
                    label = f"fp4 {fmt} {k}x{n} M={m} {str(dtype)[6:]}"
                    results[label] = res
                    print(label + ": " + " ".join(f"{c}:{v:.3g}" for c, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
