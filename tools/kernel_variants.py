"""The plugins' launch-configuration variants for engine A/B runs (benchmarks and diagnostics only), and one of
the lowering (pow-tensor): name -> a factory of the context in which the program is lowered and the plugins run.
`tools/bench_engines.py` builds engines of `recipe:<name>` inside it, `tools/diag/engine_kernels.py` and
`engine_export_check.py` list and export them."""
from __future__ import annotations

from unittest import mock

from int4_tiles import int4_tiles  # tools/, this module's folder


def variant_parts(variant: str | None) -> list[str]:
    """The variants joined with "+" in the variant of a `recipe:variant` name (none for a bare recipe)."""
    return variant.split("+") if variant else []


def _fp4_unfinished():
    """The FP4 op's one-dot buckets leaving fp32 sums to a cast kernel (`fp4_gemm.kernel.finished`)."""
    from qcompile.plugins.fp4_gemm import kernel  # Triton: imported where the variant is used

    return mock.patch.object(kernel, "ONE_DOT", kernel.finished(finish=False))


def _fp8_block_cublas_small_m():
    """The FP8 block op's sm90 cuBLASLt path at 1-16 rows too (`op.ROW_DOT_WITH_CUBLAS` off)."""
    from qcompile.plugins.fp8_block_gemm import op

    return mock.patch.object(op, "ROW_DOT_WITH_CUBLAS", False)


def _w8a16_mma_rows():
    """The W8A16 op's fp16 tensor-core kernel at 1-16 rows of fp16 x (`int8_wo_gemm.kernel.MMA_ROWS`): 8 warps a
    16-row tile, 2 blocks of 64 K a step (the H100 tuner's best at one row on the two layers with N = 4096)."""
    from qcompile.plugins.int8_wo_gemm import kernel

    return mock.patch.object(kernel, "MMA_ROWS", dict(warps=8, blocks=2))


def _pow_exponent_as_tensor():
    """Pow lowered without reading its constant exponent as a number (as before the forty-fifth session): the
    interpreter finds no prepare hook for it, so the exponent stays a 0-d tensor, which Inductor compiles to a
    libdevice pow per element (RMSNorm's square)."""
    from qcompile.lowering import interpreter
    from qcompile.lowering.ops import elementwise

    shipped = interpreter.prepare_hook
    return mock.patch.object(interpreter, "prepare_hook",
                             lambda converter: None if converter is elementwise.pow_ else shipped(converter))


KERNEL_VARIANTS = {
    "int4-pointers": lambda: int4_tiles(pointers=True),  # the INT4 op without its TMA tiles
    # the INT4 GEMV (M = 1) too writes its output in x's dtype with the bias (the last split of each tile, counted
    # by an atomic), as the shipped 16- and 64-row buckets do: no cast kernel after it. In the engine it lost: each
    # GEMV took 1.0-2.6 µs more, more than the 1.2 µs cast it saves (H100, BENCHMARKS.md thirty-seventh session)
    "int4-gemv-finish": lambda: int4_tiles(finish=("gemv",)),
    # the INT4 and FP4 one-dot buckets as before the thirty-seventh session: fp32 sums, then a cast kernel
    "int4-unfinished": lambda: int4_tiles(unfinished=True),
    # the one-row GEMV making its x pairs per step from fp32 x with a scale per step, as before the forty-first
    # session (`x_pairs` off; x's own fp16 values as the pairs took 2.2% off the decode step on an H100)
    "int4-gemv-step-pairs": lambda: int4_tiles(gemv_x_pairs=False),
    # the one-row GEMV on tensor cores (`mma_gemv`: mma.sync with the planar words as the A operand; 1.9 SASS
    # instructions per weight against the fp16x2 GEMV's 3.05), 2 warps of 64 columns, K split for 32 waves, a tile's
    # two rows in adjacent columns (one int64 load per word row). On the H100 the op was 2% faster on the down
    # projection and 3-13% slower on the other decode layers: from HBM it runs no faster; from L2 it is 26% faster
    # (BENCHMARKS.md, forty-second session)
    "int4-gemv-mma": lambda: int4_tiles(gemv_mma=dict(warps=2, waves=32, paired=True)),
    "fp4-unfinished": _fp4_unfinished,
    # the FP8 block op's sm90 cuBLASLt path at every M, its Triton row kernel (x quantized in aten ops, which fuse into
    # x's producer) not taken at 1-16 rows: faster at the op level on all four kernel-target layers in three runs
    # (BENCHMARKS.md, thirty-fourth session, part 3: "cuBLASLt, no bias" against the op); in the engine it lost: 0.238
    # against 0.190 ms per token on mlp-large (H100, thirty-fifth session, part 3), so the row kernel stays
    "fp8-block-cublas-small-m": _fp8_block_cublas_small_m,
    # W8A16 at 1-16 rows of fp16 x on the fp16 tensor cores (`mma_rows`) in place of the GEMV, the row dot and the
    # split INT8 MMA kernels; on the H100, in this configuration, the op was 3-21% slower than the shipped paths at
    # one row and 24-72% slower at 16 rows on the kernel-target layers (BENCHMARKS.md, forty-third session)
    "w8a16-mma-rows": _w8a16_mma_rows,
    # the lowering as before the forty-fifth session: RMSNorm's square a libdevice pow with a tensor exponent, not
    # x * x (1224 against 328 sm_90 SASS instructions in llama3-8b-layers' first norm: tools/diag/pow_sass.py)
    "pow-tensor": _pow_exponent_as_tensor,
}
