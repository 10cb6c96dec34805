"""`IOSpec`: one model / engine input or output, shared by the front end, the pipeline and the engine.

The front end reads specs from the ONNX graph (with dim ranges and token-id value ranges), the pipeline
hands the same specs to the engine builder, and the engine manifest stores them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# numpy dtype name -> torch dtype (bfloat16 / float8 come from ml_dtypes on the numpy side)
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn,
}


@dataclass
class IOSpec:
    """One graph input or output.

    Attributes:
        name: the I/O name (feeds and results are keyed by it).
        dtype: numpy dtype name ("float32", "float16", "bfloat16", "int64", ...).
        shape: one entry per axis: an int (static) or a str (named dynamic dim, e.g. "batch").
        dim_ranges: inclusive (min, max) per named dim of `shape` whose range is known; a name shared by
            several inputs is one dim and has one range.
        value_range: for integer inputs, the valid values [low, high) (e.g. token ids (0, vocab)); None when
            any value of the dtype goes (floats: standard normal).
    """

    name: str
    dtype: str
    shape: list[int | str]
    dim_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    value_range: tuple[float, float] | None = None

    def __post_init__(self):
        self.shape = [d if isinstance(d, str) else int(d) for d in self.shape]
        self.dim_ranges = {k: (int(v[0]), int(v[1])) for k, v in self.dim_ranges.items()}
        if self.value_range is not None:
            self.value_range = tuple(self.value_range)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def dynamic_dims(self) -> dict[int, str]:
        """axis -> dim name of the dynamic axes."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dim_ranges": {k: list(v) for k, v in self.dim_ranges.items()},
                "value_range": None if self.value_range is None else list(self.value_range)}

    @classmethod
    def from_dict(cls, d: dict) -> IOSpec:
        return cls(d["name"], d["dtype"], list(d["shape"]), {k: tuple(v) for k, v in d.get("dim_ranges", {}).items()},
                   d.get("value_range"))


class HasIO:
    """`input_names` / `output_names` for a class with `inputs` and `outputs` lists of `IOSpec`."""

    inputs: list[IOSpec]
    outputs: list[IOSpec]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]
