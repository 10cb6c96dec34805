#!/usr/bin/env python3
"""Tune the INT4 GEMM kernels' launch configurations (`kernel.CONFIGS`) on the GPU.

For every (K x N, M) of reference/kernel-targets.md it tries candidate configurations of our kernels
(GEMV, tiled split-K, tiled GEMM, dequantize + cuBLAS; W4A16 bf16 and W4A8 FP8 activations), checks each
against a float32 reference (relative L2 error) and times the correct ones side by side with cuBLAS bf16,
torch's tinygemm and FP8 `_scaled_mm` tensorwise (CUDA graphs, weights rotated). Compilation runs first in
a process pool (the Triton disk cache then serves the timing process). Writes every measurement as JSON
and prints the best configuration per cell and per M bucket.

    python3 tools/tune_int4_gemm.py --out tune.json [--shapes 8192x28672] [--ms 1 16] [--kinds gemv]
    python3 tools/tune_int4_gemm.py --out tma.json --ms 16 64 --kinds one_dot one_dot_tma   # TMA tiles vs pointers
    python3 tools/tune_int4_gemm.py --out gemv.json --ms 1 --kinds gemv --x-dtype fp16   # as engines run the GEMV
"""
from __future__ import annotations

import itertools
import json
import multiprocessing as mp

import torch

from gpu_timing import bench, bench_parser, rotating, set_mode

GROUP = 128
X_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def candidates(m: int, x_dtype: str = "bf16") -> list[dict]:
    """Candidate launch configurations (W4A16, and W4A8 on FP8 dots) for a row count m: the neighbourhood
    of the winners of the first sweep (benchmarks/int4_tune_v2b.json), plus dequantize + cuBLAS, some with the
    output written by the kernel ("finish"), and the configuration the op ships for m (`kernel.CONFIGS`), so every
    sweep times it beside the others."""
    out = []
    if m == 1:  # the fp16x2 GEMV (16-bit x): the shipped tile and deeper tiles that keep its 32 words per
        # thread (more warps along K: fewer split-K programs and atomics), over split-K waves and stages
        for bn, bk, w in [(512, 32, 2), (512, 64, 4), (512, 128, 8), (1024, 64, 8), (256, 64, 2), (256, 128, 4),
                          (1024, 32, 4), (128, 128, 2)]:
            for waves in (16, 32, 64, 128):
                out.append(dict(kernel="gemv", BLOCK_N=bn, MIN_TILES=1, BLOCK_K=bk, num_warps=w, num_stages=3,
                                waves=waves))
        for st in (1, 2, 4):
            out.append(dict(kernel="gemv", BLOCK_N=512, MIN_TILES=1, BLOCK_K=32, num_warps=2, num_stages=st,
                            waves=32))
        if x_dtype == "fp16":  # x's own pairs (what engines run), and the tensor-core GEMV (`mma_gemv`)
            out = [dict(c, x_pairs=True) for c in out]
            out += [dict(kernel="gemv", BLOCK_N=512, MIN_TILES=8, BLOCK_K=32, num_warps=2, num_stages=3, waves=32,
                         mma=dict(warps=w, waves=waves)) for w, waves in itertools.product((2, 4, 8), (8, 16, 32))]
            return out + [shipped_config(m)]
        for (bn, bk, w), pipe, waves in itertools.product([(512, 32, 2), (512, 64, 4), (256, 64, 2)], (2, 3, 4),
                                                          (8, 16, 32)):  # weight tiles through cp.async
            out.append(dict(kernel="gemv", BLOCK_N=bn, MIN_TILES=1, BLOCK_K=bk, num_warps=w, num_stages=3,
                            waves=waves, pipeline=pipe))
    if 1 < m <= 256:  # one MMA per K step on the planar words (plugins/int4_gemm/one_dot.py)
        for bn, scale_w, st, waves in itertools.product((64, 128), (False, True), (3, 4), (1, 2, 4, 8, 16)):
            out.append(dict(kernel="one_dot", BLOCK_M=16 if m <= 16 else 64, BLOCK_N=bn, num_warps=4, num_stages=st,
                            waves=waves, SCALE_W=scale_w))
    if 1 < m <= 64:  # the same kernel loading through TMA on every layer (kind one_dot_tma; `one_dot.use_tma`)
        for bn, scale_w, st, waves, resident in itertools.product((64, 128), (False, "unsplit"), (3, 4), (1, 2, 4, 8),
                                                                  (0, 3) if m > 16 else (0,)):
            out.append(dict(kernel="one_dot", BLOCK_M=16 if m <= 16 else 64, BLOCK_N=bn, num_warps=4, num_stages=st,
                            waves=waves, resident=resident, SCALE_W=scale_w, tma=dict(min_n=0)))
    if 64 < m <= 512:  # the one-dot kernel with wide x tiles (the MMA's N up to 256), against dequantize + cuBLAS
        for bm, bn, w, st, waves, scale_w in itertools.product((128, 256), (64, 128), (4, 8), (2, 3), (1, 2),
                                                               (False, True)):
            out.append(dict(kernel="one_dot", BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, waves=waves,
                            SCALE_W=scale_w))
    if m <= 16:  # mm_t and mm read K sequentially: on planar words (GROUP = 128) x is gathered first
        for bn, bk, w, st, waves in itertools.product((32, 64), (64, 128), (2, 4), (3, 4, 5), (4, 8)):
            out.append(dict(kernel="mm_t", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st,
                            waves=waves, SCALE_ACC=False))
    if 16 < m <= 256:
        for bm, bn, w, st, waves in itertools.product((32, 64), (64, 128), (4, 8), (3, 4), (1, 2)):
            out.append(dict(kernel="mm_t", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=st,
                            waves=waves, SCALE_ACC=False))
    if m >= 256:
        for bm, bn, st in itertools.product((64, 128), (128, 256), (3, 4)):
            out.append(dict(kernel="mm_t", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=8, num_stages=st,
                            waves=0, SCALE_ACC=False))
    if m >= 64:
        out.append(dict(kernel="dequant"))
    # the output written by the kernel (`kernel.finished`: no cast kernel after a split), on the GEMV's first four
    # tiles and the one-dot tiles without the scale on the weight: their best split may differ from the shipped one's
    out += [dict(c, finish=True) for c in out if (c["kernel"] == "gemv" and "pipeline" not in c and c["num_stages"] == 3
                                                  and (c["BLOCK_N"], c["BLOCK_K"]) in ((512, 32), (512, 64), (512, 128),
                                                                                       (1024, 64)))
            or (c["kernel"] == "one_dot" and m <= 16 and not c["SCALE_W"] and "tma" not in c
                and c["num_stages"] == 3)]
    w4a8 = [dict(c, fp8_dot=True) for c in out if c["kernel"] == "mm_t" and c["BLOCK_K"] == 128
            and c["num_stages"] == 3][:6] if m >= 16 else []
    shipped = shipped_config(m)
    return out + w4a8 + ([] if shipped in out else [shipped])


def parse_where(terms: list[str]) -> dict:
    """--where KEY=V1,V2 ... as {KEY: {values}}; values read as Python literals (64, True), else strings."""
    import ast
    out = {}
    for term in terms:
        key, sep, values = term.partition("=")
        if not sep:
            raise SystemExit(f"--where {term!r}: expected KEY=VALUE[,VALUE...], e.g. BLOCK_N=64 SCALE_W=True,False")
        out[key] = set()
        for v in values.split(","):
            try:
                out[key].add(ast.literal_eval(v))
            except (ValueError, SyntaxError):
                out[key].add(v)
    return out


def kind_of(cfg: dict) -> str:
    """The candidate's kind for --kinds: its kernel, with "_tma" when it loads through TMA (a "tma" key)."""
    return cfg["kernel"] + ("_tma" if "tma" in cfg else "")


def matches(cfg: dict, where: dict) -> bool:
    """Whether cfg has one of the allowed values for every --where key it has (keys it lacks do not filter)."""
    return all(cfg[key] in values for key, values in where.items() if key in cfg)


def shipped_config(m: int) -> dict:
    """The launch configuration the op runs at m rows (`kernel.CONFIGS`)."""
    from qcompile.plugins.gemm_dispatch import bucket_for
    from qcompile.plugins.int4_gemm import kernel
    return bucket_for(kernel.CONFIGS, m)


def make_weights(k: int, n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    from qcompile.plugins.int4_gemm.format import to_engine
    q = torch.randint(-8, 8, (k, n), device="cuda", dtype=torch.int8, generator=g)
    scale = (torch.rand(k // GROUP, n, device="cuda", generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    return to_engine(q, GROUP), scale


def quantize_fp8(x):
    """(fp8 x, per-row scales [M]) with one per-tensor scale."""
    s = x.float().abs().amax().clamp(min=1e-12) / 448.0
    return (x.float() / s).to(torch.float8_e4m3fn), s.expand(x.shape[0]).contiguous()


def call(cfg: dict, x, x8, w_packed, scale):
    """One candidate: x bf16 (W4A16) or x8 = (fp8 x, per-row scales) (W4A8, quantized beforehand as an
    engine does in the previous kernel)."""
    from qcompile.plugins.int4_gemm import kernel
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if cfg.get("fp8_dot"):
        return kernel.run_bucket(cfg, x8[0], w_packed, scale, None, None, GROUP, x_row_scale=x8[1],
                                 out_dtype=x.dtype, num_sms=sms)
    return kernel.run_bucket(cfg, x, w_packed, scale, None, None, GROUP, num_sms=sms)


def compile_cell(task):
    """Worker: compile and check every candidate of one (K, N, M) cell; returns [(index, error or message)]."""
    k, n, m, cfgs, x_dtype = task
    from qcompile.plugins.int4_gemm.reference import dequantize_weight
    w_packed, scale = make_weights(k, n)
    x = torch.randn(m, k, device="cuda", dtype=X_DTYPES[x_dtype])
    ref = x.float() @ dequantize_weight(w_packed, scale, None, GROUP)
    x8 = quantize_fp8(x)
    ref8 = (x8[0].float() * x8[1][:, None]) @ dequantize_weight(w_packed, scale, None, GROUP)
    out = []
    for i, cfg in enumerate(cfgs):
        try:
            y = call(cfg, x, x8, w_packed, scale).float()
            r = ref8 if cfg.get("fp8_dot") else ref
            out.append((i, ((y - r).norm() / r.norm()).item()))
        except Exception as exc:  # a configuration Triton cannot compile (e.g. out of shared memory)
            out.append((i, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    torch.cuda.synchronize()
    return out


def baselines(k: int, n: int, m: int, x) -> dict:
    r = {}
    w16 = rotating(lambda: torch.randn(k, n, device="cuda", dtype=x.dtype), k * n * 2)
    r["bf16"] = bench(lambda: x @ w16())  # cuBLAS in x's 16-bit dtype (fp16 with --x-dtype fp16)
    w8 = rotating(lambda: torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn), k * n)
    one = torch.ones((), device="cuda")
    xq = x.to(torch.float8_e4m3fn)
    r["fp8_tensorwise"] = bench(lambda: torch._scaled_mm(xq, w8().t(), one, one, out_dtype=torch.bfloat16))
    try:
        def make_tg():
            w = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
            return (torch._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8), 8),
                    torch.rand(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16))
        tg = rotating(make_tg, k * n // 2)

        def tiny():
            packed, sz = tg()
            return torch._weight_int4pack_mm(x, packed, GROUP, sz)
        r["tinygemm"] = bench(tiny) if m <= 256 else None
    except (RuntimeError, TypeError) as exc:
        r["tinygemm"] = None
        r["tinygemm_error"] = str(exc).splitlines()[0]
    return r


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--kinds", nargs="*", help="only these kinds (gemv, one_dot, one_dot_tma, mm_t, dequant)")
    ap.add_argument("--x-dtype", choices=sorted(X_DTYPES), default="bf16",
                    help="x's dtype; fp16 (what CUDA engines run) times the GEMV on x's own pairs and the MMA GEMV")
    ap.add_argument("--where", nargs="*", default=[], metavar="KEY=V1,V2",
                    help="only candidates with these values, e.g. BLOCK_N=64 num_stages=3 SCALE_W=True,False "
                         "(the shipped configuration is always timed)")
    args = ap.parse_args()
    where = parse_where(args.where)
    args.cuda_graph = True  # always timed from CUDA graphs
    set_mode(args)
    cells = [(int(s.split("x")[0]), int(s.split("x")[1]), m) for s in args.shapes for m in args.ms]
    tasks = []
    for k, n, m in cells:  # the shipped configuration always, the others as --kinds and --where say
        shipped = shipped_config(m)
        tasks.append((k, n, m, [c for c in candidates(m, args.x_dtype) if c == shipped
                                or ((not args.kinds or kind_of(c) in args.kinds) and matches(c, where))],
                      args.x_dtype))
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        checked = pool.map(compile_cell, tasks, chunksize=1)
    print("compiled and checked", sum(len(t[3]) for t in tasks), "configurations", flush=True)
    results = []
    for (k, n, m, cfgs, x_dtype), errs in zip(tasks, checked):
        x = torch.randn(m, k, device="cuda", dtype=X_DTYPES[x_dtype])
        x8 = quantize_fp8(x)
        row = {"K": k, "N": n, "M": m, **baselines(k, n, m, x), "configs": []}
        ws = rotating(lambda: make_weights(k, n), k * n // 2)
        for i, err in errs:
            cfg = cfgs[i]
            entry = {"cfg": cfg, "rel_err": err if isinstance(err, float) else None}
            if isinstance(err, float) and err < (3e-2 if cfg.get("fp8_dot") else 1e-2):
                def fn(cfg=cfg):
                    w_packed, scale = ws()
                    return call(cfg, x, x8, w_packed, scale)
                entry["us"] = bench(fn, rep=40)
            else:
                entry["error"] = err
            row["configs"].append(entry)
        results.append(row)
        best = {}
        for e in row["configs"]:
            kind = "w4a8" if e["cfg"].get("fp8_dot") else "w4a16"
            if "us" in e and (kind not in best or e["us"] < best[kind]["us"]):
                best[kind] = e
        line = f"{k}x{n} M={m}: bf16 {row['bf16']:.1f} fp8 {row['fp8_tensorwise']:.1f} tinygemm {row['tinygemm']}"
        shipped = next((e for e in row["configs"] if e["cfg"] == shipped_config(m)), None)
        if shipped is not None:
            shipped["shipped"] = True  # what the op runs at m rows, marked in the JSON too
            line += f" | shipped {shipped.get('us', shipped.get('error'))}"
        for kind, e in best.items():
            base = row["bf16"] if kind == "w4a16" else row["fp8_tensorwise"]
            line += f" | {kind} {e['us']:.1f} ({base / e['us']:.2f}x) {e['cfg']}"
        print(line, flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": results}, f, indent=1)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
