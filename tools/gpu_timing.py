"""Shared by the GPU kernel benchmarks and tuners (tools/bench_*.py, tools/tune_*.py): rotating weights, median µs
per call, the shape x M sweep with its table, the command-line options and the JSON results, and the tuners'
check of every candidate against a reference in worker processes."""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform

import torch
import triton
import triton.testing

# MODE["graph"] (--cuda-graph): time calls replayed from a CUDA graph; MODE["back_to_back"] (--back-to-back, with
# it): replay them back to back, with no cache flush between replays (`bench`)
MODE = {"graph": False, "back_to_back": False}
BACK_TO_BACK_CALLS = 64  # calls in one back-to-back graph (fewer where they would take over 2 ms: `bench`)


def set_mode(args) -> None:
    """MODE from the command line (`bench_parser`'s --cuda-graph and --back-to-back)."""
    MODE["graph"] = args.cuda_graph or args.back_to_back
    MODE["back_to_back"] = args.back_to_back


def rotating(make, n_bytes_each: int, budget: int = 512 << 20):
    """A callable cycling over copies of `make()` so weights do not stay in L2: up to 8 copies (`budget` bytes),
    up to BACK_TO_BACK_CALLS back to back, where no cache flush comes between the calls (a graph's calls then read
    `budget` bytes or 2 copies, whichever is more: several times the 50 MB L2 of an H100 / H200)."""
    most = BACK_TO_BACK_CALLS if MODE["back_to_back"] else 8
    copies = [make() for _ in range(max(2, min(most, budget // max(n_bytes_each, 1))))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return nxt


def bench(fn, copies: int = 8, rep: int = 100) -> float:
    """Median us per call. Eager: Python launch overhead included. Graph mode: `copies` calls (rotating
    weights) captured in one CUDA graph, replay time / copies -- what an engine replaying CUDA graphs pays.
    `triton.testing.do_bench` zeroes a 256 MB buffer before each replay: every replay starts with L2 full of dirty
    lines, which its first calls write back, and one graph launch is shared by only `copies` calls. Back to back
    (MODE["back_to_back"]): BACK_TO_BACK_CALLS calls a graph (at most 2 ms of them), replayed with nothing between
    replays, the median of 5 timings of enough replays for 10 ms -- calls as a decode step's layers meet them:
    each on weights no recent call read, after other work and not after a flush."""
    if not MODE["graph"]:
        return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1000.0
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    if MODE["back_to_back"]:
        per_call = graph_replay_us([fn] * copies) / copies
        copies = max(copies, min(BACK_TO_BACK_CALLS, int(2000 / max(per_call, 1e-3))))
        return graph_replay_us([fn] * copies, trials=5, min_ms=10.0) / copies
    g = _capture([fn] * copies)
    return triton.testing.do_bench(g.replay, warmup=10, rep=rep, return_mode="median") * 1000.0 / copies


def _capture(calls: list) -> torch.cuda.CUDAGraph:
    """A CUDA graph of the thunks `calls`, in order."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for call in calls:
            call()
    return g


def graph_replay_us(calls: list, trials: int = 1, reps: int = 1, min_ms: float = 0.0) -> float:
    """Median µs of one replay of a CUDA graph of the thunks `calls`, over `trials` timings of `reps` replays back
    to back (after the first timing, as many as take `min_ms` where that is more; two replays first, untimed).
    Also the diagnostic probes' timing (`tools/diag/gemv_l2_probe.per_call_us`)."""
    g = _capture(calls)
    g.replay()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(trials):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
        reps = max(reps, int(min_ms * 1000.0 / max(times[-1], 1e-3)))
    del g
    return sorted(times)[len(times) // 2]


SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # K x N of reference/kernel-targets.md
MS = [1, 16, 64, 256, 1024, 4096]


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes: --out, --ms, --shapes, --cuda-graph, --eager."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--ms", type=int, nargs="*", default=MS)
    ap.add_argument("--cuda-graph", action="store_true", help="time calls replayed from a CUDA graph")
    ap.add_argument("--back-to-back", action="store_true", help="time calls replayed from a CUDA graph back to back, "
                    "with no cache flush between replays (implies --cuda-graph; see gpu_timing.bench)")
    ap.add_argument("--eager", action="store_true", help="time the eager op (default: torch.compile'd)")
    ap.add_argument("--shapes", nargs="*", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN")
    return ap


def sweep(args, cols: list[str], run_shape) -> list[dict]:
    """`run_shape(k, n, m)` for every --shapes x --ms, printing one table row per call; returns the rows."""
    set_mode(args)
    rows = []
    print(f"{'KxN':>12} {'M':>5} " + " ".join(f"{c:>16}" for c in cols))
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        for m in args.ms:
            r = run_shape(k, n, m)
            rows.append(r)
            cells = [f"{r[c]:16.2f}" if isinstance(r.get(c), float) else f"{'-':>16}" for c in cols]
            print(f"{shape:>12} {m:>5} " + " ".join(cells), flush=True)
            torch.cuda.empty_cache()
    return rows


def write_results(args, rows: list[dict], **meta) -> None:
    """The rows and the run's metadata (device, versions, timing mode, `meta`) as JSON at --out."""
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "unit": "us (median, " + ("of back-to-back replays)" if args.back_to_back else "triton.testing.do_bench)"),
            "mode": ("cuda_graph back to back" if args.back_to_back else "cuda_graph" if args.cuda_graph else "launch")
            + (", eager op" if args.eager else ", compiled op"),
            **meta}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


def rel_errors(cands: dict, names, ref: torch.Tensor) -> dict:
    """{name: relative L2 error of cands[name]() against ref, or the first line of its exception} for `names`."""
    out = {}
    for name in names:
        try:
            y = cands[name]().float()
            out[name] = ((y - ref).norm() / ref.norm()).item()
        except Exception as exc:  # a configuration Triton cannot compile (registers, shared memory)
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    torch.cuda.synchronize()
    return out


def check_cells(cells, names_of, worker, workers: int, parts: int = 4, extra: tuple = ()) -> dict:
    """{(k, n, m): {name: rel_err or message}}: `worker((k, n, m, names, *extra))` (a module-level function
    returning `rel_errors`) over each cell's candidate names `names_of(m)`, split in `parts`, in `workers` spawned
    processes (Triton's cache then serves the timing process); extra: the script's options the worker needs."""
    tasks = []
    for k, n, m in cells:
        names = list(names_of(m))
        tasks += [(k, n, m, names[i::parts], *extra) for i in range(parts)]
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(worker, tasks, chunksize=1)
    out = {}
    for (k, n, m, *_), part in zip(tasks, results):
        out.setdefault((k, n, m), {}).update(part)
    return out


def time_checked(cands: dict, errors: dict, max_err: float = 2e-2) -> dict:
    """{name: {"rel_err": .., "us": ..}} for candidates already checked by `check_cells` (`errors`: name -> error or
    message): timed only when the error is below `max_err`; {"error": message} where the check failed."""
    out = {}
    for name, fn in cands.items():
        err = errors[name]
        out[name] = {"rel_err": err} if isinstance(err, float) else {"error": err}
        if isinstance(err, float) and err < max_err:
            out[name]["us"] = bench(fn, copies=4, rep=40)
    return out


def save_rows(path: str, rows: list) -> None:
    """Rows of a tuner or benchmark with the device and torch version, as JSON at `path` (written after every cell,
    so a run cut short keeps what it measured)."""
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
