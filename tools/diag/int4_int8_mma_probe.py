"""Diagnostic (H200, issue 4): INT4 W4A16 on the INT8 tensor cores, as W8A16's
`split_mma` does it, with the 4-bit weight turned into int8 by one bit operation per byte.

Weight layout here: bytes [N, K/2] (K contiguous), byte j of row n = q[n, 2j] in the low nibble, q[n, 2j+1] in the
high one (two's complement 4-bit; ONNX's packing of the transposed weight). As int8, `byte << 4` is 16 q[n, 2j]
and `byte & 0xF0` is 16 q[n, 2j+1]: two int8 [BLOCK_N, g/2] tiles per group, straight into the INT8 MMA, no float
conversion (the shipped kernels spend 5-7 SASS instructions per weight decoding nibbles into bf16).
x is split per group of K (one scale per row and group, s = amax / 32639) into hi/lo int8 planes, stored
de-interleaved: even k and odd k apart, so the two weight tiles meet their own plane. Per group:
acc += (P_even . (16 q_even) + P_odd . (16 q_odd)) * s[m] / 16 * scale[n, g] (* 256 on the hi rows).

    LD_PRELOAD=... python3 tools/diag/int4_int8_mma_probe.py          # H200: checks vs float64, then timing
    TRITON_INTERPRET=1 python3 tools/diag/int4_int8_mma_probe.py --check-cpu
    python3 tools/diag/int4_int8_mma_probe.py --sass                   # loop instructions per weight (sm_90)

Times (µs, CUDA-graph replay, rotating weights), M in {1, 16} on the four kernel-target shapes: cuBLAS bf16,
the shipped INT4 op (engine layout [K/8, N] words), the split kernel alone, split + GEMM per tile. Symmetric
weights, g = 128 only (zero points would subtract z[n, g] * sum(x in the group) per group: not in this probe).
Not part of the product: commit 028983c productized it (reverted: the decode engine got slower, BENCHMARKS.md,
tenth session). Two H200 runs (2026-12-03): single-group tiles without split K
(benchmarks/int4_int8_mma_probe_run1.json, M in {1, 16, 64}), then this form, M in {1, 16}
(benchmarks/int4_int8_mma_probe.json).
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from qcompile.plugins.int8_wo_gemm.split_mma import split_chunks

G = 128


@triton.jit
def _split_pairs_kernel(x_ptr, planes_ptr, s_ptr, M, K, KC, stride_xm, MP: tl.constexpr, CHUNK: tl.constexpr,
                        CHUNKS: tl.constexpr):
    """Row m < MP (zeros past M), CHUNKS chunks of K: planes [2 (even/odd k), 2 MP (hi rows, lo rows), K/2] int8,
    s [MP, KC] = amax(chunk) / 32639 (split_mma's split, columns de-interleaved)."""
    m = tl.program_id(0)
    offs_c, _, _, hi, lo, s = split_chunks(x_ptr, m, M, K, stride_xm, CHUNK, CHUNKS)
    half = K // 2
    offs_h = offs_c[:, None] * (CHUNK // 2) + tl.arange(0, CHUNK // 2)[None, :]
    ok_h = offs_h < half
    hi_e, hi_o = tl.split(tl.reshape(hi, (CHUNKS, CHUNK // 2, 2)))
    lo_e, lo_o = tl.split(tl.reshape(lo, (CHUNKS, CHUNK // 2, 2)))
    even = planes_ptr
    odd = planes_ptr + 2 * MP * half
    tl.store(even + m * half + offs_h, hi_e.to(tl.int8), mask=ok_h)
    tl.store(even + (MP + m) * half + offs_h, lo_e.to(tl.int8), mask=ok_h)
    tl.store(odd + m * half + offs_h, hi_o.to(tl.int8), mask=ok_h)
    tl.store(odd + (MP + m) * half + offs_h, lo_o.to(tl.int8), mask=ok_h)
    tl.store(s_ptr + m * KC + offs_c, s, mask=offs_c < KC)


@triton.jit
def _nibbles_x16(b, ASM: tl.constexpr):
    """(16 q_even, 16 q_odd) int8 from bytes b (int8). ASM: on four bytes per 32-bit register at once (inline PTX,
    `pack=4`: one shift + one AND, and one AND, per 8 weights); else int8 element-wise operations."""
    if ASM:
        even = tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r", [b],
                                         dtype=tl.int8, is_pure=True, pack=4)
        odd = tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [b], dtype=tl.int8, is_pure=True,
                                        pack=4)
        return even, odd
    return b << 4, b & -16


@triton.jit
def _w4_mma_kernel(planes_ptr, s_ptr, w_ptr, gs_ptr, b_ptr, y_ptr, M, N, K, KC, groups_per_split,
                   K_STEPS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, MP: tl.constexpr, BLOCK_N: tl.constexpr,
                   GROUP: tl.constexpr, STEP_GROUPS: tl.constexpr, ASM: tl.constexpr):
    """y[m, n] for BLOCK_N weight rows over one K split: per group one pair of INT8 MMAs (even-k plane x 16 q_even,
    odd x 16 q_odd). A step covers STEP_GROUPS consecutive groups (their loads issued together: each weight row is
    read in runs of STEP_GROUPS * GROUP / 2 bytes). ATOMIC: float32 atomics into a zeroed y (split K)."""
    R: tl.constexpr = 2 * MP
    HALF: tl.constexpr = GROUP // 2
    half = K // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g_first = tl.program_id(1) * groups_per_split
    mask_n = offs_n < N
    r = tl.arange(0, R)
    row = r % MP
    valid = row < M
    part = tl.where(r < MP, 256.0 / 16.0, 1.0 / 16.0)  # the weights come as 16 q
    w_rows = w_ptr.to(tl.pointer_type(tl.int8)) + offs_n.to(tl.int64)[:, None] * half
    odd = planes_ptr + 2 * MP * half
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_STEPS):
        for i in tl.static_range(STEP_GROUPS):
            g = g_first + step * STEP_GROUPS + i
            in_k = (g < KC) & (g < g_first + groups_per_split)
            offs_h = g * HALF + tl.arange(0, HALF)
            ok = (offs_h < half) & in_k
            b = tl.load(w_rows + offs_h[None, :], mask=mask_n[:, None] & ok[None, :], other=0,
                        eviction_policy="evict_first")
            pe = tl.load(planes_ptr + r[:, None] * half + offs_h[None, :], mask=valid[:, None] & ok[None, :],
                         other=0)
            po = tl.load(odd + r[:, None] * half + offs_h[None, :], mask=valid[:, None] & ok[None, :], other=0)
            w_even, w_odd = _nibbles_x16(b, ASM)
            d = tl.dot(pe, tl.trans(w_even), out_dtype=tl.int32)
            d = tl.dot(po, tl.trans(w_odd), d, out_dtype=tl.int32)
            sx = tl.load(s_ptr + row * KC + g, mask=valid & in_k, other=0.0) * part
            gs = tl.load(gs_ptr + offs_n * KC + g, mask=mask_n & in_k, other=0.0).to(tl.float32)
            acc += d.to(tl.float32) * sx[:, None] * gs[None, :]
    y = tl.sum(tl.reshape(acc, (2, MP, BLOCK_N)), axis=0)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_m = tl.arange(0, MP)
    ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, y, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """q int [N, K] in [-8, 7] -> uint8 [N, K/2], k even in the low nibble."""
    u = (q & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def run(x, w_bytes, gscale, bias, cfg, num_sms=132):
    m, k = x.shape
    n = w_bytes.shape[0]
    mp = max(8, triton.next_power_of_2(m))
    kc = k // G
    planes = torch.empty((2, 2 * mp, k // 2), dtype=torch.int8, device=x.device)
    s = torch.empty((mp, kc), dtype=torch.float32, device=x.device)
    _split_pairs_kernel[(mp, triton.cdiv(kc, 8))](x, planes, s, m, k, kc, x.stride(0), MP=mp, CHUNK=G, CHUNKS=8)
    sg = cfg.get("SG", 1)
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    splits = 1
    while tiles * splits * 2 <= cfg.get("waves", 0) * num_sms and kc // (splits * 2) >= 2 * sg:
        splits *= 2
    per = triton.cdiv(kc, splits)
    atomic = splits > 1
    y = (torch.zeros if atomic else torch.empty)((m, n), dtype=torch.float32 if atomic else x.dtype, device=x.device)
    _w4_mma_kernel[(tiles, splits)](
        planes, s, w_bytes, gscale, bias if bias is not None else gscale, y, m, n, k, kc, per,
        K_STEPS=triton.cdiv(per, sg),
        HAS_BIAS=bias is not None, ATOMIC=atomic, MP=mp, BLOCK_N=cfg["BLOCK_N"], GROUP=G, STEP_GROUPS=sg,
        ASM=cfg.get("ASM", False), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.to(x.dtype) if atomic else y


# second run: every configuration with the inline PTX (it won or tied at M = 1 in the first), several groups per step,
# split K to `waves` waves of SMs
CFGS = [dict(BLOCK_N=bn, SG=sg, waves=wv, num_warps=4, num_stages=st, ASM=True)
        for bn in (32, 64, 128) for sg in (1, 2, 4) for wv in (1, 2) for st in (4,)]


def cfg_name(c):
    return f"{c['BLOCK_N']}sg{c.get('SG', 1)}v{c.get('waves', 0)}w{c['num_warps']}p{c['num_stages']}" + \
        ("asm" if c.get("ASM") else "")


def make_case(k, n, m, dtype, device, seed=0):
    """x (8 outlier channels), q [N, K], packed bytes, group scales [N, K/G], bias, float64 reference (on device)."""
    g = torch.Generator().manual_seed(seed + k + n + m)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 50.0
    x = x.to(device=device, dtype=dtype)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int32).to(device)
    gscale = (torch.rand(n, k // G, generator=g) * 0.01 + 1e-3).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    w = q.double() * gscale.double().repeat_interleave(G, dim=1)
    ref = x.double() @ w.t() + bias.double()
    del w
    return x, q, pack_rows(q), gscale, bias, ref


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def check_cpu():
    worst = 0.0
    for cfg in (dict(BLOCK_N=32, num_warps=4, num_stages=1),  # ASM = False: the interpreter has no inline PTX
                dict(BLOCK_N=32, SG=2, waves=8, num_warps=4, num_stages=1)):  # 8 waves of 4 SMs: split K
        for k, n, m in [(256, 48, 1), (384, 32, 3), (768, 40, 16), (256, 64, 33), (1024, 32, 2)]:
            x, _, wb, gs, b, ref = make_case(k, n, m, torch.float32, "cpu")
            e = rel_err(run(x, wb, gs, b, cfg, num_sms=4), ref)
            print(f"{cfg_name(cfg)} {k}x{n} M={m}: rel err {e:.2e}")
            worst = max(worst, e)
    assert worst < 2e-4, worst


def sass():
    sys.path.insert(0, os.path.dirname(__file__))
    from sass_count import compile_sass, report

    sig = dict(planes_ptr="*i8", s_ptr="*fp32", w_ptr="*u8", gs_ptr="*bf16", b_ptr="*bf16", y_ptr="*fp32",
               M="i32", N="i32", K="i32", KC="i32", groups_per_split="i32")
    div = ["planes_ptr", "s_ptr", "w_ptr", "gs_ptr", "b_ptr", "y_ptr", "N", "K", "KC"]
    for mp in (8, 16):
        for c in CFGS:
            if c["waves"] != 2:
                continue
            consts = dict(HAS_BIAS=True, ATOMIC=True, K_STEPS=64, MP=mp, BLOCK_N=c["BLOCK_N"], GROUP=G,
                          STEP_GROUPS=c["SG"], ASM=c["ASM"])
            code = compile_sass(_w4_mma_kernel, sig, consts, div, c["num_warps"], c["num_stages"])
            report(f"MP={mp} {cfg_name(c)}", code, c["BLOCK_N"] * G * c["SG"] // (32 * c["num_warps"]))


def part(k, n, m, dtype=torch.bfloat16):
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from gpu_timing import bench, rotating
    from qcompile.plugins.int4_gemm import register
    from qcompile.plugins.int4_gemm.format import to_engine

    x, q, wb, gs, b, ref = make_case(k, n, m, dtype, "cuda")
    res = {}
    nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["bf16"] = bench(lambda: torch.nn.functional.linear(x, nbf(), b))
    words = to_engine(q.t(), G)
    gs_kn = gs.t().contiguous()
    nwd = rotating(lambda: words.clone(), n * k // 2)
    op = register()
    res["op_err"] = rel_err(op(x, words, gs_kn, None, b, G), ref)
    res["op"] = bench(lambda: op(x, nwd(), gs_kn, None, b, G))
    nwb = rotating(lambda: wb.clone(), n * k // 2)
    for c in CFGS:
        name = cfg_name(c)
        try:
            res[f"err:{name}"] = rel_err(run(x, wb, gs, b, c), ref)
            res[name] = bench(lambda c=c: run(x, nwb(), gs, b, c)) if res[f"err:{name}"] < 2e-2 else float("nan")
        except Exception as e:  # noqa: BLE001  (a probe reports every configuration it can)
            res[name] = float("nan")
            print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    timed = {c: t for c, t in res.items() if c in {cfg_name(cc) for cc in CFGS} and t == t}
    best = min(timed, key=timed.get) if timed else None
    print(f"{k}x{n} M={m}: bf16 {res['bf16']:.1f} op {res['op']:.1f} ({res['bf16'] / res['op']:.2f}x, err "
          f"{res['op_err']:.1e}) | int8-mma best {best} "
          + (f"{timed[best]:.1f} ({res['bf16'] / timed[best]:.2f}x, err {res['err:' + best]:.1e})" if best else "-")
          + " | " + " ".join(f"{c}:{t:.1f}" for c, t in timed.items()), flush=True)
    return res


def main():
    if "--check-cpu" in sys.argv:
        return check_cpu()
    if "--sass" in sys.argv:
        return sass()
    sys.path.insert(0, os.path.dirname(__file__))
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from gpu_timing import MODE, SHAPES
    from probe_util import run_grid

    MODE["graph"] = True
    run_grid(part, SHAPES, (1, 16), "int4_int8_mma_probe.json")


if __name__ == "__main__":
    main()
