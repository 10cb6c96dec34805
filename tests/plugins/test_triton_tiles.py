"""Tests of the plugins' shared Triton helpers (`plugins/triton_tiles.py`) that need no GPU."""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

KERNEL_MODULES = [
    "qcompile.plugins.int4_gemm.kernel", "qcompile.plugins.int4_gemm.one_dot", "qcompile.plugins.fp4_gemm.kernel",
    "qcompile.plugins.fp8_block_gemm.kernel", "qcompile.plugins.int8_wo_gemm.kernel",
    "qcompile.plugins.int8_wo_gemm.split_mma",
]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs triton, compiled (not the CPU interpreter)")
def test_kernels_with_a_row_count_compile_for_any_m():
    """Every launched plugin kernel that takes M (and M_OUT) compiles it as any value, as an engine with a dynamic
    M does: Triton would otherwise compile eager calls at M = 1 or a multiple of 16 apart, and benchmarks would
    time code that engines never run. Found by scanning the modules, so a new kernel is checked too."""
    import triton

    checked = []
    for name in KERNEL_MODULES:
        for attr, fn in vars(importlib.import_module(name)).items():
            if isinstance(fn, triton.runtime.JITFunction) and attr.endswith("_kernel"):
                rows = [p for p in fn.params if p.name in ("M", "M_OUT")]
                assert all(p.do_not_specialize for p in rows), (
                    f"{name}.{attr}: {[p.name for p in rows if not p.do_not_specialize]} specialized; "
                    "decorate it with triton_tiles.jit_any_m")
                checked += [attr] if rows else []
    assert len(checked) >= 10, checked  # the scan found the kernels (int4, fp4, fp8 block, int8 weight-only)
