"""Does a CUDA engine of `source` export and re-trace, per recipe? Checked on a machine without a GPU.

For each recipe: the CPU graph build and the CUDA engine's lowering (`engine_kernels.engine_program`), then the
engine build's export (`engine_kernels.export_on_fake_h200`, with the plugins' M buckets as `torch.cond` chains) on
fake CUDA tensors (torch is told it has an H200), under the build's Dynamo settings (`static_branch_ints`), then
the re-trace AOTInductor runs first (`run_decompositions`). What stays unchecked is Inductor's code generation and
the kernels' compilation (`engine_kernels.py` generates the code, without the `torch.cond` chains). The W8A16
engine of llama3-8b-layers failed here the way it failed on the H200 (thirty-fourth session), before
`static_branch_ints`. Prints one line per recipe; exits 1 if any failed.

    python3 tools/diag/engine_export_check.py llama3-8b-layers --recipes w8a16 w4a16_awq nvfp4
    python3 tools/diag/engine_export_check.py llama3-8b-layers --recipes w4a16_rtn:int4-gemv-finish   # a variant
    python3 tools/diag/engine_export_check.py llama3-8b-layers --recipes w4a16_awq --one-row-model
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_kernels import engine_program, export_on_fake_h200, fake_h200, kernel_configs  # noqa: E402


def export_and_retrace(program, src, one_row_model: bool = False) -> int:
    """The engine's export and AOTInductor's re-trace of `program` on fake CUDA tensors (`one_row_model`: with the
    build's one-row model); returns the plugin nodes."""
    from qcompile.engine.build import static_branch_ints

    with fake_h200(), torch.no_grad():
        ep = export_on_fake_h200(program, src, one_row_model)
        with static_branch_ints():
            ep = ep.run_decompositions()
    return sum(1 for gm in ep.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)  # torch.cond branches too
               for n in gm.graph.nodes if n.op == "call_function" and "qcompile" in str(n.target))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--recipes", nargs="+", default=["fp16"])
    ap.add_argument("--traceback", action="store_true", help="print the full traceback of a failure")
    ap.add_argument("--one-row-model", action="store_true", help="export with the build's one-row model")
    args = ap.parse_args(argv)
    failed = 0
    for recipe in args.recipes:
        t0 = time.perf_counter()
        try:
            program, src = engine_program(args.source, recipe)
            with kernel_configs(recipe):  # a variant's plugin configurations (`engine_kernels.kernel_configs`)
                plugins = export_and_retrace(program, src, args.one_row_model)
            print(f"{recipe:<24} ok      {plugins:3d} plugin nodes  {time.perf_counter() - t0:6.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: report and go on with the next recipe
            failed += 1
            print(f"{recipe:<24} FAILED  {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
            if args.traceback:
                traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
