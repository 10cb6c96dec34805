"""Print the one-dot row-copy A/B of `tune_fp4_gemm.py --planar --row-words` as a table: µs per candidate and INT4 op
/ candidate (issue 5's ratio, >= 0.909 is within 10%), one line per (K x N, M).

    python3 tools/diag/row_words_table.py tune_fp4_planar_rw.json

Not part of the product.
"""
from __future__ import annotations

import json
import sys


def label(name: str) -> str:
    """A short name for a candidate: "shipped", or the one-dot tile's fields that vary."""
    if not name.startswith("one_dot "):
        return name
    cfg = json.loads(name[len("one_dot "):])
    tma = f" tma(min_k {cfg['tma'].get('min_k', 0)})" if "tma" in cfg else ""
    return f"n{cfg['BLOCK_N']} w{cfg['waves']} rw{cfg.get('row_words', 8)}{tma}"


def main() -> None:
    rows = json.load(open(sys.argv[1]))
    rows = rows["rows"] if isinstance(rows, dict) else rows
    for row in rows:
        cells = [(label(name), r["us"]) for name, r in row["nvfp4"].items()
                 if "us" in r and (name.startswith("one_dot") or name == "planar shipped")]
        text = "  ".join(f"{name} {us:.1f} ({row['int4_op'] / us:.2f})" for name, us in cells)
        print(f"{row['K']}x{row['N']} M={row['M']}: int4 {row['int4_op']:.1f} bf16 {row['bf16']:.1f} | {text}")
        errors = {label(name): r["error"] for name, r in row["nvfp4"].items() if "error" in r}
        if errors:
            print("    failed:", errors)


if __name__ == "__main__":
    main()
