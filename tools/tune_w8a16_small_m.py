#!/usr/bin/env python3
"""Choose the small-M paths of the W8A16 op on the GPU (`int8_wo_gemm.kernel.GEMV` and the split-K tiles).

For every (K x N, M) it times side by side, as an engine calls them (CUDA graphs with --cuda-graph; the split-K
zero fill and the scale/bias/cast epilogue included): cuBLAS bf16; the shipped split-K kernel; the split-K kernel
in other tile configurations; at M = 1 the GEMV kernel in several configurations. Each candidate is checked against
a float32 reference first (relative L2 error). Writes every measurement as JSON and prints the best per cell.

    python3 tools/tune_w8a16_small_m.py --cuda-graph --out tune.json [--shapes 8192x28672] [--ms 1 16]
"""
from __future__ import annotations

import json
import multiprocessing as mp

import torch

from gpu_timing import MODE, bench, bench_parser, rotating
from tune_fp8_block_w8a16 import best

from qcompile.plugins.int8_wo_gemm import kernel as w8

# second sweep: the first (benchmarks/tune_w8a16_small_m_v1.json) had its best GEMVs at its smallest tiles and
# waves (BLOCK_K 16, BLOCK_NW 64, waves 8, the prefetch on)
GEMV_CONFIGS = [dict(BLOCK_K=bk, BLOCK_NW=bn, num_warps=w, waves=v, PREFETCH=True)
                for bk in (16, 32) for bn in (16, 32, 64) for w in (1, 2, 4) for v in (2, 4, 8)]
TILE_CONFIGS = [dict(kernel="tiles", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, waves=v)
                for bn in (64, 128) for bk in (128, 256) for st in (3, 4) for v in (2, 4)]


def candidates(x, weights, m: int) -> dict:
    """weights() -> (w_q, w_scale) of the next rotating copy; each candidate returns the op's output."""
    def epilogue(acc, w_scale):
        return w8._epilogue(acc, w_scale, None, x.dtype)

    def split_k():
        w_q, w_scale = weights()
        return epilogue(w8.launch_small_m(x, w_q), w_scale)

    def tiles(cfg):
        def run():
            w_q, w_scale = weights()
            return epilogue(w8.launch_tiles(x, w_q, cfg), w_scale)
        return run

    def gemv(cfg):
        def run():
            w_q, w_scale = weights()
            return epilogue(w8.launch_gemv(x, w_q, cfg), w_scale)
        return run

    out = {"splitk": split_k}
    out.update({"tiles " + json.dumps(c): tiles(c) for c in TILE_CONFIGS})
    if m == 1:
        out.update({"gemv " + json.dumps(c): gemv(c) for c in GEMV_CONFIGS})
    return out


def make_case(k: int, n: int, m: int):
    """(x bf16 [m, k], int8 weight [k, n], scales [n], float32 reference of the op)."""
    g = torch.Generator(device="cuda").manual_seed(k + n + m)
    w_q = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-3
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    return x, w_q, w_scale, x.float() @ (w_q.float() * w_scale)


def check_chunk(task):
    """Worker: compile and check candidates `names` of one (K, N, M) cell; {name: rel_err or message}."""
    k, n, m, names = task
    x, w_q, w_scale, ref = make_case(k, n, m)
    cands = candidates(x, lambda: (w_q, w_scale), m)
    out = {}
    for name in names:
        try:
            y = cands[name]().float()
            out[name] = ((y - ref).norm() / ref.norm()).item()
        except Exception as exc:  # a configuration Triton cannot compile (e.g. out of registers)
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    torch.cuda.synchronize()
    return out


def check_all(cells, workers: int) -> dict:
    """{(k, n, m): {name: rel_err or message}}, compiled in `workers` processes (Triton's cache then serves
    the timing process)."""
    tasks = []
    for k, n, m in cells:
        names = list(candidates(torch.empty(m, k, dtype=torch.bfloat16), lambda: None, m))
        tasks += [(k, n, m, names[i::3]) for i in range(3)]
    with mp.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(check_chunk, tasks, chunksize=1)
    out = {}
    for (k, n, m, _), part in zip(tasks, parts):
        out.setdefault((k, n, m), {}).update(part)
    return out


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=12)
    ap.set_defaults(ms=[1, 16])
    args = ap.parse_args()
    MODE["graph"] = args.cuda_graph
    cells = [(int(s.split("x")[0]), int(s.split("x")[1]), m) for s in args.shapes for m in args.ms]
    checked = check_all(cells, args.workers)
    print("compiled and checked", sum(len(v) for v in checked.values()), "candidates", flush=True)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w_q = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
        w_scale = torch.rand(n, device="cuda") * 0.01 + 1e-3
        w16 = (w_q.float() * w_scale).to(torch.bfloat16)
        # equal copies at different addresses, rotated so small M reads HBM, not L2
        copies = rotating(lambda: (w16.clone(), w_q.clone(), w_scale.clone()), k * n * 3)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"K": k, "N": n, "M": m, "bf16": bench(lambda: x @ copies()[0], copies=4), "w8a16": {}}
            for name, fn in candidates(x, lambda: copies()[1:], m).items():
                err = checked[(k, n, m)][name]
                row["w8a16"][name] = {"rel_err": err} if isinstance(err, float) else {"error": err}
                if isinstance(err, float) and err < 2e-2:
                    row["w8a16"][name]["us"] = bench(fn, copies=4, rep=40)
            rows.append(row)
            name, us = best(row["w8a16"])
            shipped = row["w8a16"]["splitk"].get("us", float("nan"))
            gemv = best({key: v for key, v in row["w8a16"].items() if key.startswith("gemv")}) if m == 1 else ("-", 0)
            print(f"{k}x{n} M={m}: bf16 {row['bf16']:.1f} | best {us:.1f} ({row['bf16'] / us:.2f}x) {name} | "
                  f"splitk {shipped:.1f}"
                  + (f" | best gemv {gemv[1]:.1f} {gemv[0]}" if m == 1 else ""), flush=True)
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f,
                          indent=1)
        del copies
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
