"""Shared by the diagnostic probes in tools/diag: run one part and keep going when it fails, save the results."""
from __future__ import annotations

import json
import os

import torch


def run_part(results: dict, label: str, fn, *args) -> None:
    """`results[label] = fn(*args)`; a failure is printed (with its first line) instead of stopping the probe."""
    try:
        out = fn(*args)
        if out is not None:
            results[label] = out
    except Exception as e:  # noqa: BLE001  (a probe reports every part it can)
        print(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    torch.cuda.empty_cache()


def even_splits(k: int, n: int, cfg: dict, step: int, num_sms: int) -> tuple[int, int, int]:
    """(N tiles, K splits, steps per split) for about cfg["waves"] waves of programs; the probes' kernels take
    whole N tiles and equal splits only (ValueError otherwise)."""
    tiles = n // cfg["BLOCK_N"]
    steps = k // step
    splits = max(1, min(steps, round(cfg["waves"] * num_sms / tiles)))
    per_steps = -(-steps // splits)
    splits = -(-steps // per_steps)
    if steps % per_steps or n % cfg["BLOCK_N"] or k % step:
        raise ValueError("uneven tiles or splits")
    return tiles, splits, per_steps


def save(results: dict, name: str) -> None:
    """The results as JSON at $OUT/name (when OUT is set, as gpu_session.sh sets it)."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(results, f, indent=1)


def run_grid(fn, shapes, ms, name: str) -> dict:
    """`fn(k, n, m)` for every (K, N) in `shapes` and M in `ms` (failures printed, the rest kept), saved as `name`
    after every cell, so a run stopped by its time limit keeps what it measured."""
    results: dict = {}
    for k, n in shapes:
        for m in ms:
            run_part(results, f"{k}x{n} M={m}", fn, k, n, m)
            save(results, name)
    return results
