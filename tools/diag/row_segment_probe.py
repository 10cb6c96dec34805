"""Does the length of the run a tile reads per weight row per step bound how fast a 4-bit GEMM streams its weight?

FP4's planar words are [N, K/8] (a row's 64 K in 32 contiguous bytes): the one-dot kernel reads 64 bytes of each of
its BLOCK_N rows per 128-K step, rows K/2 bytes apart. INT4's are [K/8, N]: a step reads 16 word rows of BLOCK_N
contiguous words (256 bytes at 64 columns). At 16 rows the FP4 op ran 1.1-1.4x slower than INT4's on the kernel
layers with about the same SASS per weight (BENCHMARKS.md, forty-eighth session). Here plain Triton kernels read
the same bytes in each pattern and XOR them (nothing else done), split in K for about 4 waves, cold (a different
copy per call), as a loop of plain loads or pipelined through shared memory (`tl.range(num_stages=3)`):

- rows_W: [N, K/8] words, BLOCK_N rows x W words per step (W = 16 is the FP4 kernel's 64 bytes);
- cols_R: [K/8, N] words, R word rows x BLOCK_N columns per step (R = 16 is INT4's step).

µs per call replayed from a CUDA graph, and TB/s.

    python3 tools/diag/row_segment_probe.py     # on the GPU machine (STEPS=diag DIAG=tools/diag/row_segment_probe.py)

Not part of the product.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tools/
from gemv_l2_probe import COLD_BYTES, per_call_us, run_layers  # noqa: E402
from gpu_timing import SHAPES  # noqa: E402  (K x N: the kernel-target layers)
from stream_floor_probe import _xor  # noqa: E402

WAVES = 4


@triton.jit
def _rows_kernel(w_ptr, out_ptr, K8, steps, W: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """XOR of rows [BLOCK_N] x words [steps * W] of w [N, K8], W words of each row per step."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K8 + (tl.program_id(1) * steps * W + tl.arange(0, W))[None, :]
    acc = tl.zeros((BLOCK_N, W), dtype=tl.int32)
    for s in tl.range(0, steps, num_stages=STAGES):
        acc ^= tl.load(ptrs + s * W, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.reduce(acc, None, _xor))


@triton.jit
def _cols_kernel(w_ptr, out_ptr, N, steps, R: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """XOR of word rows [steps * R] x columns [BLOCK_N] of w [K8, N], R word rows per step."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * steps * R + tl.arange(0, R)
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((R, BLOCK_N), dtype=tl.int32)
    for s in tl.range(0, steps, num_stages=STAGES):
        acc ^= tl.load(ptrs + s * R * N, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.reduce(acc, None, _xor))


def splits_for(tiles: int, steps: int, num_sms: int) -> int:
    """The largest divisor of `steps` giving at most about WAVES waves of programs."""
    target = max(1, round(WAVES * num_sms / tiles))
    return max(d for d in range(1, min(steps, target) + 1) if steps % d == 0)


def layer(k: int, n: int) -> dict:
    k8 = k // 8
    nbytes = k * n // 2
    copies = max(2, -(-COLD_BYTES // nbytes))
    gen = torch.Generator(device="cuda").manual_seed(k + n)
    words = [torch.randint(-2**31, 2**31 - 1, (n, k8), dtype=torch.int32, device="cuda", generator=gen)
             for _ in range(copies)]  # read as [N, K8] by rows_*, as [K8, N] by cols_* (the same bytes)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    out = {"MB": nbytes / 1e6, "copies": copies}

    def read_us(kernel, extent: int, per_step: int, bn: int, stages: int, **tile) -> float:
        """µs per cold read by `kernel` in steps of `per_step` words of each of bn rows or columns."""
        steps_all = k8 // per_step
        splits = splits_for(n // bn, steps_all, sms)
        return per_call_us([lambda t=t: kernel[(n // bn, splits)](t, sink, extent, steps_all // splits, BLOCK_N=bn,
                                                                  STAGES=stages, num_warps=4, **tile)
                            for t in words])

    for stages in (1, 3):
        for bn in (64, 128):
            for w in (8, 16, 32, 64):  # 32, 64, 128, 256 bytes of a row per step
                out[f"rows_{w}_n{bn}_s{stages}"] = read_us(_rows_kernel, k8, w, bn, stages, W=w)
            for r in (8, 16):  # 64-K and 128-K steps of INT4's layout
                out[f"cols_{r}_n{bn}_s{stages}"] = read_us(_cols_kernel, n, r, bn, stages, R=r)
    for key in [key for key in out if key.startswith(("rows", "cols"))]:
        out[f"{key}_TBps"] = nbytes / out[key] / 1e6
    print(f"{k}x{n}: " + "  ".join(f"{key} {v:.2f}" for key, v in out.items() if key.endswith("TBps")), flush=True)
    return out


def main() -> None:
    run_layers(layer, "row_segment_probe.json", SHAPES)


if __name__ == "__main__":
    main()
