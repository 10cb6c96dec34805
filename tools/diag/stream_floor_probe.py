"""How fast can one pass read each decode layer's INT4 weight from HBM? The INT4 op at M = 1 (cold: a different
copy of the weight each call) beside plain reads of the same bytes: a Triton kernel that only loads the words
(16-byte loads, programs of BLOCK words, one XOR per word kept alive by a store per program). The gap between the
op and it is what a better GEMV could still win on that layer. (torch's own reductions over the words ran at
0.4-2.2 TB/s on an H100: no floor.) µs per call replayed from a CUDA graph.

    python3 tools/diag/stream_floor_probe.py     # on the GPU machine (STEPS=diag DIAG=tools/diag/stream_floor_probe.py)

Not part of the product.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from gemv_l2_probe import cold_layer, per_call_us, run_layers  # noqa: E402


@triton.jit
def _stream_kernel(w_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out[program] = the XOR of the program's BLOCK words: every word loaded once, nothing else done with it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(w_ptr + offs, mask=offs < numel, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.reduce(words, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def stream(words: torch.Tensor, block: int, warps: int, out: torch.Tensor):
    """One read of `words` (`_stream_kernel` in programs of `block` words on `warps` warps); out: a program each."""
    numel = words.numel()
    _stream_kernel[(triton.cdiv(numel, block),)](words, out, numel, BLOCK=block, num_warps=warps)


def layer(k: int, n: int) -> dict:
    op, words, scale, x, _ = cold_layer(k, n)
    words_bytes = k * n // 2
    out = {"MB": words_bytes / 1e6}
    out["int4_op"] = per_call_us([lambda w=w: op(x, w, scale, None, None, 128) for w in words])
    sink = torch.empty(k * n // 8 // 1024 + 1, dtype=torch.int32, device="cuda")
    keys = ["int4_op"]
    for block, warps in ((1024, 4), (4096, 8), (8192, 8)):
        key = f"stream_{block}_w{warps}"
        out[key] = per_call_us([lambda w=w, b=block, nw=warps: stream(w, b, nw, sink) for w in words])
        keys.append(key)
    for key in keys:
        out[f"{key}_TBps"] = words_bytes / out[key] / 1e6
    print(f"{k}x{n}: " + "  ".join(f"{key} {v:.2f}" for key, v in out.items()), flush=True)
    return out


def main() -> None:
    run_layers(layer, "stream_floor_probe.json")


if __name__ == "__main__":
    main()
