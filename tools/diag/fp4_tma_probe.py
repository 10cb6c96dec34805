"""Diagnostic (H200): the FP4 tile kernel (`fp4_gemm/kernel.py`) with the weight words and x loaded through TMA
tensor descriptors, next to the shipped tile and cuBLAS bf16 (kernel alone, no bias, CUDA-graph replay, rotating
weights; every configuration checked against float64 first). Not part of the product.

Why: the INT4 one-dot kernel ran 1.2-1.3x faster with TMA loads on the wide layers at 16-64 rows
(tools/diag/int4_tma_probe.py, twenty-second session), although its instruction count did not fall: the copies hide
latency. The FP4 tile kernel streams its weight the same way (cp.async of [BLOCK_N, BLOCK_K / 8] words), and FP4
is 0.5-0.8x the INT4 op at those rows (issue 5 asks for within 10%). Only the words and x go through TMA: a tile's
block scales are [BLOCK_N, BLOCK_K / 16] bytes, 8 bytes a row, under TMA's 16-byte minimum box row.

Descriptor kinds as in the INT4 probe (`int4_tma_probe.KINDS`): made on the host (cannot go into an engine: torch
does not trace them), by each program (`tl.make_tensor_descriptor`), or once by each of a few persistent programs
per SM that loop over the tiles. Scope: NVFP4 or MXFP4 weights, 16-bit x, K a multiple of 128, fp32 output.

    OUT=... python3 tools/diag/fp4_tma_probe.py [--formats nvfp4 mxfp4] [--shapes KxN ...] [--ms 16 64 100]
                                                [--descriptors host device persistent] [--stages 3 4]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from qcompile.plugins.fp4_gemm import kernel as fp4  # noqa: E402
from qcompile.plugins.fp4_gemm.kernel import _e2m1_tile, _scale_multiplier  # noqa: E402
from qcompile.plugins.gemm_dispatch import cdiv  # noqa: E402
from qcompile.plugins.triton_tiles import store_tile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int4_gemv_pairs_probe import against_shipped, best_of_each, weight_sets  # noqa: E402
from int4_tma_probe import KINDS  # noqa: E402

BLOCK_K = fp4.BLOCK_K


@triton.jit
def _fp4_tma_tile(x_desc, w_desc, s_ptr, g_ptr, y_ptr, M, N, K, n0, k_lo, m0, K_STEPS: tl.constexpr,
                  MX: tl.constexpr, B: tl.constexpr, SHIFT: tl.constexpr, POW_SHIFT: tl.constexpr,
                  POW_ACC: tl.constexpr, HAS_GLOBAL: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] (or its split-K part) = x @ W.T on the tile at columns n0, rows m0, K from k_lo, swapped operands
    as the shipped tile; x_desc: x [M, K] in [BLOCK_M, BLOCK_K] boxes; w_desc: the words [N, K/8] in
    [BLOCK_N, BLOCK_K/8] boxes (zero fill past N and K); the scales through pointers."""
    DT: tl.constexpr = x_desc.dtype
    KB: tl.constexpr = BLOCK_K // B
    offs_n = n0 + tl.arange(0, BLOCK_N)
    s_rows = s_ptr.to(tl.pointer_type(tl.uint8)) + offs_n.to(tl.int64)[:, None] * (K // B) + tl.arange(0, KB)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K_STEPS):  # steps past K (the last split's) load zeros
        k0 = k_lo + step * BLOCK_K
        words = w_desc.load([n0, k0 // 8]).to(tl.uint32, bitcast=True)
        bits = tl.load(s_rows + k0 // B, mask=(offs_n < N)[:, None] & (k0 // B + tl.arange(0, KB) < K // B)[None, :],
                       other=0)
        mult = _scale_multiplier(bits, MX, SHIFT, POW_SHIFT).to(DT)
        w = tl.reshape(_e2m1_tile(tl.reshape(words, (BLOCK_N, KB, B // 8)), tl.reshape(mult, (BLOCK_N, KB, 1))),
                       (BLOCK_N, BLOCK_K))
        acc = tl.dot(w, tl.trans(x_desc.load([m0, k0])), acc)
    acc = acc * POW_ACC
    if HAS_GLOBAL:
        acc = acc * tl.load(g_ptr)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    store_tile(y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], acc,
               (offs_m < M)[None, :] & (offs_n < N)[:, None], ATOMIC)


@triton.jit(do_not_specialize=["M"])
def _fp4_tma_kernel(x_src, w_src, s_ptr, g_ptr, y_ptr, M, N, K, stride_xm, k_per_split, TILES_N, SPLITS, TILES,
                    K_STEPS: tl.constexpr, MX: tl.constexpr, B: tl.constexpr, SHIFT: tl.constexpr,
                    POW_SHIFT: tl.constexpr, POW_ACC: tl.constexpr, HAS_GLOBAL: tl.constexpr, ATOMIC: tl.constexpr,
                    HOST: tl.constexpr, PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """HOST: x_src, w_src are descriptors made on the host; else pointers, and the program makes the descriptors.
    PERSISTENT: the program takes every num_programs-th of the TILES tiles (N tile fastest, then K split, then M
    tile); else the grid is (N tiles, K splits, M tiles)."""
    if HOST:
        x_desc = x_src
        w_desc = w_src
    else:
        x_desc = tl.make_tensor_descriptor(x_src, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_src.to(tl.pointer_type(tl.int32)), shape=[N, K // 8], strides=[K // 8, 1],
                                           block_shape=[BLOCK_N, BLOCK_K // 8])
    if PERSISTENT:
        t = tl.program_id(0)
        while t < TILES:
            rest = t // TILES_N
            _fp4_tma_tile(x_desc, w_desc, s_ptr, g_ptr, y_ptr, M, N, K, (t % TILES_N) * BLOCK_N,
                          (rest % SPLITS) * k_per_split, (rest // SPLITS) * BLOCK_M, K_STEPS, MX, B, SHIFT, POW_SHIFT,
                          POW_ACC, HAS_GLOBAL, ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K)
            t += tl.num_programs(0)
    else:
        _fp4_tma_tile(x_desc, w_desc, s_ptr, g_ptr, y_ptr, M, N, K, tl.program_id(0) * BLOCK_N,
                      tl.program_id(1) * k_per_split, tl.program_id(2) * BLOCK_M, K_STEPS, MX, B, SHIFT, POW_SHIFT,
                      POW_ACC, HAS_GLOBAL, ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K)


def launch(x2d, w_packed, w_scale, w_global, block_size: int, cfg: dict, num_sms: int = 132) -> torch.Tensor:
    """fp32 `x2d @ W.T` [M, N] through `_fp4_tma_kernel`; cfg: the shipped tile's keys (BLOCK_M, BLOCK_N,
    num_warps, num_stages, sms_per_tile: the split-K target) and a kind's (`KINDS`: device, persistent)."""
    m, k = x2d.shape
    n = w_packed.shape[0]
    if x2d.dtype not in (torch.float16, torch.bfloat16) or k % BLOCK_K:
        raise ValueError(f"FP4 TMA probe: needs fp16/bf16 x and K a multiple of {BLOCK_K} (got {x2d.dtype}, K = {k})")
    split = fp4.gemm_config(k, n, cfg, num_sms)
    y = (torch.zeros if split["split_k"] > 1 else torch.empty)((m, n), dtype=torch.float32, device=x2d.device)
    grid = (split["n_tiles"], split["split_k"], cdiv(m, cfg["BLOCK_M"]))
    tiles = grid[0] * grid[1] * grid[2]
    host = not (cfg.get("device") or cfg.get("persistent"))
    if host:
        x_src = TensorDescriptor.from_tensor(x2d, [cfg["BLOCK_M"], BLOCK_K])
        w_src = TensorDescriptor.from_tensor(w_packed.view(torch.int32), [split["BLOCK_N"], BLOCK_K // 8])
    else:
        x_src, w_src = x2d, w_packed
    if cfg.get("persistent"):
        grid = (min(tiles, num_sms * cfg["persistent"]),)
    _fp4_tma_kernel[grid](
        x_src, w_src, w_scale, w_global if w_global is not None else w_scale, y, m, n, k, x2d.stride(0),
        split["k_per_split"], split["n_tiles"], split["split_k"], tiles,
        K_STEPS=split["k_per_split"] // BLOCK_K, ATOMIC=split["split_k"] > 1, HOST=host,
        PERSISTENT=bool(cfg.get("persistent")), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=split["BLOCK_N"], BLOCK_K=BLOCK_K,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **fp4._format_args(w_scale, w_global, block_size, x2d.dtype))
    return y


def shipped(m: int) -> dict:
    """The tile configuration the FP4 op runs at m rows (2-128; M = 1 runs the GEMV)."""
    if not 1 < m < fp4.LARGE_M_MIN:
        raise SystemExit(f"fp4_tma_probe: M = {m} does not run the FP4 tile kernel; pick --ms between 2 and 128")
    return fp4.SMALL if m <= fp4.SMALL_M_MAX else fp4.MID if m <= fp4.MID_M_MAX else fp4.WIDE


def configs(m: int, kinds, stages):
    """The shipped tile with 64- or 128-wide N tiles, `stages`, split-K targets of 1 and 2 SMs per N tile, for
    each descriptor kind."""
    ship = shipped(m)
    for kind, bn, st, spt in itertools.product(kinds, (64, 128), stages, (1, 2)):
        yield (f"{kind} {ship['BLOCK_M']}x{bn} s{st} spt{spt}",
               dict(ship, BLOCK_N=bn, num_stages=st, sms_per_tile=spt, **KINDS[kind]))


def cell(fmt: str, k: int, n: int, m: int, kinds, stages) -> dict:
    from bench_fp4_gemm import FP4, make_fp4
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight
    block = FP4[fmt]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    sets = weight_sets(lambda: make_fp4(fmt, k, n), k * n // 2)
    ref = x.double() @ dequantize_weight(*sets[0], block, torch.float64).to(x.device).t()
    res = {"format": fmt, "K": k, "N": n, "M": m}
    ship = shipped(m)
    timed = against_shipped(x, sets, ref, lambda w, s, g: fp4.launch_gemm(x, w, s, g, None, block, ship),
                            configs(m, kinds, stages), lambda w, s, g, cfg: launch(x, w, s, g, block, cfg), res,
                            "shipped tile")
    line = f"{fmt} {k}x{n} M={m}: bf16 {res['cublas bf16']:.1f} | shipped tile {res['shipped tile']:.1f}"
    line += best_of_each(timed, [kind + " " for kind in kinds], res["shipped tile"])
    if not timed:
        line += " | no TMA configuration ran: " + str(next(v for c, v in res.items() if c.split(" ")[0] in KINDS))
    print(line, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="*", default=["nvfp4"], choices=["nvfp4", "mxfp4"])
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x14336", "14336x4096", "8192x28672"])
    ap.add_argument("--ms", type=int, nargs="*", default=[16, 64, 100])
    ap.add_argument("--descriptors", nargs="*", choices=sorted(KINDS), default=["device", "persistent"])
    ap.add_argument("--stages", type=int, nargs="*", default=[3, 4])
    args = ap.parse_args()
    from gpu_timing import MODE
    MODE["graph"] = True
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = [cell(fmt, int(s.split("x")[0]), int(s.split("x")[1]), m, args.descriptors, args.stages)
            for fmt in args.formats for s in args.shapes for m in args.ms]
    out = os.path.join(os.environ.get("OUT", "."), "fp4_tma_probe.json")
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
