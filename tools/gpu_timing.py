"""Timing helpers shared by the GPU benchmarks (tools/bench_*.py): rotating weights, median µs per call."""
from __future__ import annotations

import torch
import triton.testing

MODE = {"graph": False}  # set MODE["graph"] = True (--cuda-graph) to time calls replayed from a CUDA graph


def rotating(make, n_bytes_each: int, budget: int = 512 << 20):
    """A callable cycling over copies of `make()` so weights do not stay in L2."""
    copies = [make() for _ in range(max(2, min(8, budget // max(n_bytes_each, 1))))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return nxt


def bench(fn, copies: int = 8) -> float:
    """Median us per call. Eager: Python launch overhead included. Graph mode: `copies` calls (rotating
    weights) captured in one CUDA graph, replay time / copies -- what an engine replaying CUDA graphs pays."""
    if not MODE["graph"]:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1000.0
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(copies):
            fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1000.0 / copies
