"""Build engines of one model with several recipes and time them side by side (GPU).

Example (on the GPU machine):
    python tools/bench_engines.py mlp-large --recipes fp16 fp8 int8 --dim batch=4 --dim seq=512 \
        --out benchmarks/engines-mlp-large.json

Each engine is timed on the same device-resident inputs with CUDA events (median of --iters
runs after warm-up); ratios are relative to the first recipe. Also checks each engine's
outputs against the FP32 graph (cosine similarity, computed by our lowering in float64).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import qcompile
from qcompile.frontend import load_source
from qcompile.inputs import parse_dim_sizes
from qcompile.lowering import lower_onnx
from qcompile.report import format_table


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


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("--recipes", nargs="+", default=["fp16", "fp8", "int8"])
    p.add_argument("--dim", action="append", default=[], help="NAME=SIZE of a dynamic dim for the timed input")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--workdir", default="/tmp/qcompile-bench")
    p.add_argument("--out", help="write the JSON results here")
    args = p.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = load_source(args.source)
    # export once; every recipe then builds from the same ONNX file (external data for big models)
    onnx_path = work / "model.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(src.model)  # save_as_external_data rewrites the proto it is given
    onnx.save(on_disk, str(onnx_path), save_as_external_data=True, location="model.onnx.data")
    del on_disk
    sizes = parse_dim_sizes(args.dim)
    feeds_np = src.random_inputs(np.random.default_rng(0), sizes)
    calib = work / "calib.npz"
    samples = [src.random_inputs(np.random.default_rng(i + 1), {k: min(v, 256) for k, v in sizes.items()})
               for i in range(8)]
    np.savez(calib, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})

    reference = lower_onnx(src.model, compute_dtype=torch.float64).to("cuda")
    feeds = {k: torch.from_numpy(v).cuda() for k, v in feeds_np.items()}
    with torch.no_grad():
        want = reference.run(feeds)[0]
    del reference
    torch.cuda.empty_cache()

    rows, results = [], []
    for recipe in args.recipes:
        t0 = time.perf_counter()
        built = qcompile.build(str(onnx_path), recipe, output=work / f"{recipe}.engine", calib=str(calib), device="cuda")
        build_s = time.perf_counter() - t0
        engine = qcompile.load(built.engine_path)
        ms = time_cuda(lambda: engine.run_torch(feeds), args.iters)
        outs = engine.run_torch(feeds)
        cos = min(cosine(outs[n], want[n]) for n in engine.output_names)
        results.append({"recipe": recipe, "ms": ms, "cosine_vs_fp32": cos, "build_s": build_s,
                        "layers_quantized": len(built.layers), "weights_bytes": built.bytes_after})
        del engine
        torch.cuda.empty_cache()
    base = results[0]["ms"]
    for r in results:
        r["speedup_vs_" + results[0]["recipe"]] = base / r["ms"]
        rows.append((r["recipe"], r["ms"], f"{base / r['ms']:.2f}x", r["cosine_vs_fp32"], r["layers_quantized"]))
    meta = {"source": args.source, "dims": sizes, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "iters": args.iters, "command": " ".join(sys.argv)}
    print(format_table(["recipe", "ms (median)", f"vs {results[0]['recipe']}", "cosine vs fp32", "layers"], rows,
                       title=f"{args.source} {sizes} on {meta['device']}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
