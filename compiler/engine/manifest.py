"""The engine manifest: what an engine file says about itself (versions, device, I/O, recipe, layers).

Stored as `manifest.json` beside `model.pt2` in the engine zip. `to_json`/`from_json` round-trip;
keys a newer writer adds that this reader does not know are kept in `extra`.
"""
from __future__ import annotations

import dataclasses
import json
import keyword
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qcompile.errors import EngineError
from qcompile.iospec import TORCH_DTYPES, HasIO, IOSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PACKAGE_NAME = "model.pt2"
QUANTIZED_ONNX_NAME = "quantized.onnx"  # the quantized plugin graph (per-layer validation reads it)

DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
# Keys the caller's `manifest` dict may set as first-class fields (anything else lands in `extra`).
CALLER_FIELDS = ("recipe", "layers", "content_hash", "calibration", "timings")
LAYER_KEYS = ("node", "op", "format", "granularity", "bytes_before", "bytes_after", "plugin")


def check_specs(specs: list[IOSpec]) -> None:
    """What an engine needs of its I/O specs: known dtypes, dynamic dim names that are Python identifiers."""
    for spec in specs:
        if spec.dtype not in TORCH_DTYPES:
            raise EngineError(f"{spec.name!r}: dtype {spec.dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        for dim in spec.dynamic_dims.values():
            if not dim.isidentifier() or keyword.iskeyword(dim):
                raise EngineError(f"{spec.name!r}: dynamic dim name {dim!r} must be a Python identifier")


def merge_dim_ranges(specs: list[IOSpec]) -> dict[str, tuple[int, int]]:
    """One (min, max) per dynamic dim name across `specs`; every dynamic dim needs a range somewhere."""
    ranges: dict[str, tuple[int, int]] = {}
    for spec in specs:
        for name, rng in spec.dim_ranges.items():
            lo, hi = rng
            if not 0 <= lo <= hi:
                raise EngineError(f"{spec.name!r}: dim {name!r} range {rng} must satisfy 0 <= min <= max")
            if name in ranges and ranges[name] != rng:
                raise EngineError(f"dim {name!r} has range {ranges[name]} on one input and {rng} on {spec.name!r}")
            ranges[name] = rng
    for spec in specs:
        for dim in spec.shape:
            if isinstance(dim, str) and dim not in ranges:
                raise EngineError(f"{spec.name!r}: dynamic dim {dim!r} has no (min, max) in dim_ranges")
    return ranges


def dtype_name(dtype: torch.dtype | np.dtype | str) -> str:
    """The numpy-style name of a torch or numpy dtype."""
    if isinstance(dtype, torch.dtype):
        return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return np.dtype(dtype).name


@dataclass
class Manifest(HasIO):
    """Everything an engine file records about how and where it was built."""

    qcompile_version: str
    torch_version: str
    cuda_version: str | None
    device: str  # "cpu" | "cuda"
    device_name: str
    compute_capability: str | None  # "9.0" on an H200; None on CPU
    cpu_isa: str | None
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    dim_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    recipe: dict | None = None
    layers: list[dict] = field(default_factory=list)
    content_hash: str | None = None
    calibration: Any = None
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["inputs"] = [s.to_dict() for s in self.inputs]
        d["outputs"] = [s.to_dict() for s in self.outputs]
        d["dim_ranges"] = {k: list(v) for k, v in self.dim_ranges.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=_json_default)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = dict(kwargs.pop("extra", {}) or {})
        extra.update({k: v for k, v in d.items() if k not in known})
        kwargs["inputs"] = [IOSpec.from_dict(s) for s in d["inputs"]]
        kwargs["outputs"] = [IOSpec.from_dict(s) for s in d["outputs"]]
        check_specs(kwargs["inputs"] + kwargs["outputs"])
        kwargs["dim_ranges"] = {k: tuple(v) for k, v in d.get("dim_ranges", {}).items()}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls.from_dict(json.loads(text))

    def with_caller_fields(self, caller: dict) -> Manifest:
        """A copy holding the caller's recipe/layers/hash/calibration/timings (others go to `extra`)."""
        caller = dict(caller or {})
        layers = caller.get("layers", [])
        for i, row in enumerate(layers):
            missing = [k for k in LAYER_KEYS if k not in row]
            if missing:
                raise EngineError(f"manifest layers[{i}] ({row.get('node', '?')!r}) lacks keys {missing}")
        known = {k: caller.pop(k) for k in CALLER_FIELDS if k in caller}
        return dataclasses.replace(self, **known, extra={**self.extra, **caller})


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    raise TypeError(f"manifest value of type {type(obj).__name__} is not JSON-serializable: {obj!r}")
