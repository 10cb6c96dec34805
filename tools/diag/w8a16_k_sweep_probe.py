"""Where does the W8A16 op's time go on the small layers: a fixed cost per call, or the rate it streams the weight?
N = 4096 and K from 512 to 14336, cold (a different copy of the weight each call), at M = 1 and 16: the shipped
op, cuBLAS bf16 (`F.linear`) on the same layer, and a plain Triton read of the int8 bytes (`stream_floor_probe`).
A least-squares line through each series gives its fixed µs (the intercept) and the TB/s of its slope. If the op's
fixed cost is above cuBLAS's, the 1.7x target at 4096 x 4096 is lost in the prologue / epilogue (pipeline fill,
tail); if its slope is, in the streaming. Then, on 4096 x 4096, the 16-row tile (`kernel.DOT`, forced) at 1, 4, 8
and 16 rows of bf16 and fp16 x: the rows past M are masked, so x's bytes grow with M while the instructions stay
(294 a step in bf16, 332 in fp16: `tools/diag/sass_count.py w8a16_row_dot_plain --dtype fp16`). A time that grows
with M says x's reads (every program reads all of x: as many bytes as the weight at 16 rows) bound the tile; one
that follows the dtype says its instructions do. µs per call replayed from a CUDA graph.

    python3 tools/diag/w8a16_k_sweep_probe.py   # on the GPU (STEPS=diag DIAG=tools/diag/w8a16_k_sweep_probe.py)

Not part of the product.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from gemv_l2_probe import COLD_BYTES, per_call_us  # noqa: E402
from probe_util import run_part, save  # noqa: E402
from stream_floor_probe import stream  # noqa: E402

N = 4096
KS = (512, 1024, 2048, 4096, 8192, 14336)
MS = (1, 16)


def fit(ks, us, bytes_per_k: int) -> dict:
    """The least-squares line us = fixed + K * slope: fixed µs and the slope as TB/s of `bytes_per_k` per K."""
    n = len(ks)
    mk, mu = sum(ks) / n, sum(us) / n
    slope = sum((k - mk) * (u - mu) for k, u in zip(ks, us)) / sum((k - mk) ** 2 for k in ks)
    return {"fixed_us": mu - slope * mk, "TBps": bytes_per_k / slope / 1e6}


def cold_int8(k: int, gen: torch.Generator) -> tuple[list, torch.Tensor]:
    """(copies of a random int8 [N, K] weight filling COLD_BYTES, so each call reads a cold one; its scales)."""
    q = [torch.randint(-127, 128, (N, k), dtype=torch.int8, device="cuda", generator=gen)
         for _ in range(max(2, -(-COLD_BYTES // (N * k))))]
    return q, torch.rand(N, device="cuda", generator=gen) * 0.01 + 0.001


def rel_err(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> float:
    """max |y - x @ (q * scale)^T| over the reference's max, the reference in float64."""
    ref = x.double() @ (q.double() * scale.double()[:, None]).t()
    return float((y.double() - ref).abs().max() / ref.abs().max())


def layer(k: int, m: int) -> dict:
    """µs per call at K x N, M rows: the op, cuBLAS bf16, and the plain read of the int8 weight (cold)."""
    from qcompile.plugins.int8_wo_gemm import register

    op = register()
    gen = torch.Generator(device="cuda").manual_seed(k + m)
    q, scale = cold_int8(k, gen)
    w = [torch.randn(N, k, device="cuda", dtype=torch.bfloat16, generator=gen)
         for _ in range(max(2, -(-COLD_BYTES // (2 * N * k))))]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    sink = torch.empty(N * k // 4 // 4096 + 1, dtype=torch.int32, device="cuda")
    err = rel_err(op(x, q[0], scale, None), x, q[0], scale)
    out = {"rel_err": err,
           "w8a16": per_call_us([lambda t=t: op(x, t, scale, None) for t in q]),
           "bf16": per_call_us([lambda t=t: F.linear(x, t) for t in w]),
           "read_int8": per_call_us([lambda t=t: stream(t.view(torch.int32).view(-1), 4096, 8, sink) for t in q])}
    print(f"K={k} M={m}: " + "  ".join(f"{key} {v:.3g}" for key, v in out.items()), flush=True)
    if err > 2e-2:
        raise AssertionError(f"K={k} M={m}: the op is off the float64 reference by {err:.3g}")
    return out


def dot_rows(k: int = 4096) -> dict:
    """µs per call of `kernel.launch_dot` (DOT) on K x N at 1, 4, 8 and 16 rows of bf16 and fp16 x (cold)."""
    from qcompile.plugins.int8_wo_gemm import kernel

    gen = torch.Generator(device="cuda").manual_seed(k)
    q, scale = cold_int8(k, gen)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        for m in (1, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            err = rel_err(kernel.launch_dot(x, q[0], scale, None), x, q[0], scale)
            if err > 2e-2:
                raise AssertionError(f"DOT at M={m} {dtype}: off the float64 reference by {err:.3g}")
            key = f"dot {str(dtype).split('.')[-1]} M={m}"
            out[key] = per_call_us([lambda t=t: kernel.launch_dot(x, t, scale, None) for t in q])
            print(f"{k}x{N} {key}: {out[key]:.2f} µs", flush=True)
    return out


def main() -> None:
    results: dict = {"device": torch.cuda.get_device_name(), "N": N}
    run_part(results, "dot rows 4096", dot_rows)
    save(results, "w8a16_k_sweep_probe.json")
    for m in MS:
        for k in KS:
            run_part(results, f"K={k} M={m}", layer, k, m)
            save(results, "w8a16_k_sweep_probe.json")
    for m in MS:
        cells = [(k, results.get(f"K={k} M={m}")) for k in KS]
        ks = [k for k, c in cells if c]
        if len(ks) < 3:
            continue
        for series, per_k in (("w8a16", N), ("bf16", 2 * N), ("read_int8", N)):
            line = fit(ks, [results[f"K={k} M={m}"][series] for k in ks], per_k)
            results[f"fit M={m} {series}"] = line
            print(f"M={m} {series:9s}: fixed {line['fixed_us']:.2f} µs, slope {line['TBps']:.2f} TB/s of its weight",
                  flush=True)
    save(results, "w8a16_k_sweep_probe.json")


if __name__ == "__main__":
    main()
