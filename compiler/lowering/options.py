"""How a graph is lowered (`LoweringOptions`): the choices an engine build makes once, read by converters through
`NodeContext.options`, instead of each travelling its own way (an argument, a context field, a module global)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP4_LAYOUTS = ("bytes", "planar", "pairs")


@dataclass(frozen=True)
class LoweringOptions:
    """`compute_dtype`: run floating-point math in this dtype (e.g. torch.float16; outputs keep their declared ONNX
    dtype); None keeps the graph's own dtypes.
    `fp8_large_m`: the INT4 and FP4 GEMM plugins run above 128 rows in FP8 (`plugins/fp8_large_m.py`; emulated off
    CUDA).
    `fp4_layout`: FP4 plugin weights stored as "bytes" (uint8 [N, K/2] codes), "planar" words (K a multiple of 128;
    `plugins/fp4_gemm/format.to_planar_words`, the layout of the planar kernels) or "pairs" (planar words in row
    pairs where N is even too, `format.to_row_pairs`; CUDA engines' default)."""

    compute_dtype: torch.dtype | None = None
    fp8_large_m: bool = False
    fp4_layout: str = "bytes"

    def __post_init__(self):
        if self.fp4_layout not in FP4_LAYOUTS:
            raise ValueError(f"fp4_layout {self.fp4_layout!r} is not an FP4 engine layout; use one of "
                             f"{', '.join(FP4_LAYOUTS)}")

    @classmethod
    def for_engine(cls, device: str, *, fp8_large_m: bool = False, fp4_layout: str | None = None) -> LoweringOptions:
        """An engine's lowering on `device` ("cpu", "cuda[:i]"): CUDA engines compute in fp16 and store FP4 weights
        as planar words in row pairs (planar words beat bytes on the H200 at 1-128 rows; row pairs beat planar words
        by 3-8% at 16 rows on the H100; BENCHMARKS.md); CPU engines keep fp32 and bytes (the CPU reference would
        convert words back on every call). `fp4_layout` overrides the layout (A/B builds)."""
        cuda = str(device).startswith("cuda")
        return cls(compute_dtype=torch.float16 if cuda else None, fp8_large_m=fp8_large_m,
                   fp4_layout=fp4_layout or ("pairs" if cuda else "bytes"))
