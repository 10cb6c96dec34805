"""Build engines of one model with several recipes and time them side by side (GPU).

Example (on the GPU machine):
    python tools/bench_engines.py mlp-large --recipes fp16 fp8 int8 --size batch=4,seq=512 \
        --size batch=8,seq=512 --out benchmarks/engines-mlp-large.json

Decode speed of weight-only recipes (M = 1 rows per GEMM; a KV-cache-free decoder step of one token):
    python tools/bench_engines.py llama3-8b-layers --recipes fp16 w4a16_awq --size batch=1,seq=1 \
        --calib-size batch=1,seq=128 --out benchmarks/decode-llama3-8b-layers.json

A recipe may name a variant after a colon, built with the INT4 op's buckets swapped or the FP4 weights as planar
words (`VARIANTS`), so an A/B of kernel tiles or layouts runs in one call beside the shipped engine:
    python tools/bench_engines.py llama3-8b-layers --recipes fp16 w4a16_awq w4a16_awq:int4-pointers ...
    python tools/bench_engines.py llama3-8b-layers --recipes fp16 w4a16_awq w4a16_awq:int4-gemv-finish ...
    python tools/bench_engines.py llama3-8b-layers --recipes fp16 w4a16_nvfp4 w4a16_nvfp4:fp4-bytes ...
The variant fp8-large-m builds with `fp8_large_m=True` (`qcompile build --fp8-large-m`): prefill-sized GEMMs in FP8.
fp8-block-cublas-small-m builds the FP8 block op with its sm90 cuBLASLt path at every M (no Triton row kernel at
1-16 rows). The INT4 and FP4 one-dot buckets of up to 64 rows write y + bias in x's dtype themselves
(`int4_gemm.kernel.finished`, `fp4_gemm.kernel.finished`): no cast kernel after a split-K GEMM. int4-unfinished and
fp4-unfinished build them without (fp32 sums, then a cast), int4-gemv-finish the INT4 GEMV with it too. Those
plugin variants are `tools/kernel_variants.py`'s.
inductor-combo, inductor-persistent (and both), inductor-no-split and inductor-coordesc compile with an Inductor
option or heuristic changed (`combo_kernels=True`; row reductions up to 4096 persistent,
`tools/inductor_variants.py`; `split_reductions=False`; `coordinate_descent_tuning=True`): A/Bs of the non-GEMM
kernels of a decode step (any recipe, fp16 included; `tools/diag/engine_kernels.py` lists them without a GPU).
pdl builds with `pdl=True` (`qcompile build --pdl`): the engine's Inductor kernels launched with programmatic
dependent launch, each free to start while the kernel before it finishes (`qcompile.engine.pdl`).
pow-tensor lowers ONNX Pow with its constant exponent kept a tensor, as qcompile did before it read a 0-d exponent
as a number (Inductor then writes RMSNorm's square as a libdevice pow call instead of x * x).
Variants join with "+": w4a16_awq:pdl+int4-gemv-mma builds with both.

Engines are built once (dynamic dims) and timed at every --size on the same device-resident inputs
with CUDA events (median of --iters runs after warm-up); ratios are relative to the first recipe;
tokens/s counts batch x seq tokens per run.
Also checks each engine's outputs against the FP32 graph (cosine similarity, computed by our lowering
in float64).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch._inductor.config as inductor_config

import qcompile
from qcompile.engine import GraphReplay
from qcompile.frontend import load_source
from qcompile.inputs import parse_dim_sizes
from qcompile.lowering import lower_onnx
from qcompile.report import format_table

from inductor_variants import persistent_reductions_up_to  # tools/, this script's folder
from kernel_variants import KERNEL_VARIANTS, variant_parts

VARIANTS = {  # recipe:variant -> (the build's context, more `qcompile.build` arguments)
    **{name: (factory, {}) for name, factory in KERNEL_VARIANTS.items()},  # the plugins' launch configurations
    "fp4-planar": (contextlib.nullcontext, {"fp4_layout": "planar"}),
    "fp4-bytes": (contextlib.nullcontext, {"fp4_layout": "bytes"}),
    "fp4-pairs": (contextlib.nullcontext, {"fp4_layout": "pairs"}),
    "fp8-large-m": (contextlib.nullcontext, {"fp8_large_m": True}),
    "no-attention-fusion": (contextlib.nullcontext, {"fuse_attention": False}),  # attention as MatMul/Softmax
    "one-row-model": (contextlib.nullcontext, {"one_row_model": True}),  # the program also compiled at one row
    # decode overhead: independent small kernels (the split-K GEMVs' zero fills) launched as one; row reductions
    # (RMSNorm) up to 4096 persistent (one load of the row); one-row reductions not split in two; reduction tiles
    # tuned by timing
    "inductor-combo": (lambda: inductor_config.patch(combo_kernels=True), {}),
    "inductor-persistent": (lambda: persistent_reductions_up_to(4096), {}),
    "inductor-no-split": (lambda: inductor_config.patch(split_reductions=False), {}),
    "inductor-coordesc": (lambda: inductor_config.patch(coordinate_descent_tuning=True), {}),
    "pdl": (contextlib.nullcontext, {"pdl": True}),  # `qcompile build --pdl`
}
ALIASES = {"inductor-combo-persistent": "inductor-combo+inductor-persistent"}  # a name of earlier sessions' runs


def split_variant(name: str) -> tuple[str, str | None]:
    """"recipe:variant" -> (recipe, variant); a plain recipe -> (recipe, None). A variant may join several with
    "+" (e.g. "pdl+int4-gemv-mma")."""
    recipe, _, variant = name.partition(":")
    variant = ALIASES.get(variant, variant)
    for part in variant_parts(variant):
        if part not in VARIANTS:
            raise SystemExit(f"bench_engines: unknown variant {part!r} in --recipes {name!r} "
                             f"(known: {', '.join([*VARIANTS, *ALIASES])})")
    return recipe, variant or None


@contextlib.contextmanager
def variant_build(variant: str | None):
    """Inside a variant's build context ("a+b": both contexts); yields its extra `qcompile.build` arguments."""
    with contextlib.ExitStack() as stack:
        options = {}
        for part in variant_parts(variant):
            factory, more = VARIANTS[part]
            stack.enter_context(factory())
            options.update(more)
        yield options


def time_cuda(fn, iters: int, warmup: int = 10) -> float:
    """Median milliseconds of `fn()` over `iters` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_profile(engine, feeds, runs: int = 5) -> str:
    """The engine's top GPU kernels by total time over `runs` runs, then its top host-side events by self CPU time
    (aten ops the package calls, kernel launch API calls): where an eager step's time goes when the GPU waits on the
    host (torch.profiler tables)."""
    from torch.profiler import ProfilerActivity, profile

    engine.run_torch(feeds)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            engine.run_torch(feeds)
        torch.cuda.synchronize()
    rows = int(os.environ.get("PROFILE_ROWS", "12"))
    width = int(os.environ.get("PROFILE_NAME_WIDTH", "70"))
    table = prof.key_averages()
    return (table.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=width)
            + f"\nhost side, {runs} runs:\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=width)
            + "\nlast run's GPU kernels in launch order (µs):\n" + kernel_timeline(prof.events(), runs, width))


def kernel_timeline(events, runs: int, width: int) -> str:
    """The GPU kernels of the last of `runs` profiled runs in the order they ran, one line each with its time,
    then their sum: which call of a kernel that runs on several layers (e.g. one GEMM kernel for the Q/K/V and the
    MLP layers) takes how long, which the totals per kernel name cannot tell."""
    from torch.autograd import DeviceType

    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    last = kernels[len(kernels) - len(kernels) // runs:]
    lines = [f"{e.time_range.elapsed_us():9.2f}  {e.name[:width]}" for e in last]
    total = sum(e.time_range.elapsed_us() for e in last)
    return "\n".join(lines + [f"{total:9.2f}  (sum of {len(last)} kernels)"])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("--recipes", nargs="+", default=["fp16", "fp8", "int8"])
    p.add_argument("--size", action="append", default=[],
                   help="dynamic dim sizes of one timed input, e.g. batch=4,seq=512 (repeat for more)")
    p.add_argument("--calib-size", help="dim sizes of the calibration samples (default: the first --size, "
                   "each dim capped at 256)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--workdir", default="/tmp/qcompile-bench")
    p.add_argument("--out", help="write the JSON results here")
    p.add_argument("--profile", action="store_true",
                   help="add each engine's top GPU kernels and one run's kernels in launch order (first --size)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each engine replayed from a CUDA graph (qcompile.engine.GraphReplay)")
    p.add_argument("--build-jobs", type=int, default=1,
                   help="build this many engines at once in worker processes (compiling is CPU-bound); "
                   "all builds finish before any timing starts")
    args = p.parse_args(argv)
    for name in args.recipes:
        split_variant(name)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = load_source(args.source)
    # export once; every recipe then builds from the same ONNX file (external data for big models)
    onnx_path = work / "model.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(src.model)  # save_as_external_data rewrites the proto it is given
    onnx.save(on_disk, str(onnx_path), save_as_external_data=True, location="model.onnx.data")
    del on_disk
    size_sets = [parse_dim_sizes(item.split(",")) for item in args.size] or [{}]
    calib = work / "calib.npz"
    calib_sizes = (parse_dim_sizes(args.calib_size.split(",")) if args.calib_size
                   else {k: min(v, 256) for k, v in size_sets[0].items()})
    samples = [src.random_inputs(np.random.default_rng(i + 1), calib_sizes) for i in range(8)]
    np.savez(calib, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})

    reference = lower_onnx(src.model, compute_dtype=torch.float64).to("cuda")
    cases = []  # (sizes, feeds, FP32-graph outputs)
    for sizes in size_sets:
        feeds = {k: torch.from_numpy(v).cuda() for k, v in src.random_inputs(np.random.default_rng(0), sizes).items()}
        with torch.no_grad():
            cases.append((sizes, feeds, reference.run(feeds)[0]))
    del reference
    torch.cuda.empty_cache()

    failed = {}
    built = build_all(args.recipes, onnx_path, calib, work, args.build_jobs, failed)
    results = []
    for recipe in args.recipes:
        if recipe not in built:
            continue
        try:
            results += measure(recipe, built[recipe], cases, args)
        except Exception as exc:  # noqa: BLE001 - an engine that fails to run must not lose the others' timings
            failed[recipe] = f"run: {first_line(exc)}"
            print(f"--- {recipe}: engine run failed: {failed[recipe]}", flush=True)
        torch.cuda.empty_cache()
    report(results, failed, size_sets, args)
    return 1 if failed else 0


def build_one(name: str, onnx_path: Path, calib: Path, work: Path) -> dict:
    """Build one recipe's engine (name: a recipe, or "recipe:variant"); what `measure` needs of it (plain values:
    it may cross processes)."""
    recipe, variant = split_variant(name)
    t0 = time.perf_counter()
    with variant_build(variant) as options:
        built = qcompile.build(str(onnx_path), recipe, output=work / f"{name.replace(':', '-')}.engine",
                               calib=str(calib), device="cuda", **options)
    return {"engine_path": str(built.engine_path), "build_s": time.perf_counter() - t0,
            "layers_quantized": len(built.layers), "weights_bytes": built.bytes_after}


def build_all(recipes, onnx_path, calib, work, jobs: int, failed: dict) -> dict:
    """recipe -> `build_one` result, `jobs` builds at a time; a failure goes to `failed` and the rest go on."""
    built = {}

    def settle(recipe, result):
        try:
            built[recipe] = result()
            print(f"--- {recipe}: built in {built[recipe]['build_s']:.0f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - one recipe's failure must not lose the others' timings
            failed[recipe] = first_line(exc)
            print(f"--- {recipe}: build failed: {failed[recipe]}", flush=True)

    if jobs <= 1:
        for recipe in recipes:
            settle(recipe, lambda: build_one(recipe, onnx_path, calib, work))
        return built
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(build_one, recipe, onnx_path, calib, work): recipe for recipe in recipes}
        for future in concurrent.futures.as_completed(futures):
            settle(futures[future], future.result)
    return built


def first_line(exc: Exception) -> str:
    """`Type: first line of the message`, for the failure table."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def measure(recipe, built: dict, cases, args) -> list[dict]:
    """Time one recipe's engine at every size (eager, and replayed from a CUDA graph with --cuda-graph)."""
    results = []
    engine = qcompile.load(built["engine_path"], run_single_threaded=args.cuda_graph)
    if args.profile:
        print(f"--- {recipe}: GPU kernels at {cases[0][0]}\n{kernel_profile(engine, cases[0][1])}")
    for sizes, feeds, want in cases:
        ms = time_cuda(lambda: engine.run_torch(feeds), args.iters)
        outs = engine.run_torch(feeds)
        cos = min(cosine(outs[n], want[n]) for n in engine.output_names)
        tokens = sizes.get("batch", 1) * sizes.get("seq", 1)
        row = {"recipe": recipe, "dims": sizes, "ms": ms, "tokens_per_s": tokens * 1000.0 / ms,
               "cosine_vs_fp32": cos, "build_s": built["build_s"],
               "layers_quantized": built["layers_quantized"], "weights_bytes": built["weights_bytes"]}
        if args.cuda_graph:  # the same run replayed from a CUDA graph: one launch instead of one per kernel
            try:
                replay = GraphReplay(engine, feeds)
                row["ms_graph"] = time_cuda(replay.replay, args.iters)
                row["tokens_per_s_graph"] = tokens * 1000.0 / row["ms_graph"]
                got = replay.run(feeds)
                row["graph_matches_run"] = min(cosine(got[n], outs[n]) for n in engine.output_names)
                del replay
            except qcompile.EngineError as exc:
                row["graph_error"] = str(exc)
        results.append(row)
    return results


def report(results, failed, size_sets, args) -> None:
    """Print the table (speed vs the first recipe) and write the JSON."""
    rows = []
    base_recipe = args.recipes[0]
    base = {str(r["dims"]): r for r in results if r["recipe"] == base_recipe}
    for r in results:
        b = base.get(str(r["dims"]))
        speedup = b["ms"] / r["ms"] if b else float("nan")
        r["speedup_vs_" + base_recipe] = speedup
        dims = ",".join(f"{k}={v}" for k, v in r["dims"].items())
        row = [r["recipe"], dims, r["ms"], f"{r['tokens_per_s']:.0f}", f"{speedup:.2f}x", r["cosine_vs_fp32"],
               r["layers_quantized"]]
        if args.cuda_graph:
            graph_speedup = b["ms_graph"] / r["ms_graph"] if b and "ms_graph" in b and "ms_graph" in r else float("nan")
            r["graph_speedup_vs_" + base_recipe] = graph_speedup
            row += [r.get("ms_graph", r.get("graph_error", "-")[:30]), f"{graph_speedup:.2f}x"]
        rows.append(tuple(row))
    meta = {"source": args.source, "sizes": size_sets, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "iters": args.iters, "command": " ".join(sys.argv), "failed": failed}
    headers = ["recipe", "dims", "ms (median)", "tokens/s", f"vs {base_recipe}", "cosine vs fp32", "layers"]
    if args.cuda_graph:
        headers += ["ms (CUDA graph)", f"graph vs {base_recipe}"]
    print(format_table(headers, rows,
                       title=f"{args.source} on {meta['device']}"))
    for recipe, error in failed.items():
        print(f"{recipe}: failed: {error}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
