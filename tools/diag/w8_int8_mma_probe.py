"""Diagnostic (H200): can W8A16 at M <= 16 run on the INT8 tensor cores, with the activations split exactly enough?

Idea: per row of x and per CHUNK of K, a scale s = amax / 32639 turns x into q = round(x / s), |q| <= 32639,
and q = 256 * hi + lo with hi, lo int8. Then x . w = s * (256 * (hi . w) + lo . w): two int8 dot products
with exact int32 sums, so the int8 weight feeds the tensor cores as it is (no int8 -> bf16 conversion in
registers, which the shipped kernels pay per weight). The only new error is q's rounding: at most
amax(chunk) / 65278 per element, against bf16 rounding of the output (2^-9 relative).

Parts (µs per call replayed from a CUDA graph, rotating weights so they come from HBM; bf16; bias):
  S. the split kernel alone (x [M, K] -> int8 planes [2 * MP, K] + float32 scales [MP, K / CHUNK]);
  G. the INT8 MMA GEMM alone per configuration, chunk scales (float32 rescale per step) and per-row scales
     (one int32 accumulator over all of K: the cost of the per-step rescale);
  F. M = 1 only: one kernel that splits its x chunk itself (no second launch);
  and side by side: cuBLAS bf16, the shipped op, split + best GEMM.
Every variant is checked against float64 (normal x, and x with outlier channels) before it is timed.
Not part of the product; its chunk-scale path became `plugins/int8_wo_gemm/split_mma.py` (one H200 run recorded in
benchmarks/w8_int8_mma_probe.json). `--check-cpu` runs the checks under TRITON_INTERPRET=1 on small shapes.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tools/
from gpu_timing import MODE, bench, rotating  # noqa: E402
from probe_util import run_part, save  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
Q_MAX = tl.constexpr(32639.0)  # 127 * 256 + 127: hi = (q + 128) >> 8 stays in [-127, 127], lo in [-128, 127]


@triton.jit
def _split_chunk(x, Q: tl.constexpr):
    """x [R, C] float32 -> (hi, lo) int32 [R, C], scale [R] with x ~= scale * (256 hi + lo)."""
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(amax > 0, Q / amax, 0.0)
    q = tl.floor(x * inv[:, None] + 0.5).to(tl.int32)
    hi = (q + 128) >> 8
    return hi, q - hi * 256, amax / Q


@triton.jit
def _split_kernel(x_ptr, a_ptr, s_ptr, M, K, KC, stride_xm, MP: tl.constexpr, CHUNK: tl.constexpr,
                  CHUNKS: tl.constexpr):
    m = tl.program_id(0)
    offs_c = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)
    offs_k = offs_c[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    ok = offs_k < K
    x = tl.load(x_ptr + m * stride_xm + offs_k, mask=ok, other=0.0).to(tl.float32)
    hi, lo, s = _split_chunk(x, Q_MAX)
    tl.store(a_ptr + m * K + offs_k, hi.to(tl.int8), mask=ok)
    tl.store(a_ptr + (MP + m) * K + offs_k, lo.to(tl.int8), mask=ok)
    tl.store(s_ptr + m * KC + offs_c, s, mask=offs_c < KC)


@triton.jit
def _mma_kernel(a_ptr, s_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, KC, HAS_BIAS: tl.constexpr,
                ROW_SCALE: tl.constexpr, K_STEPS: tl.constexpr, MP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    R: tl.constexpr = 2 * MP
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    r = tl.arange(0, R)
    mr = r % MP
    valid = mr < M
    fac = tl.where(r < MP, 256.0, 1.0)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    acc_i = tl.zeros((R, BLOCK_N), dtype=tl.int32)
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_STEPS):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = offs_k < K
        a = tl.load(a_ptr + r[:, None] * K + offs_k[None, :], mask=valid[:, None] & ok[None, :], other=0)
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & ok[None, :], other=0,
                    eviction_policy="evict_first")
        if ROW_SCALE:
            acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
        else:
            d = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
            sc = tl.load(s_ptr + mr * KC + step, mask=valid, other=0.0) * fac
            acc += d.to(tl.float32) * sc[:, None]
    if ROW_SCALE:
        acc = acc_i.to(tl.float32) * (tl.load(s_ptr + mr, mask=valid, other=0.0) * fac)[:, None]
    y = tl.sum(tl.reshape(acc, (2, MP, BLOCK_N)), axis=0)
    y = y * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_m = tl.arange(0, MP)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _mma_fused_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, K_STEPS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M = 1: each program splits its x chunk itself (row 0 of the MMA operand = hi, row 1 = lo, 14 zero rows)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    r = tl.arange(0, 16)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_STEPS):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & ok[None, :], other=0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + offs_k, mask=ok, other=0.0).to(tl.float32)
        hi, lo, s = _split_chunk(x[None, :], Q_MAX)
        a = tl.where(r[:, None] == 0, hi, tl.where(r[:, None] == 1, lo, 0)).to(tl.int8)
        d = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        sc = tl.where(r == 0, 256.0, tl.where(r == 1, 1.0, 0.0)) * s
        acc += d.to(tl.float32) * sc[:, None]
    y = tl.sum(acc, axis=0)
    y = y * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def padded_rows(m: int) -> int:
    return max(8, triton.next_power_of_2(m))


def split(x, chunk: int, chunks: int = 8):
    m, k = x.shape
    mp = padded_rows(m)
    kc = triton.cdiv(k, chunk)
    a = torch.empty((2 * mp, k), dtype=torch.int8, device=x.device)
    s = torch.empty((mp, kc), dtype=torch.float32, device=x.device)
    _split_kernel[(m, triton.cdiv(kc, chunks))](x, a, s, m, k, kc, x.stride(0), MP=mp, CHUNK=chunk, CHUNKS=chunks)
    return a, s


def split_rows_torch(x):
    """Per-row scales (the ROW_SCALE variant's input): the same split, one chunk = all of K."""
    m, k = x.shape
    mp = padded_rows(m)
    xf = x.double()
    amax = xf.abs().amax(dim=1, keepdim=True)
    q = torch.floor(xf * torch.where(amax > 0, Q_MAX.value / amax, 0.0) + 0.5).to(torch.int32)
    hi = (q + 128) >> 8
    a = torch.zeros((2 * mp, k), dtype=torch.int8, device=x.device)
    a[:m] = hi.to(torch.int8)
    a[mp:mp + m] = (q - hi * 256).to(torch.int8)
    s = torch.zeros(mp, dtype=torch.float32, device=x.device)
    s[:m] = (amax[:, 0] / Q_MAX.value).float()
    return a, s


def gemm(a, s, w, ws, bias, m, cfg, row_scale=False, out_dtype=torch.bfloat16):
    n, k = w.shape
    mp = a.shape[0] // 2
    y = torch.empty((m, n), dtype=out_dtype, device=w.device)
    kc = 1 if row_scale else s.shape[1]
    _mma_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        a, s, w, ws, bias if bias is not None else ws, y, m, n, k, kc, HAS_BIAS=bias is not None,
        ROW_SCALE=row_scale, K_STEPS=triton.cdiv(k, cfg["BLOCK_K"]), MP=mp, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def fused(x, w, ws, bias, cfg):
    n, k = w.shape
    y = torch.empty((1, n), dtype=x.dtype, device=w.device)
    _mma_fused_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, w, ws, bias if bias is not None else ws, y, n, k, HAS_BIAS=bias is not None,
        K_STEPS=triton.cdiv(k, cfg["BLOCK_K"]), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


GEMM_CFGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st) for bn, bk, wp, st in [
    (32, 128, 4, 6), (32, 256, 4, 4), (64, 128, 4, 6), (64, 256, 4, 4), (16, 256, 4, 6), (128, 128, 4, 4),
    (64, 256, 8, 4)]]
FUSED_CFGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=wp, num_stages=st) for bn, bk, wp, st in [
    (32, 128, 4, 6), (32, 256, 4, 4), (64, 128, 4, 6), (64, 256, 4, 4)]]


def cfg_name(c):
    return f"{c['BLOCK_N']}x{c['BLOCK_K']}w{c['num_warps']}p{c['num_stages']}"


def make_case(k, n, m, dtype, device, outliers=False):
    g = torch.Generator(device="cpu").manual_seed(k * 7 + n + m)
    x = torch.randn(m, k, generator=g)
    if outliers:  # a few channels 100x larger, as in LLM activations
        x[:, torch.randperm(k, generator=g)[:8]] *= 100.0
    x = x.to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    ws = (torch.rand(n, generator=g) * 0.01 + 0.001).to(device=device, dtype=dtype)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    ref = x.double() @ (w.double() * ws.double()[:, None]).t() + bias.double()
    return x, w, ws, bias, ref


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def variants(x, ws, bias, m, chunk_cfgs, fused_cfgs):
    """label -> fn(w) for every variant of this M."""
    out = {}
    for c in chunk_cfgs:
        out[f"split+{cfg_name(c)}"] = lambda w, c=c: gemm(*split(x, c["BLOCK_K"]), w, ws, bias, m, c, out_dtype=x.dtype)
    ar, sr = split_rows_torch(x)
    for c in chunk_cfgs:
        out[f"rows:{cfg_name(c)}"] = lambda w, c=c: gemm(ar, sr, w, ws, bias, m, c, row_scale=True,
                                                          out_dtype=x.dtype)
    if m == 1:
        for c in fused_cfgs:
            out[f"fused:{cfg_name(c)}"] = lambda w, c=c: fused(x, w, ws, bias, c)
    return out


def check(k, n, m, dtype, device, chunk_cfgs, fused_cfgs) -> dict:
    """Relative errors vs float64 of every variant (and of the bf16-dequantized reference), normal and outlier x."""
    errs = {}
    for outliers in (False, True):
        x, w, ws, bias, ref = make_case(k, n, m, dtype, device, outliers)
        tag = "outl" if outliers else "norm"
        deq = torch.nn.functional.linear(x, (w.to(dtype) * ws[:, None]), bias) if device == "cuda" else \
            (x.float() @ (w.float() * ws.float()[:, None]).t() + bias.float()).to(dtype)
        errs[f"{tag}:dequant+linear"] = rel_err(deq, ref)
        for label, fn in variants(x, ws, bias, m, chunk_cfgs, fused_cfgs).items():
            errs[f"{tag}:{label}"] = rel_err(fn(w), ref)
        a, s = split(x, 128)
        mp = a.shape[0] // 2
        recon = (a[:m].double() * 256 + a[mp:mp + m].double()) * s[:m].double().repeat_interleave(128, 1)[:, :k]
        errs[f"{tag}:split_recon_max_rel_to_amax"] = float((recon - x.double()).abs().max() / x.double().abs().max())
    return errs


def part(k, n, m, dtype=torch.bfloat16):
    errs = check(k, n, m, dtype, "cuda", GEMM_CFGS, FUSED_CFGS)
    bad = {c: e for c, e in errs.items() if ":" in c and not c.endswith("to_amax") and e > 3e-3}
    x, w, ws, bias, ref = make_case(k, n, m, dtype, "cuda")
    from qcompile.plugins.int8_wo_gemm.op import int8_weight_only_gemm
    res = {"errors": errs}
    nbf = rotating(lambda: torch.randn(n, k, device="cuda", dtype=dtype), n * k * 2)
    res["bf16"] = bench(lambda: torch.nn.functional.linear(x, nbf(), bias))
    nw = rotating(lambda: w.clone(), n * k)
    res["op"] = bench(lambda: int8_weight_only_gemm(x, nw(), ws, bias))
    for chunk in (128, 256):
        res[f"split{chunk}"] = bench(lambda chunk=chunk: split(x, chunk))
    for label, fn in variants(x, ws, bias, m, GEMM_CFGS, FUSED_CFGS).items():
        if any(c.endswith(label) for c in bad):
            res[label] = float("nan")
            continue
        res[label] = bench(lambda fn=fn: fn(nw()))
    for c in GEMM_CFGS:  # the GEMM alone (planes made once)
        a, s = split(x, c["BLOCK_K"])
        res[f"gemm:{cfg_name(c)}"] = bench(lambda c=c, a=a, s=s: gemm(a, s, nw(), ws, bias, m, c, out_dtype=dtype))
    timed = {c: t for c, t in res.items() if isinstance(t, float) and c not in ("bf16", "op")}
    best_op = min((c for c in timed if c.startswith(("split+", "fused:"))), key=lambda c: timed[c])
    res["best_one_call"] = best_op
    print(f"{k}x{n} M={m}: bf16 {res['bf16']:.1f} op {res['op']:.1f} ({res['bf16'] / res['op']:.2f}x) | new best "
          f"{best_op} {timed[best_op]:.1f} ({res['bf16'] / timed[best_op]:.2f}x) | split128 {res['split128']:.1f} | "
          f"max err {max(e for c, e in errs.items() if not c.endswith('to_amax')):.2e} (dequant+linear "
          f"{errs['norm:dequant+linear']:.2e}/{errs['outl:dequant+linear']:.2e}){' BAD ' + str(bad) if bad else ''}",
          flush=True)
    print("   " + " ".join(f"{c}:{t:.1f}" for c, t in timed.items()), flush=True)
    return res


def check_cpu():
    """Interpreter checks on small shapes (TRITON_INTERPRET=1, CPU tensors)."""
    cfgs = [dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=1)]
    worst = 0.0
    for k, n, m in [(256, 48, 1), (384, 32, 3), (256, 40, 16), (200, 16, 1)]:
        errs = check(k, n, m, torch.float32, "cpu", cfgs, cfgs)
        for c, e in errs.items():
            print(f"{k}x{n} M={m} {c}: {e:.2e}")
            if not c.endswith("dequant+linear"):
                worst = max(worst, e)
    print("worst", worst)
    assert worst < 2e-4, worst


def main():
    if "--check-cpu" in sys.argv:
        return check_cpu()
    MODE["graph"] = True
    results = {}
    for k, n in SHAPES:
        for m in (1, 16):
            run_part(results, f"{k}x{n} M={m}", part, k, n, m)
    save(results, "w8_int8_mma_probe.json")


if __name__ == "__main__":
    main()
