"""Is the one-row INT4 GEMV bound by HBM? Each decode layer's INT4 op at M = 1 timed with its weight cold (a
different copy each call, more bytes than L2 holds) and warm (the same copy each call: read from L2), beside cuBLAS
fp16 on the same layer. A kernel that HBM bounds runs much faster warm; one bound by its instructions or launch does
not (BENCHMARKS.md, forty-first session: it does not; the session's run also timed a weight prefetch, commit
64fcc39, since reverted). Then, cold, GEMV tiles 1024 columns wide on 2 warps
(16 columns a thread: the activation pairs of a word row made once for twice the words; 3.1 SASS instructions per
weight against the shipped tile's 3.75, `tools/diag/sass_count.py --block-n 1024`) and the shipped tile on x's
own fp16 pairs (`x_pairs`, 3.23) beside the shipped one (that session's run). Now: the tensor-core GEMV
(`mma_gemv`, 1.9 instructions per weight) in `VARIANTS`' tiles, cold and warm, beside the shipped GEMV (x's pairs
as int32 words: 3.05; `int4_cold_x_fp16_loads`: the same on x 2-byte aligned, which takes the fp16 loads, 3.23). µs
per call replayed from a CUDA graph.

    python3 tools/diag/gemv_l2_probe.py          # on the GPU machine (STEPS=diag DIAG=tools/diag/gemv_l2_probe.py)

Not part of the product.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/: gpu_timing
from gpu_timing import graph_replay_us  # noqa: E402
from probe_util import run_part, save  # noqa: E402

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # Q/K/V, output, gate/up, down
COLD_BYTES = 160 << 20  # copies enough to pass through L2 (50 MB on the H100 and H200) several times
# GEMV bucket changes timed beside the shipped one: the tensor-core GEMV (`mma_gemv`) on 2-8 warps a program, K
# split for 16-32 waves, a tile's two rows 8 columns apart or adjacent ("paired": one int64 load per word row).
# (The forty-sixth session's run also timed its weights decoded as fp16 subnormals: commit a25309b, since removed.)
VARIANTS = [(f"mma_w{warps}_v{waves}{'_paired' if paired else ''}",
             dict(mma={"warps": warps, "waves": waves, "paired": paired}))
            for warps, waves, paired in ((4, 16, False), (4, 16, True), (4, 32, True), (2, 32, True), (8, 16, True))]


def per_call_us(calls, reps: int = 20) -> float:
    """µs per call of the list of thunks `calls`, all captured in one CUDA graph and replayed `reps` times back to
    back (`gpu_timing.graph_replay_us`, as the benchmarks' --back-to-back)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    return graph_replay_us(calls, reps=reps) / len(calls)


def cold_layer(k: int, n: int):
    """(the INT4 op, copies of a random K x N INT4 weight filling COLD_BYTES, its g128 scales, fp16 x [1, K], the
    generator) for timing the op at M = 1 cold: a different copy each call."""
    from qcompile.plugins.int4_gemm import register

    copies = max(2, -(-COLD_BYTES // (k * n // 2)))
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    words = [torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen)
             for _ in range(copies)]
    scale = torch.rand(k // 128, n, device="cuda", dtype=torch.float16, generator=gen) * 0.01 + 0.001
    x = torch.randn(1, k, device="cuda", dtype=torch.float16, generator=gen)
    return register(), words, scale, x, gen


def run_layers(layer, name: str, shapes=SHAPES) -> None:
    """`layer(k, n)` on every (K, N) of `shapes` (default: the decode layers), the results saved as $OUT/name
    after each."""
    results: dict = {"device": torch.cuda.get_device_name()}
    for k, n in shapes:
        run_part(results, f"{k}x{n}", layer, k, n)
        save(results, name)


def layer(k: int, n: int) -> dict:
    from qcompile.plugins.int4_gemm import kernel

    op, words, scale, x, gen = cold_layer(k, n)
    copies = len(words)
    fp16 = [torch.randn(k, n, device="cuda", dtype=torch.float16, generator=gen) * 0.01
            for _ in range(max(2, -(-COLD_BYTES // (2 * k * n))))]
    out = {"copies": copies}
    out["int4_cold"] = per_call_us([lambda w=w: op(x, w, scale, None, None, 128) for w in words])
    out["int4_warm"] = per_call_us([lambda: op(x, words[0], scale, None, None, 128)] * copies)
    x_odd = torch.empty(k + 1, device="cuda", dtype=torch.float16)[1:].copy_(x[0])[None]  # 2-byte aligned
    out["int4_cold_x_fp16_loads"] = per_call_us([lambda w=w: op(x_odd, w, scale, None, None, 128) for w in words])
    out["fp16_cold"] = per_call_us([lambda w=w: x @ w for w in fp16])
    out["fp16_warm"] = per_call_us([lambda: x @ fp16[0]] * len(fp16))
    shipped = kernel.CONFIGS[0][1]
    for label, change in VARIANTS:
        configs = [(1, dict(shipped, **change))] + kernel.CONFIGS[1:]
        run = lambda w, c=configs: kernel.int4_gemm_triton(x, w, scale, None, None, 128,  # noqa: E731
                                                           wrap=torch.library.wrap_triton, configs=c)
        out[f"int4_cold_{label}"] = per_call_us([lambda w=w: run(w) for w in words])
        out[f"int4_warm_{label}"] = per_call_us([lambda: run(words[0])] * copies)
        out[f"{label}_max_abs_diff"] = float((run(words[0]).float() - op(x, words[0], scale, None, None, 128).float())
                                             .abs().max())
    print(f"{k}x{n}: " + "  ".join(f"{key} {v:.2f}" for key, v in out.items() if key != "copies"), flush=True)
    return out


def main() -> None:
    run_layers(layer, "gemv_l2_probe.json")


if __name__ == "__main__":
    main()
