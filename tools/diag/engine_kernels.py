"""The GPU kernels a CUDA engine would launch, listed on a machine without a GPU.

Builds the plugin graph of `source` with each recipe (CPU, random calibration), lowers it as a CUDA engine
(`LoweringOptions.for_engine("cuda")`, sibling fusion on), exports it with the engine's dynamic dims on fake CUDA
tensors (an H200, sm_90, 132 SMs, is what torch is told it has) and runs Inductor's code generation with kernel
compilation stubbed out. Prints, per recipe, the kernels of the generated wrapper in launch order: Inductor's fused
Triton kernels (`triton_poi_*` pointwise, `triton_red_*` / `triton_per_*` reductions), our plugins' Triton kernels
and the extern calls (cuBLAS mm/addmm/bmm), with the plugins' GEMMs on the path of `--rows` rows (their other M buckets
left out). The decode step's kernel count, and what an Inductor option does to it, can so be read without a GPU;
their times still need one (`tools/bench_engines.py --profile`).

    python3 tools/diag/engine_kernels.py llama3-8b-layers --recipes fp16 w4a16_rtn
    python3 tools/diag/engine_kernels.py llama3-8b-layers --recipes fp16 --inductor combo_kernels=True,persistent=4096
    python3 tools/diag/engine_kernels.py llama3-8b-layers --recipes fp16 fp16:no-attention-fusion
    python3 tools/diag/engine_kernels.py llama3-8b-layers --recipes w4a16_rtn w4a16_rtn:int4-gemv-finish
    python3 tools/diag/engine_kernels.py llama3-8b-layers --recipes w4a16_rtn --rows 0   # the one-row model
    (each --inductor set is listed after the defaults; the graph is built once per recipe)

How this differs from an engine build: Inductor's wrapper is the Python one (`compile_fx`; AOTInductor's C++
wrapper launches the same kernels); uniform-value constant folding is off (it runs ops on real CUDA tensors), and the
engine's constants stay graph inputs, so AOTInductor's inlining of 0-d constants is not seen (the fake-CUDA export
tests check for 0-d launch arguments instead: `qc_testutil.no_0d_launch_arguments`); the
plugins' `torch.cond` over M is replaced by the `--rows` path; and the code comes from this machine's torch, which
may differ from the GPU machine's. `--code DIR` keeps each wrapper for reading. Not part of the product.
"""
from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import io
import re
import sys
import types
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/
from inductor_variants import persistent_reductions_up_to  # noqa: E402
from kernel_variants import KERNEL_VARIANTS, variant_parts  # noqa: E402

H200 = types.SimpleNamespace(multi_processor_count=132, major=9, minor=0, name="NVIDIA H200", warp_size=32,
                             max_threads_per_multi_processor=2048, total_memory=141 * 2**30,
                             regs_per_multiprocessor=65536, shared_memory_per_block_optin=232448,
                             L2_cache_size=60 * 2**20, gcnArchName="", index=0, type="cuda")
PERSISTENT = "persistent"  # an option set's key, not an Inductor config: `inductor_variants.PersistentUpTo(value)`
LAUNCH = re.compile(r"^\s*(?:buf\w+ = )?(?P<name>\w+)\.run\(|(?P<extern>extern_kernels\.\w+)\(")
SUBGRAPH = re.compile(r"^def (?P<name>\w+)\(|^class (?P<cls>\w+)")


class NoGpuDriver:
    """Triton's driver as far as code generation asks: an sm_90 target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def fake_h200():
    """torch believes an H200 is there; Triton kernels are generated but not compiled (the sources are kept)."""
    import torch._inductor.async_compile as async_compile
    import torch.utils._triton as triton_utils
    from torch._dynamo.device_interface import CudaInterface

    class NotCompiled:
        def __init__(self, name):
            self.name = name

        def run(self, *args, **kwargs):
            raise RuntimeError(f"{self.name} was generated, not compiled (engine_kernels.py)")

    patches = [(triton_utils, "has_triton", lambda: True),
               (triton_utils, "has_triton_tensor_descriptor_host_tma", lambda: True),
               (triton_utils, "triton_hash_with_backend", lambda: "engine-kernels"),
               (triton_utils, "triton_backend", lambda: None),
               (torch.cuda, "get_device_properties", lambda *_: H200),
               (torch.cuda, "get_device_capability", lambda *_: (9, 0)),
               (CudaInterface, "get_device_properties", staticmethod(lambda *_: H200)),
               (CudaInterface, "get_compute_capability", staticmethod(lambda *_: 90)),
               (CudaInterface, "raise_if_triton_unavailable", staticmethod(lambda *_: None)),
               (CudaInterface.Worker, "get_device_properties", staticmethod(lambda *_: H200)),
               (async_compile.AsyncCompile, "triton", lambda self, name, src, *a, **k: NotCompiled(name)),
               (async_compile.AsyncCompile, "wait", lambda self, scope: None)]
    originals = {id(getattr(obj, attr)): value for obj, attr, value in patches[:4]}
    for name, module in list(sys.modules.items()):  # `from torch.utils._triton import has_triton` copies
        if name.startswith(("torch._inductor", "torch._dynamo")) and module is not None:
            patches += [(module, attr, originals[id(value)]) for attr, value in list(vars(module).items())
                        if callable(value) and id(value) in originals]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    before = triton.runtime.driver._active  # None until a driver is asked for (reset_active would make one)
    triton.runtime.driver.set_active(NoGpuDriver())  # what user kernels' mutation analysis asks of a driver
    try:
        yield
    finally:
        triton.runtime.driver._active = before
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def engine_program(source: str, recipe: str):
    """(the lowered CUDA-engine program of `source` with `recipe`, the source) from a CPU graph build;
    `recipe:no-attention-fusion` keeps attention written out (`qcompile build --no-attention-fusion`),
    `recipe:fp8-large-m` lowers the 4-bit GEMMs with their FP8 path above 128 rows (`--fp8-large-m`);
    `recipe:<plugin variant>` (`kernel_variants.KERNEL_VARIANTS`, e.g. int4-gemv-finish) is listed with that launch
    configuration (`kernel_configs`); `recipe:a+b` joins variants, as `tools/bench_engines.py` does."""
    import qcompile
    from qcompile.frontend import load_source
    from qcompile.lowering import LoweringOptions, lower_onnx
    from qcompile.passes import prepare_for_engine

    recipe, _, variant = recipe.partition(":")
    parts = variant_parts(variant)
    variants = ("no-attention-fusion", "fp8-large-m", *KERNEL_VARIANTS)
    for part in parts:
        if part not in variants:
            raise SystemExit(f"unknown variant {part!r} (known: {', '.join(variants)})")
    built = qcompile.build(source, recipe, output=None, calib="random", device="cpu", progress_stream=io.StringIO())
    engine_model, _ = prepare_for_engine(built.plugin_model, attention="no-attention-fusion" not in parts)
    src = load_source(source, opset=built.recipe.opset)
    options = LoweringOptions.for_engine("cuda", fp8_large_m="fp8-large-m" in parts)
    return lower_onnx(engine_model, options), src


@contextlib.contextmanager
def bucket_of(rows: int):
    """The plugins' GEMMs take the path of `rows` rows instead of a `torch.cond` over their M buckets (Inductor's
    Python wrapper cannot generate cond branches over a product of dims; AOTInductor's C++ one can)."""
    from qcompile.plugins import gemm_dispatch

    chain = gemm_dispatch._cond_chain
    gemm_dispatch._cond_chain = lambda m, buckets, operands: gemm_dispatch.bucket_for(buckets, rows)(*operands)
    try:
        yield
    finally:
        gemm_dispatch._cond_chain = chain


@contextlib.contextmanager
def kernel_configs(recipe: str):
    """The context the plugin kernels of `recipe`'s variants are configured in while its wrapper is generated
    (`kernel_variants.KERNEL_VARIANTS`; none for the others)."""
    with contextlib.ExitStack() as stack:
        for part in variant_parts(recipe.partition(":")[2]):
            if part in KERNEL_VARIANTS:
                stack.enter_context(KERNEL_VARIANTS[part]())
        yield


def export_on_fake_h200(program, src, one_row_model: bool = False):
    """`program` exported as the engine build exports it (`engine.build._export_program`, with its Dynamo settings),
    on fake CUDA tensors; call inside `fake_h200()`. `one_row_model`: the build's one-row model (every dynamic dim
    at 1, static shapes) instead, which must then export (RuntimeError otherwise, where the build would go on
    without it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qcompile.engine.build import _export_program
    from qcompile.engine.manifest import merge_dim_ranges

    with FakeTensorMode(allow_non_fake_inputs=True):
        program = program.to("cuda")
        feed = src.engine_example()
        examples = tuple(torch.from_numpy(feed[n]).to("cuda") for n in program.input_names)
        ep, ep_one = _export_program(program, src.inputs, src.outputs, examples,
                                     merge_dim_ranges(src.inputs + src.outputs), one_row_model)
    if one_row_model and ep_one is None:
        raise RuntimeError("the one-row model did not export (the build's warning above says why)")
    return ep_one if one_row_model else ep


def wrapper_code(program, src, inductor: dict, rows: int) -> str:
    """Inductor's Python wrapper for `program` exported as the engine exports it, on fake CUDA tensors, with the
    plugins' GEMMs on their `rows`-row path; rows 0: the engine's one-row model (every dynamic dim at 1, so the
    plugins see M = 1 as an int)."""
    from torch._inductor.compile_fx import compile_fx

    from qcompile.engine.build import exact_numerics_configs

    codes = []
    real_load = torch._inductor.codecache.PyCodeCache.load_by_key_path

    def keep_source(key, path, *args, **kwargs):
        codes.append(Path(path).read_text())
        return real_load(key, path, *args, **kwargs)

    with fake_h200(), bucket_of(rows), torch.no_grad():
        ep = export_on_fake_h200(program, src, one_row_model=not rows)
        user = set(ep.graph_signature.user_inputs)  # their fake values carry the dynamic dims
        symbolic = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
        torch._inductor.codecache.PyCodeCache.load_by_key_path = keep_source
        try:
            # uniform-value constant folding runs ops on real (here absent) CUDA tensors; a cached graph would
            # hide what an option set changes
            no_gpu = {"joint_graph_constant_folding": False, "force_disable_caches": True}
            inductor = dict(inductor)
            persistent = inductor.pop(PERSISTENT, 0)
            choices = persistent_reductions_up_to(persistent) if persistent else contextlib.nullcontext()
            with torch._inductor.config.patch({**exact_numerics_configs(), **no_gpu, **inductor}), choices:
                compile_fx(ep.module(), symbolic)
        finally:
            torch._inductor.codecache.PyCodeCache.load_by_key_path = real_load
    return max(codes, key=len)


def launches(code: str) -> dict[str, list[str]]:
    """The kernels launched by each function of the wrapper (`call`, and the cond branches' subgraph runners), in
    order."""
    order, where = collections.OrderedDict(), None
    for line in code.splitlines():
        head = SUBGRAPH.match(line)
        if head:
            where = head["name"] or head["cls"]
            continue
        hit = LAUNCH.search(line)
        if hit and where:
            order.setdefault(where, []).append(hit["name"] or hit["extern"])
    return {k: v for k, v in order.items() if v}


def parse_options(text: str) -> dict:
    """"key=value,key=value" (values Python literals) -> Inductor options."""
    out = {}
    for pair in filter(None, text.split(",")):
        key, _, value = pair.partition("=")
        if not value:
            raise SystemExit(f"engine_kernels: --inductor takes key=value[,key=value], got {pair!r}")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--recipes", nargs="+", default=["fp16"])
    ap.add_argument("--inductor", action="append", default=[],
                    help="an Inductor option set key=value[,key=value] to list beside the defaults (repeatable); "
                         "persistent=N: row reductions up to N persistent (tools/inductor_variants.py)")
    ap.add_argument("--rows", type=int, default=1, help="the plugins' M bucket to list (default 1: decoding; 0: the "
                                                        "engine's one-row model, every dynamic dim at 1)")
    ap.add_argument("--code", type=Path, help="write each wrapper to CODE/<recipe>[-<n>].py")
    args = ap.parse_args(argv)
    option_sets = [{}] + [parse_options(text) for text in args.inductor]
    for recipe in args.recipes:
        with kernel_configs(recipe):  # a variant may set how the program is lowered, too
            program, src = engine_program(args.source, recipe)
        for index, inductor in enumerate(option_sets):
            with kernel_configs(recipe):
                code = wrapper_code(program, src, inductor, args.rows)
            if args.code:
                args.code.mkdir(parents=True, exist_ok=True)
                (args.code / f"{recipe}{f'-{index}' if index else ''}.py").write_text(code)
            path = f"their {args.rows}-row path" if args.rows else "the one-row model (static shapes)"
            print(f"=== {args.source} {recipe}, plugin GEMMs on {path}, "
                  f"{inductor or 'Inductor defaults'}")
            for function, kernels in launches(code).items():
                print(f"  {function}: {len(kernels)} launches")
                for name, count in collections.Counter(kernels).items():
                    print(f"    {count} x {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
