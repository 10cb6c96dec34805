"""`OneRowBranch`: an engine program with a second copy of itself traced at one row, for decoding.

With a symbolic row count M (every engine with dynamic batch or sequence dims) the plugins' GEMMs choose their
kernel by M with a chain of `torch.cond` (`plugins/gemm_dispatch.run_by_buckets`). Inductor compiles each branch on
its own, so nothing outside the op fuses with what runs inside it: the one-row GEMV's zero fill, the GEMV and the
cast of its fp32 sums to the output dtype stay three kernels (BENCHMARKS.md, thirty-eighth session).

The wrapper puts one `torch.cond` around the whole program instead: when every dynamic dim is 1 (one token of one
sequence: a decode step), the program runs as traced with those dims fixed at 1, where each plugin sees M = 1 as a
Python int (its GEMV, no cond) and Inductor fuses across the graph (the cast into the kernel that reads the GEMV's
output). Otherwise the program runs as before. Both branches read the same weights: the engine holds one copy.
"""
from __future__ import annotations

import math

import torch

from qcompile.errors import EngineError
from qcompile.iospec import IOSpec


def one_row_dims(inputs: list[IOSpec], outputs: list[IOSpec], dim_ranges: dict) -> dict[str, tuple[int, int]]:
    """Where the branch reads each dynamic dim: name -> (input index, axis). Empty when the program cannot take a
    one-row branch: no dynamic dims, a dim whose range excludes 1, or an output dim that no input carries."""
    where: dict[str, tuple[int, int]] = {}
    for i, spec in enumerate(inputs):
        for axis, name in spec.dynamic_dims.items():
            where.setdefault(name, (i, axis))
    lo_hi = [dim_ranges[name] for name in where]
    out_dims = {name for spec in outputs for name in spec.dynamic_dims.values()}
    if not where or any(not lo <= 1 <= hi for lo, hi in lo_hi) or not out_dims <= where.keys():
        return {}
    return where


def narrow_to_one_row(x: torch.Tensor, spec: IOSpec) -> torch.Tensor:
    """x, the input `spec`, with each dynamic axis narrowed to its first entry (a view)."""
    for axis in spec.dynamic_dims:
        x = x.narrow(axis, 0, 1)
    return x


class OneRowBranch(torch.nn.Module):
    """`program(*inputs)`, with `torch.cond(every dynamic dim == 1, program at one row, program)`.

    `where`: `one_row_dims`' map (not empty). The one-row branch narrows each dynamic axis of the inputs to its
    first entry, so the traced program sees static shapes; its outputs must then have size 1 on every dynamic axis
    (checked while tracing: EngineError otherwise) and are returned with the symbolic shapes of the other branch
    (both contiguous, as `torch.cond` requires the same strides)."""

    def __init__(self, program: torch.nn.Module, inputs: list[IOSpec], outputs: list[IOSpec],
                 where: dict[str, tuple[int, int]]):
        super().__init__()
        self.program = program
        self.inputs, self.outputs, self.where = inputs, outputs, where

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The program's outputs as a tuple (also when it returns one tensor)."""
        sizes = {name: xs[i].shape[axis] for name, (i, axis) in self.where.items()}
        one_row = math.prod(sizes.values()) == 1  # dims are >= 0: a product of 1 means each is 1

        def run(*args):
            out = self.program.forward(*args)  # not its hooks: an exported graph's input checks run once, outside
            return (out,) if isinstance(out, torch.Tensor) else tuple(out)

        def at_one_row(*args):
            narrowed = [narrow_to_one_row(x, spec) for x, spec in zip(args, self.inputs)]
            return tuple(self._widen(y, spec, sizes) for y, spec in zip(run(*narrowed), self.outputs))

        def at_any_rows(*args):
            return tuple(y.contiguous() for y in run(*args))

        return tuple(torch.cond(one_row, at_one_row, at_any_rows, tuple(xs)))

    @staticmethod
    def _widen(y: torch.Tensor, spec: IOSpec, sizes: dict) -> torch.Tensor:
        """y (static shape, 1 on each dynamic axis of `spec`) as a contiguous tensor of the symbolic shape."""
        want = [1 if isinstance(d, str) else d for d in spec.shape]
        if list(y.shape) != want:
            raise EngineError(f"one-row branch: output {spec.name!r} has shape {list(y.shape)} at one row, "
                              f"expected {want} from its spec {spec.shape}")
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
        return torch.as_strided(y.contiguous(), shape, strides)
