"""The engine's one-row model: the program exported a second time with every dynamic dim fixed at 1, for decoding.

With a symbolic row count M (every engine with dynamic batch or sequence dims) the plugins' GEMMs choose their
kernel by M with a chain of `torch.cond` (`plugins/gemm_dispatch.run_by_buckets`). Inductor compiles each branch on
its own, so nothing outside the op fuses with what runs inside it: the one-row GEMV's zero fill, the GEMV and the
cast of its fp32 sums to the output dtype stay three kernels (BENCHMARKS.md, thirty-eighth session).

Exported at one row, the program has static shapes: each plugin sees M = 1 as a Python int (its GEMV, no cond) and
Inductor fuses across the graph. The engine package holds both compiled models on one copy of the weights
(`engine/build.py`), and the loader runs the one-row model when a call has every dynamic dim at 1 (a decode step
of one token) and the other model otherwise (`engine/load.py`).
"""
from __future__ import annotations

import torch

from qcompile.iospec import IOSpec

ONE_ROW_MODEL = "one_row"  # the one-row model's name in the AOTInductor package (the other is "model")


def allows_one_row_model(inputs: list[IOSpec], outputs: list[IOSpec], dim_ranges: dict) -> bool:
    """Whether the program can have a one-row model: some dynamic dim, each of whose ranges holds 1, and every output
    dim carried by an input (so that fixing the inputs' dims at 1 fixes the outputs')."""
    in_dims = {name for spec in inputs for name in spec.dynamic_dims.values()}
    out_dims = {name for spec in outputs for name in spec.dynamic_dims.values()}
    return bool(in_dims) and out_dims <= in_dims and all(dim_ranges[d][0] <= 1 <= dim_ranges[d][1] for d in in_dims)


def narrow_to_one_row(x: torch.Tensor, spec: IOSpec) -> torch.Tensor:
    """x, the input `spec`, with each dynamic axis narrowed to its first entry (a contiguous copy: an export's
    example input)."""
    for axis in spec.dynamic_dims:
        x = x.narrow(axis, 0, 1)
    return x.contiguous()


def at_one_row(args: list[torch.Tensor], inputs: list[IOSpec]) -> bool:
    """Whether the checked inputs `args` (in the order of `inputs`) have every dynamic dim at 1."""
    return all(x.shape[axis] == 1 for x, spec in zip(args, inputs) for axis in spec.dynamic_dims)


def one_row_shape(spec: IOSpec) -> list[int]:
    """The shape of `spec` with every dynamic dim at 1."""
    return [1 if isinstance(d, str) else d for d in spec.shape]
