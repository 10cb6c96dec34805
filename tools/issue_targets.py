#!/usr/bin/env python3
"""Score one GPU run's raw results against the speed targets of issues 4, 5 and 6 (reference/kernel-targets.md).

For each target: the cells met out of those it covers, the worst cell, and every miss, as a table and as JSON;
then each op benchmark's device and timing mode (`--cuda-graph`'s flushed replays or `--back-to-back`). It
reads the files the benchmarks write (any subset): `tools/bench_gemm.py` (--int4), `bench_fp4_gemm.py` (--fp4; its
row-pair columns where present, the layout CUDA engines store, else planar ones), `bench_w8a16_fp8_block.py` (--w8fp8),
`bench_fp8_large_m.py` (--fp8-large-m: the opt-in FP8 path above 128 rows) and `bench_engines.py` (--decode: each
w4a16_awq engine at one row against the fp16 engine of the same variant, e.g. w4a16_awq:pdl against fp16:pdl).

    python3 tools/issue_targets.py --int4 benchmarks/int4_gemm-h200_s48.json \
        --fp4 benchmarks/fp4_int4_gemm-h200_s48.json --w8fp8 benchmarks/w8a16_fp8_block-h200_s48.json \
        --fp8-large-m benchmarks/fp8_large_m-h200_s48.json --decode benchmarks/decode-*-h200_s48.json --out t.json

Needs no GPU. Not part of the product.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from qcompile.report import format_table, write_json_atomic

OP_BENCHMARKS = {"int4": "bench_gemm.py", "fp4": "bench_fp4_gemm.py", "w8fp8": "bench_w8a16_fp8_block.py",
                 "fp8_large_m": "bench_fp8_large_m.py"}  # a Target's source -> the tool whose JSON it reads
FP4_FORMATS = ("nvfp4", "mxfp4")
WITHIN_10_PERCENT = 1 / 1.1  # "FP4 within 10% of INT4": FP4's time at most 1.1x INT4's


@dataclass(frozen=True)
class Target:
    """A speed target over one benchmark's rows: `ratio(row)` (higher is better; None: the row has no value) must
    reach `threshold` on every row `covers` selects."""
    issue: int
    source: str  # a key of OP_BENCHMARKS
    name: str
    ratio: Callable[[dict], Optional[float]]
    threshold: float
    covers: Callable[[dict], bool] = lambda row: True


def quotient(num: str, den: str) -> Callable[[dict], Optional[float]]:
    """row[num] / row[den] (times in µs, so a speed-up of den's kernel over num's); None if either is missing."""
    def ratio(row: dict) -> Optional[float]:
        a, b = row.get(num), row.get(den)
        return a / b if a is not None and b else None
    return ratio


def shapes(*kn: tuple[int, int]) -> Callable[[dict], bool]:
    return lambda row: (row["K"], row["N"]) in kn


def rows_where(test: Callable[[int], bool], also: Callable[[dict], bool] = lambda row: True):
    """Rows whose M passes `test` (and `also`)."""
    return lambda row: test(row["M"]) and also(row)


FP4_LAYOUT_COLUMNS = ("pairs", "planar")  # the FP4 op's engine layouts, the one CUDA engines store first


def fp4_quotient(num: str, fmt: str) -> Callable[[dict], Optional[float]]:
    """`quotient(num, the FP4 op's time)` on the layout CUDA engines store (row pairs since the fifty-fourth
    session) where the run timed it, else on planar words (what they stored before), else on the byte layout."""
    columns = [f"{fmt}_{layout}_op" for layout in FP4_LAYOUT_COLUMNS] + [f"{fmt}_op"]
    quotients = {c: quotient(num, c) for c in columns}

    def of(row: dict) -> Optional[float]:
        return quotients[next((c for c in columns if c in row), columns[-1])](row)
    return of


def op_targets() -> list[Target]:
    """The kernel targets the issues name, on the op tables (bf16 in and out, eager op replayed from a CUDA graph)."""
    small, large = (lambda m: m <= 16), (lambda m: m >= 1024)
    targets = [
        Target(4, "int4", "INT4 >= 3.0x bf16 at M <= 16 on 8192x28672 and 4096x14336", quotient("bf16", "int4_op"),
               3.0, rows_where(small, shapes((8192, 28672), (4096, 14336)))),
        Target(4, "int4", "INT4 >= 2.0x bf16 at M <= 16 on 4096x4096", quotient("bf16", "int4_op"), 2.0,
               rows_where(small, shapes((4096, 4096)))),
        Target(4, "int4", "INT4 >= 1.5x bf16 at M = 64", quotient("bf16", "int4_op"), 1.5,
               rows_where(lambda m: m == 64)),
        Target(4, "int4", "INT4 >= 0.95x bf16 at M >= 1024", quotient("bf16", "int4_op"), 0.95, rows_where(large)),
        Target(4, "int4", "INT4 faster than tinygemm", quotient("tinygemm", "int4_op"), 1.0),
        Target(4, "fp8_large_m", "INT4 (opt-in FP8 path) >= 0.95x bf16 at M >= 1024", quotient("bf16", "int4_fp8"),
               0.95, rows_where(large)),
        Target(6, "w8fp8", "W8A16 >= 1.7x bf16 at M <= 16", quotient("bf16", "w8a16_op"), 1.7, rows_where(small)),
        Target(6, "w8fp8", "FP8 block >= 1.3x bf16 at M >= 1024", quotient("bf16", "fp8blk_op"), 1.3,
               rows_where(large)),
    ]
    for fmt in FP4_FORMATS:
        name = fmt.upper()
        targets += [
            Target(5, "fp4", f"{name} within 10% of INT4 (INT4 / {name} >= 0.909)", fp4_quotient("int4_op", fmt),
                   WITHIN_10_PERCENT),
            Target(5, "fp4", f"{name} >= 0.95x bf16 at M >= 1024", fp4_quotient("bf16", fmt), 0.95, rows_where(large)),
            Target(5, "fp8_large_m", f"{name} (opt-in FP8 path) >= 0.95x bf16 at M >= 1024",
                   quotient("bf16", f"{fmt}_fp8"), 0.95, rows_where(large)),
        ]
    return targets


def op_cells(target: Target, rows: list[dict]) -> list[dict]:
    """The cells `target` covers that have a value: {cell, value, met}."""
    cells = []
    for row in rows:
        value = target.ratio(row) if target.covers(row) else None
        if value is not None:
            cells.append({"cell": f"{row['K']}x{row['N']} M={row['M']}", "value": value,
                          "met": value >= target.threshold})
    return cells


DECODE_TARGET = 2.5  # issue 4: w4a16_awq decodes one row at >= 2.5x its fp16 engine (CUDA graph)


def decode_cells(results: list[dict], path: str) -> list[dict]:
    """Each w4a16_awq engine at batch 1, seq 1 against the fp16 engine of its variant (fp16:pdl for
    w4a16_awq:pdl; plain fp16 where the run has no such engine), step times replayed from a CUDA graph."""
    one_row = {r["recipe"]: r["ms_graph"] for r in results
               if r.get("dims") == {"batch": 1, "seq": 1} and r.get("ms_graph")}
    cells = []
    for recipe, ms in one_row.items():
        if not recipe.startswith("w4a16_awq"):
            continue
        variant = recipe.partition(":")[2]
        base = f"fp16:{variant}" if f"fp16:{variant}" in one_row else "fp16"
        if base in one_row:
            value = one_row[base] / ms
            cells.append({"cell": f"{recipe} / {base} [{Path(path).stem}]", "value": value,
                          "met": value >= DECODE_TARGET})
    return cells


def summary(issue: int, name: str, threshold: float, cells: list[dict]) -> dict:
    worst = min(cells, key=lambda c: c["value"]) if cells else None
    return {"issue": issue, "target": name, "threshold": threshold, "met": sum(c["met"] for c in cells),
            "cells": cells, "worst": worst, "misses": [c for c in cells if not c["met"]]}


def score(sources: dict[str, list[dict]], decode: dict[str, list[dict]]) -> list[dict]:
    """Every target whose benchmark was given: `sources` maps an op benchmark's option name to its rows, `decode`
    a bench_engines.py file's path to its results."""
    out = [summary(t.issue, t.name, t.threshold, op_cells(t, sources[t.source]))
           for t in op_targets() if t.source in sources]
    if decode:
        cells = [c for path, results in decode.items() for c in decode_cells(results, path)]
        out.append(summary(4, "w4a16_awq decode at one row >= 2.5x its fp16 engine", DECODE_TARGET, cells))
    return sorted(out, key=lambda s: s["issue"])  # stable: each issue's targets in the order above


SHOWN_MISSES = 3  # per target in the table (the JSON has them all)


def table(scores: list[dict]) -> str:
    rows = []
    for s in scores:
        worst = s["worst"]
        rows.append([s["issue"], s["target"], f"{s['met']} / {len(s['cells'])}",
                     f"{worst['value']:.2f} ({worst['cell']})" if worst else "no cells",
                     ", ".join(f"{c['cell']} {c['value']:.2f}" for c in s["misses"][:SHOWN_MISSES])
                     + (f" (+{len(s['misses']) - SHOWN_MISSES} more)" if len(s["misses"]) > SHOWN_MISSES else "")])
    return format_table(["issue", "target", "met", "worst", "misses"], rows)


def load_rows(path: str, key: str) -> tuple[list[dict], dict]:
    """(the file's `key` list, its "meta" dict: device and timing mode, empty where the file has none)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data[key], data.get("meta") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"issue_targets: cannot read the '{key}' list of {path}: {exc}. Pass the JSON file the "
                         f"benchmark wrote (its --out).")


def timing_lines(metas: dict[str, dict]) -> list[str]:
    """One line per op benchmark: its device and how its calls were timed (`gpu_timing.write_results`'s meta),
    so a scorecard says whether its times are do_bench's flushed graph replays or back-to-back ones."""
    return [f"--{name.replace('_', '-')}: {meta.get('device', 'device not recorded')}, "
            f"{meta.get('mode', 'timing mode not recorded')}" for name, meta in metas.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, tool in OP_BENCHMARKS.items():
        ap.add_argument(f"--{name.replace('_', '-')}", metavar="JSON", help=f"the JSON file of tools/{tool}")
    ap.add_argument("--decode", nargs="*", default=[], metavar="JSON", help="JSON files of tools/bench_engines.py")
    ap.add_argument("--out", help="also write the scores here as JSON")
    args = ap.parse_args(argv)
    loaded = {name: load_rows(getattr(args, name), "rows") for name in OP_BENCHMARKS if getattr(args, name)}
    decode = {path: load_rows(path, "results")[0] for path in args.decode}
    if not loaded and not decode:
        ap.error("give at least one benchmark's JSON file")
    scores = score({name: rows for name, (rows, _) in loaded.items()}, decode)
    timing = {name: meta for name, (_, meta) in loaded.items()}
    print(table(scores))
    for line in timing_lines(timing):
        print(line)
    if args.out:
        write_json_atomic(args.out, {"inputs": vars(args), "timing": timing, "targets": scores})
    return 0


if __name__ == "__main__":
    sys.exit(main())
