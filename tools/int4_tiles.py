"""The INT4 op's launch configurations swapped for an A/B run (benchmarks only): its buckets without their TMA
tiles, or with the TMA tiles from another smallest N. The op reads `kernel.CONFIGS` each time it runs or is
traced, so eager calls and engine builds inside the context take the swapped buckets."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def int4_tiles(pointers: bool = False, tma_min_n: int | None = None, finish: tuple[str, ...] = (),
               unfinished: bool = False, gemv_x_pairs: bool | None = None, gemv_mma: dict | None = None):
    """`kernel.CONFIGS` without its TMA tiles (pointers: every load through pointers, `kernel.pointer_tiles`), or
    with them from N = tma_min_n; `finish`: the buckets of these kernels ("gemv", "one_dot") also write their output
    with the cast and bias in the kernel, `unfinished`: none does (`kernel.finished`); `gemv_x_pairs`: the GEMV
    bucket's "x_pairs" set to it (`gemv.launch_gemv`); `gemv_mma`: the GEMV bucket's "mma" tile (the tensor-core
    GEMV, `mma_gemv`; {} for none)."""
    from qcompile.plugins.int4_gemm import kernel

    shipped = kernel.CONFIGS
    if pointers:
        kernel.CONFIGS = kernel.pointer_tiles(shipped)
    elif tma_min_n is not None:
        kernel.CONFIGS = [(limit, dict(cfg, tma=dict(cfg["tma"], min_n=tma_min_n)) if "tma" in cfg else cfg)
                          for limit, cfg in shipped]
    if unfinished:
        kernel.CONFIGS = kernel.finished(kernel.CONFIGS, finish=False)
    if finish:
        kernel.CONFIGS = kernel.finished(kernel.CONFIGS, finish)
    gemv = {key: value for key, value in (("x_pairs", gemv_x_pairs), ("mma", gemv_mma)) if value is not None}
    if gemv:
        kernel.CONFIGS = [(limit, dict(cfg, **gemv) if cfg["kernel"] == "gemv" else cfg)
                          for limit, cfg in kernel.CONFIGS]
    try:
        yield
    finally:
        kernel.CONFIGS = shipped
