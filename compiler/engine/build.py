"""`build_engine`: torch program -> torch.export (named dynamic dims) -> AOTInductor -> one engine file.

The engine file is a zip (stored, not deflated) holding `manifest.json` and `model.pt2`, written
atomically: a temp file in the destination folder, then `os.replace`; any failure (including
KeyboardInterrupt) removes the temp file and leaves the destination untouched.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch

import qcompile
from qcompile.engine import device as devinfo
from qcompile.engine.manifest import (
    FORMAT_VERSION, MANIFEST_NAME, PACKAGE_NAME, IOSpec, Manifest, check_specs, dtype_name, merge_dim_ranges,
)
from qcompile.engine.one_row import ONE_ROW_MODEL, allows_one_row_model, narrow_to_one_row, one_row_shape
from qcompile.engine.pdl import check_device as check_pdl_device, launches as pdl_launches
from qcompile.errors import EngineError

logger = logging.getLogger(__name__)

MODEL_NAME = "qcmodel"  # stable generated file names inside the package


def build_engine(
    program: torch.nn.Module,
    *,
    inputs: list[IOSpec],
    outputs: list[IOSpec],
    example_inputs: tuple[torch.Tensor, ...],
    manifest: dict | None,
    output_path: str | os.PathLike,
    device: str,
    inductor_configs: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
    one_row_model: bool = False,
    pdl: bool = False,
) -> Manifest:
    """Export `program`, compile it with AOTInductor and write the engine file at `output_path`.

    Args:
        program: the module to compile; `program(*example_inputs)` must run. Positional inputs follow `inputs`.
        inputs / outputs: I/O specs in call / return order; string dims are named dynamic dims.
        example_inputs: one tensor per input, on `device`, within the dim ranges (dynamic dims >= 2).
        manifest: caller fields: recipe, layers (rows node/op/format/granularity/bytes_before/bytes_after/
            plugin), content_hash, calibration, timings; other keys are kept under `extra`.
        output_path: the engine file to write (its folder must exist and be writable).
        device: "cpu" or "cuda[:index]", the device the engine is built for.
        inductor_configs: extra Inductor configs (e.g. {"max_autotune": True}).
        extra_files: more members of the engine zip, name -> bytes (e.g. the quantized ONNX graph).
        one_row_model: also compile the program with every dynamic dim at 1 (the one-row model, `one_row.py`),
            which the loader runs when a call has them all at 1 (a decode step). Where the specs do not allow it,
            or its export or compile fails, the engine is built without it (a warning says why); the manifest's
            `one_row_model` says which.
        pdl: launch the engine's Inductor kernels with programmatic dependent launch (`pdl.py`; CUDA, compute
            capability 9.0 or more); the manifest's `pdl` says so, and `pdl_kernels` how many kernels take it.

    Returns:
        The manifest written into the engine.

    Raises:
        EngineError: unwritable output path (checked before compiling), inconsistent specs or example
            inputs, or a failed export / compile (the message says which stage).
    """
    output_path = Path(output_path)
    check_writable(output_path)
    dev = devinfo.parse_device(device)
    if pdl:
        check_pdl_device(dev)
    check_specs(inputs + outputs)
    dim_ranges = merge_dim_ranges(inputs + outputs)
    _check_examples(inputs, example_inputs, dim_ranges, dev)
    info = devinfo.describe(dev)
    man = Manifest(
        qcompile_version=qcompile.__version__, inputs=list(inputs), outputs=list(outputs),
        dim_ranges=dim_ranges, **info,
    ).with_caller_fields(manifest or {})

    t0 = time.perf_counter()
    ep, ep_one = _export_program(program, inputs, outputs, example_inputs, dim_ranges, one_row_model)
    n_out = len(ep.graph_signature.user_outputs)
    if n_out != len(outputs):
        raise EngineError(f"the program returns {n_out} outputs but {len(outputs)} output specs were given")
    t1 = time.perf_counter()
    configs = _engine_configs(man, inductor_configs)
    if pdl:
        man.extra["pdl"] = True
    launches = pdl_launches() if pdl else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="qcompile-build-") as tmp, launches as pdl_kernels:
        package = None
        if ep_one is not None:
            package = _compile_with_one_row_model(ep, ep_one, Path(tmp) / PACKAGE_NAME, configs)
        if one_row_model:
            man.extra["one_row_model"] = package is not None
        if package is None:
            package = _compile(ep, Path(tmp) / PACKAGE_NAME, configs)
        t2 = time.perf_counter()
        if pdl:
            man.extra["pdl_kernels"] = len(pdl_kernels.launched)
            if not pdl_kernels.launched:
                logger.warning("--pdl: no kernel's launch code takes the PDL launch (%d compiled kernels wait for "
                               "the one before them); every launch stays plain", len(pdl_kernels.waiting))
        man.timings = {**man.timings, "export_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}
        write_engine_file(output_path, man, package, extra_files)
    logger.info("wrote engine %s (export %.1fs, compile %.1fs)", output_path, t1 - t0, t2 - t1)
    return man


def check_writable(path: Path, what: str = "engine") -> None:
    """Fail early (before any expensive stage) when `path` (the `what` file, e.g. "engine") cannot be written.

    Checks that the path is not a folder, that its folder exists and is writable (permissions, then a probe
    file, which also catches read-only file systems and root on them)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise EngineError(f"{what} output path {str(path)!r} is a directory; give a file name, "
                          f"e.g. {str(path / 'model.engine')!r}")
    if not parent.is_dir():
        raise EngineError(f"cannot write {what} {str(path)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EngineError(f"cannot write {what} {str(path)!r}: no write permission")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise EngineError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _check_examples(inputs, examples, dim_ranges, dev) -> None:
    if len(examples) != len(inputs):
        raise EngineError(f"{len(examples)} example inputs given for {len(inputs)} input specs")
    for spec, t in zip(inputs, examples):
        if not isinstance(t, torch.Tensor):
            raise EngineError(f"example input {spec.name!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != spec.torch_dtype:
            raise EngineError(f"example input {spec.name!r}: dtype {dtype_name(t.dtype)}, spec says {spec.dtype}")
        if t.device.type != dev.type:
            raise EngineError(f"example input {spec.name!r} is on {t.device}, engine device is {dev}")
        if t.dim() != len(spec.shape):
            raise EngineError(f"example input {spec.name!r}: rank {t.dim()}, spec shape {spec.shape}")
        for axis, (dim, size) in enumerate(zip(spec.shape, t.shape)):
            if isinstance(dim, int) and dim != size:
                raise EngineError(f"example input {spec.name!r}: dim {axis} is {size}, spec says {dim}")
            if isinstance(dim, str):
                lo, hi = dim_ranges[dim]
                if not (max(lo, 2) <= size <= hi):
                    raise EngineError(
                        f"example input {spec.name!r}: dynamic dim {dim!r} (axis {axis}) is {size}; it must lie in "
                        f"[{max(lo, 2)}, {hi}] (torch.export specializes sizes 0 and 1)")


def _export_program(program, inputs, outputs, examples, dim_ranges, one_row_model: bool):
    """(`program` exported with its dynamic dims, `program` exported at one row or None): the second when asked and
    possible (`one_row.py`)."""
    ep = _export(program, inputs, examples, dim_ranges)
    if not one_row_model:
        return ep, None
    if not allows_one_row_model(inputs, outputs, dim_ranges):
        logger.warning("built without the one-row model: the engine has no dynamic dim, one whose range excludes 1, "
                       "or an output dim that no input carries")
        return ep, None
    try:
        ep_one = _export_once(program, tuple(narrow_to_one_row(x, spec) for x, spec in zip(examples, inputs)), None)
    except Exception as exc:  # noqa: BLE001 - the engine is still built, without the one-row model
        logger.warning("built without the one-row model: its export failed (%s: %s)", type(exc).__name__,
                       str(exc).splitlines()[0] if str(exc) else "")
        return ep, None
    got = [list(n.meta["val"].shape) for n in ep_one.graph.output_node().args[0]]
    want = [one_row_shape(spec) for spec in outputs]
    if got != want:
        logger.warning("built without the one-row model: at one row the program returns shapes %s, its output specs "
                       "say %s", got, want)
        return ep, None
    return ep, ep_one


def _compile_with_one_row_model(ep, ep_one, package_path: Path, configs: dict) -> Path | None:
    """One AOTInductor package holding `ep` (model "model") and `ep_one` (model `ONE_ROW_MODEL`) on one copy of the
    weights, or None (with a warning) where AOTInductor fails on the one-row model.

    Each model is compiled with its constants out of its .so (pickled weight files); `package_aoti` stores a tensor
    that both graphs read (same storage) once, and the loader hands each model the same loaded tensors
    (`load.py`)."""
    from torch._inductor.package import package_aoti

    configs = {**configs, "aot_inductor.package": True, "aot_inductor.package_constants_in_so": False,
               "aot_inductor.package_constants_on_disk_format": "pickle_weights"}
    try:  # first: where it fails, the caller compiles the engine's model once, as without the one-row model
        one_row_files = _aoti_files(ep_one, {**configs, "aot_inductor.model_name_for_generated_files":
                                             f"{MODEL_NAME}_{ONE_ROW_MODEL}"})
    except Exception as exc:  # noqa: BLE001 - the caller compiles the engine without it
        logger.warning("the one-row model did not compile (%s: %s); compiling the engine without it",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    with _compile_errors():  # the engine's own program: the build fails as it would without the one-row model
        files = {"model": _aoti_files(ep, configs), ONE_ROW_MODEL: one_row_files}
    return Path(package_aoti(str(package_path), files))


def _aoti_files(ep, configs: dict) -> list:
    """AOTInductor's files for `ep` (what `aoti_compile_and_package` compiles before packaging)."""
    args, kwargs = ep.example_inputs
    with static_branch_ints():  # AOTInductor re-traces the program first (run_decompositions)
        return torch._inductor.aot_compile(_graph_of(ep), args, kwargs, options=configs)


def _graph_of(ep: torch.export.ExportedProgram) -> torch.nn.Module:
    """`ep` as a module to compile, without its guards on the input shapes (as `aoti_compile_and_package` takes it;
    torch >= 2.9 puts them in the graph unless told not to)."""
    if "check_guards" in inspect.signature(ep.module).parameters:
        return ep.module(check_guards=False)
    return ep.module()


def _export(program, inputs, examples, dim_ranges) -> torch.export.ExportedProgram:
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in dim_ranges.items()}
    dynamic_shapes = tuple(
        {axis: dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)} or None for spec in inputs
    )
    params = list(inspect.signature(program.forward).parameters.values())
    if len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        dynamic_shapes = (dynamic_shapes,)  # forward(*inputs): the specs form one tuple argument
    try:
        try:
            return _export_once(program, examples, dynamic_shapes)
        except Exception as exc:
            if "Constraints violated" not in str(exc):
                raise
            ep = _export_with_hints(program, inputs, examples, dynamic_shapes, dim_ranges)
            if ep is None:
                raise
            logger.info("torch.export: %s; exported with dynamic-dim hints instead (the guards hold on every "
                        "requested size)", str(exc).splitlines()[0])
            return ep
    except Exception as exc:
        raise EngineError(f"torch.export failed: {type(exc).__name__}: {exc}") from exc


def static_branch_ints():
    """Dynamo settings for an engine's export and AOTInductor compile (`_export_once`, `_compile`): no automatic
    dynamic shapes.

    The plugins' M buckets are `torch.cond` branches, which Dynamo traces once per layer, through the same code
    objects. With automatic dynamic shapes on, an int that differs between two layers (a launch configuration's
    `num_stages`, a split count) becomes symbolic on the next trace, and a Triton launch cannot take a symbolic
    `num_stages` or `num_warps` ("'SymNodeVariable' object has no attribute 'value'", raised when AOTInductor
    re-traced the W8A16 engine of llama3-8b-layers on the H200; `tools/diag/engine_export_check.py` reproduces it
    without a GPU). The engine's own dynamic dims are named in the export, so nothing is lost."""
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False)


def _export_once(program, examples, dynamic_shapes) -> torch.export.ExportedProgram:
    # Dynamo's per-code-object state from earlier compiles in this process (automatic-dynamic marks) can make
    # the plugins' torch.cond branches lift their closure ints as symbolic operands, which AOTInductor then
    # rejects (seen on the H200: an INT4 export after W8A16 exports in one pytest process). A reset costs
    # nothing here: the export traces from scratch anyway. `static_branch_ints` covers the same within one export.
    torch._dynamo.reset()
    # keeps per-node provenance (onnx_node annotations)
    with torch.fx.traceback.preserve_node_meta(), static_branch_ints():
        return torch.export.export(program, tuple(examples), dynamic_shapes=dynamic_shapes)


def _export_with_hints(program, inputs, examples, dynamic_shapes, dim_ranges):
    """Export with `Dim.DYNAMIC(min, max)` hints instead of named dims, or None if that narrows a range.

    Named dims make torch.export reject a guard it cannot prove over the whole range, even a true one
    (torch 2.11 on a reshape of grouped-query attention's expanded K/V: `min(128*seq, 512*seq) == 128*seq`
    with seq >= 2). With hints the guards are kept; the program is used only if every dim still covers its
    requested range (a guard that really narrows it, e.g. `seq > 5`, keeps the original error)."""
    def hint(dim):
        return torch.export.Dim.DYNAMIC(min=dim.min, max=dim.max)

    def to_hints(spec):
        if isinstance(spec, dict):
            return {axis: hint(d) for axis, d in spec.items()}
        if isinstance(spec, tuple):
            return tuple(to_hints(s) for s in spec)
        return spec

    try:
        ep = _export_once(program, examples, to_hints(dynamic_shapes))
    except Exception:  # noqa: BLE001 - the caller re-raises the first error
        return None
    user_inputs = set(ep.graph_signature.user_inputs)
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    for node, spec in zip(placeholders, inputs):
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, str):
                continue
            size = node.meta["val"].shape[axis]
            lo, hi = dim_ranges[dim]
            if not isinstance(size, torch.SymInt):
                if lo != hi:
                    return None
                continue
            vr = ep.range_constraints.get(size.node.expr)
            if vr is None or int(vr.lower) > max(lo, 2) or int(vr.upper) < hi:  # export's ranges start at 2
                return None
    return ep


def _engine_configs(man: Manifest, inductor_configs: dict | None) -> dict:
    """AOTInductor's configs for an engine: exact numerics, no caches, qcompile's metadata, the caller's extras."""
    metadata = {
        "qcompile.format_version": str(FORMAT_VERSION),
        "qcompile.version": man.qcompile_version,
        "qcompile.content_hash": str(man.content_hash or ""),
        "qcompile.recipe": str((man.recipe or {}).get("name", "")),
    }
    return {
        **exact_numerics_configs(),
        # Inductor's FX graph cache keys on the graph, not on the constant values AOTInductor bakes into the
        # package: a second build of the same architecture with other weights or scales got the first build's
        # constants back (found by validation: a sabotaged scale did not reach the engine)
        "force_disable_caches": True,
        "aot_inductor.metadata": metadata,
        "aot_inductor.model_name_for_generated_files": MODEL_NAME,
        **(inductor_configs or {}),
    }


def _compile(ep, package_path: Path, configs: dict) -> Path:
    with _compile_errors(), static_branch_ints():  # AOTInductor re-traces the program first (run_decompositions)
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path), inductor_configs=configs)
    return Path(out)


@contextlib.contextmanager
def _compile_errors():
    """AOTInductor's failures as an EngineError that names the failure (the build then leaves no engine file)."""
    try:
        yield
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"AOTInductor compile failed: {type(exc).__name__}: {exc}") from exc


def exact_numerics_configs() -> dict:
    """Inductor configs that keep eager numerics where quantization depends on them (where this torch has them).

    Triton lowers float32 `x / y` to an approximate division (`div.full`, 2 ulp); QuantizeLinear's
    `x / scale` must round exactly like ONNX Runtime and eager torch, or values near a rounding
    boundary land on the neighbouring integer / fp8 code.
    """
    import torch._inductor.config as inductor_config

    numerics = getattr(inductor_config, "eager_numerics", None)
    return {"eager_numerics.division_rounding": True} if hasattr(numerics, "division_rounding") else {}


def write_engine_file(path: Path, man: Manifest, package: Path, extra_files: dict[str, bytes] | None = None) -> None:
    """Atomically write the engine zip (`manifest.json`, `model.pt2`, extra files; ZIP_STORED) at `path`."""
    def fill(z: zipfile.ZipFile) -> None:
        z.writestr(MANIFEST_NAME, man.to_json())
        z.write(package, PACKAGE_NAME)
        for name, data in (extra_files or {}).items():
            z.writestr(name, data)

    _write_zip_atomic(path, fill)


def update_manifest(path: str | os.PathLike, changes: dict) -> Manifest:
    """Rewrite the engine file at `path` (atomically) with `changes` merged into its manifest."""
    from qcompile.engine.load import read_manifest

    path = Path(path)
    man = Manifest.from_dict({**read_manifest(path).to_dict(), **changes})

    def fill(z: zipfile.ZipFile) -> None:
        z.writestr(MANIFEST_NAME, man.to_json())
        with zipfile.ZipFile(path) as old:
            for info in old.infolist():
                if info.filename != MANIFEST_NAME:
                    with old.open(info) as src, z.open(info.filename, "w", force_zip64=True) as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)

    _write_zip_atomic(path, fill)
    return man


def _write_zip_atomic(path: Path, fill) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
                fill(z)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
