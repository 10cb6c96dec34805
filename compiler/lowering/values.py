"""`IntList`: small integer data (shapes, axes, indices) kept as Python values while lowering.

`torch.export` needs shapes as Python ints / SymInts, not tensors: a `Reshape` whose shape is a
tensor buffer fails with a data-dependent guard. Shape outputs, small int initializers and the
arithmetic between them are therefore computed in Python, and only become tensors where a
tensor is really needed (`as_tensor`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_STATIC_ELEMENTS = 64


@dataclass(frozen=True)
class IntList:
    """Rank-0 (`scalar=True`, one value) or rank-1 integer data of Python ints / SymInts."""

    values: tuple
    scalar: bool = False
    dtype: torch.dtype = torch.int64

    @property
    def shape(self) -> tuple:
        return () if self.scalar else (len(self.values),)

    @property
    def ndim(self) -> int:
        return 0 if self.scalar else 1

    def item(self) -> Any:
        return self.values[0]

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "IntList":
        dtype = torch.int64 if array.dtype == np.int64 else torch.int32
        return cls(tuple(int(v) for v in array.reshape(-1)), array.ndim == 0, dtype)


def is_static_int(array: np.ndarray) -> bool:
    """Whether an initializer should stay a Python value (small integer data of rank <= 1)."""
    return array.dtype in (np.int64, np.int32) and array.ndim <= 1 and array.size <= MAX_STATIC_ELEMENTS


def as_tensor(value: Any, device: torch.device | None = None) -> torch.Tensor:
    """A tensor for `value` (an IntList becomes an int64/int32/bool tensor)."""
    if isinstance(value, IntList):
        if all(isinstance(v, int) for v in value.values):
            t = torch.tensor(value.values, dtype=value.dtype, device=device)
        else:  # SymInts: build from scalars so export keeps them symbolic
            t = torch.stack([torch.as_tensor(v, dtype=value.dtype, device=device) for v in value.values])
        return t.reshape(()) if value.scalar else t
    return value


def as_ints(value: Any) -> list:
    """Python ints (or SymInts) of an IntList or a small tensor (the latter only outside export)."""
    if isinstance(value, IntList):
        return list(value.values)
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [int(value)]
