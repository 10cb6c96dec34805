#!/usr/bin/env python3
"""GPU benchmark of the weight dequantization kernels behind the large-M paths of the INT4 and FP4 ops
(dequantize to the activations' type, then cuBLAS), for the issue-4/5 targets at M >= 1024 (>= 0.95x bf16).

For each K x N of reference/kernel-targets.md it times side by side (CUDA-graph replay with --cuda-graph):
  - each candidate tile of `int4_gemm.kernel._int4_dequant_kernel` (symmetric g128, bf16 out) and of
    `fp4_gemm.kernel._fp4_dequant_kernel` (NVFP4 and MXFP4, bf16 out), first checked bit-exact against the
    plain-torch reference dequantization; with the byte rate (weight + scales read, bf16 written);
  - at each M of --ms: cuBLAS bf16 `x @ w` and each format's dequantize + cuBLAS with its fastest tile;
  - with --chunk-n C ...: each format also in chunks of C output columns (`chunked`): each chunk dequantized and
    multiplied before the next, so the bf16 chunk (C x K x 2 bytes: 32 MiB for 2048 x 8192) can still be in the
    50 MB L2 when cuBLAS reads it, and the next chunk's dequantization overwrites the same memory (the allocator
    hands the freed chunk back) instead of writing all of W out to HBM. At M = 1024 the whole-W dequantization was
    about a fifth of the time (8192 x 28672: 166 of 863 µs, BENCHMARKS.md's dequantize table under "Kernels: INT4
    W4A16 g128 and FP4"), the gap to the 0.95x target.
Writes every measurement as JSON and prints one line per shape and M.

    LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) python3 tools/bench_dequant.py --cuda-graph --out d.json \
        [--chunk-n 1024 2048 4096]
"""
from __future__ import annotations

import json

import torch

from bench_fp4_gemm import FP4, GROUP, make_fp4, make_int4
from gpu_timing import bench, bench_parser, rotating, save_rows, set_mode

from qcompile.plugins.fp4_gemm import kernel as fp4_kernel
from qcompile.plugins.fp4_gemm.reference import dequantize_weight as fp4_reference
from qcompile.plugins.int4_gemm import kernel as int4_kernel
from qcompile.plugins.int4_gemm.reference import dequantize_weight as int4_reference

INT4_TILES = [dict(BLOCK_KW=kw, BLOCK_N=bn, num_warps=w)
              for kw, bn, w in ((8, 256, 4), (16, 256, 8), (4, 512, 4), (8, 512, 8), (16, 128, 4), (4, 256, 2),
                                (2, 1024, 4))]
FP4_TILES = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
             for bn, bk, w in ((64, 128, 4), (32, 256, 4), (64, 256, 8), (128, 128, 8), (16, 512, 4), (32, 128, 2))]


def time_tiles(name, tiles, launch, ref, n_bytes) -> dict:
    """{tile json: {"us", "TB/s"} or {"error"}} for each tile (launch(tile) -> bf16 weight)."""
    out = {}
    for tile in tiles:
        key = json.dumps(tile)
        try:
            exact = torch.equal(launch(tile), ref)
            us = bench(lambda: launch(tile), copies=4)
            out[key] = {"us": us, "TB/s": n_bytes / us / 1e6, "bit_exact": exact}
        except Exception as exc:  # a tile Triton cannot compile
            out[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    print(f"  {name}: " + ", ".join(f"{k} {v.get('us', float('nan')):.1f}" for k, v in out.items())
          + f" | best {best_tile(out)}", flush=True)
    return out


def best_tile(res: dict) -> dict | None:
    """The fastest tile of `time_tiles`' results (None when every tile failed)."""
    ok = {k: v for k, v in res.items() if "us" in v}
    return json.loads(min(ok, key=lambda k: ok[k]["us"])) if ok else None


def chunked(x, n: int, chunk: int, weight_kn) -> torch.Tensor:
    """`x @ W` [M, N] in x's dtype, W [K, N] dequantized and multiplied `chunk` columns at a time (`weight_kn(cols)`:
    those columns of W, [K, c] or a view; each product written into its columns of y: cuBLAS writes a column slice
    of a row-major output in place)."""
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, chunk):
        cols = slice(n0, min(n0 + chunk, n))
        torch.mm(x, weight_kn(cols), out=y[:, cols])
    return y


def chunked_fp4(x, w_packed, w_scale, w_global, block: int, tile: dict | None, chunk: int) -> torch.Tensor:
    """`chunked` for an FP4 weight (rows of W^T [N, K/2]: a chunk is a row slice)."""
    return chunked(x, w_packed.shape[0], chunk, lambda cols: fp4_kernel.launch_dequant(
        w_packed[cols], w_scale[cols], w_global, block, x.dtype, cfg=tile).t())


def chunked_int4(x, w_packed, w_scale, tile: dict | None, chunk: int) -> torch.Tensor:
    """`chunked` for a symmetric INT4 weight (words [K/8, N]: a chunk is a column slice of words and scales)."""
    return chunked(x, w_packed.shape[1], chunk, lambda cols: int4_kernel.launch_dequant(
        w_packed[:, cols], w_scale[:, cols], None, GROUP, x.dtype, cfg=tile))


def time_chunks(g: dict, name: str, whole: torch.Tensor, run_chunked, chunks) -> list[str]:
    """Into g, for each chunk width c: `run_chunked(c)`'s relative L2 error against `whole` (float32) and its time;
    returns the timed names."""
    names = []
    for c in chunks:
        g[f"{name} chunk {c} rel_err"] = float((run_chunked(c).float() - whole).norm() / whole.norm())
        g[f"{name} chunk {c}"] = bench(lambda: run_chunked(c))
        names.append(f"{name} chunk {c}")
    return names


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--chunk-n", type=int, nargs="*", default=[], help="also dequantize + cuBLAS in chunks of "
                    "this many output columns")
    ap.set_defaults(ms=[1024, 4096])
    args = ap.parse_args()
    set_mode(args)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        print(f"{k}x{n}", flush=True)
        row = {"K": k, "N": n, "dequant": {}, "gemm": []}
        written = k * n * 2
        base4 = make_int4(k, n)
        w4 = rotating(lambda: tuple(t.clone() for t in base4), k * n // 2)  # equal copies at different addresses
        wp, sc = base4
        ref = int4_reference(wp, sc, None, GROUP).to(torch.bfloat16)
        row["dequant"]["int4"] = time_tiles("int4", INT4_TILES, lambda t: int4_kernel.launch_dequant(
            *w4(), None, GROUP, torch.bfloat16, cfg=t), ref, k * n // 2 + k // GROUP * n * 2 + written)
        fp4 = {}
        for fmt, block in FP4.items():
            w = make_fp4(fmt, k, n)
            fp4[fmt] = rotating(lambda: tuple(t.clone() if t is not None else None for t in w), k * n // 2)
            ref = fp4_reference(*w, block).to(torch.bfloat16)
            row["dequant"][fmt] = time_tiles(fmt, FP4_TILES, lambda t: fp4_kernel.launch_dequant(
                *fp4[fmt](), block, torch.bfloat16, cfg=t), ref, k * n // 2 + k // block * n + written)
        del ref
        w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=torch.bfloat16), k * n * 2)
        t4 = best_tile(row["dequant"]["int4"])
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            g = {"M": m, "bf16": bench(lambda: x @ w16())}
            g["int4"] = bench(lambda: x @ int4_kernel.launch_dequant(*w4(), None, GROUP, torch.bfloat16, cfg=t4))
            names = ["int4"]
            if args.chunk_n:
                names += time_chunks(g, "int4", x.float() @ int4_reference(*w4(), None, GROUP).float(),
                                     lambda c: chunked_int4(x, *w4(), t4, c), args.chunk_n)
            for fmt, block in FP4.items():
                tf = best_tile(row["dequant"][fmt])
                g[fmt] = bench(lambda: x @ fp4_kernel.launch_dequant(*fp4[fmt](), block, torch.bfloat16, cfg=tf).t())
                names.append(fmt)
                if args.chunk_n:
                    names += time_chunks(g, fmt, x.float() @ fp4_reference(*fp4[fmt](), block).t(),
                                         lambda c: chunked_fp4(x, *fp4[fmt](), block, tf, c), args.chunk_n)
            row["gemm"].append(g)
            print(f"  M={m}: bf16 {g['bf16']:.1f} | " + " | ".join(
                f"{f} {g[f]:.1f} ({g['bf16'] / g[f]:.2f}x)" for f in names), flush=True)
        rows.append(row)
        w4 = fp4 = w16 = base4 = w = None  # free this shape's weights before the next (a `del` here reads as
        # undefined names to pyflakes, in the lambdas above)
        save_rows(args.out, rows)


if __name__ == "__main__":
    main()
