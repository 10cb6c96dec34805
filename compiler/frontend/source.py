"""Model sources: what the front end hands to the rest of the compiler.

`load_source(spec)` accepts three kinds of spec:

- a path to an ``.onnx`` file (external data next to it is loaded too);
- ``path/to/file.py:factory``: the file is imported by path and ``factory()`` returns
  ``(module, inputs)``, ``(module, inputs, dynamic_dims)`` or a dict with keys ``module``,
  ``inputs`` (tuple or dict name -> tensor) and optional ``dynamic_dims``
  (``{"input_ids": {0: "batch", 1: "seq"}}``), ``dim_ranges`` (``{"batch": (1, 64)}``),
  ``value_ranges`` (``{"input_ids": (0, 32000)}``, integer inputs, high exclusive),
  ``input_names`` and ``output_names``;
- a built-in example name (see `qcompile.frontend.examples.list_examples`).

Every kind ends as a `SourceModel`: an FP32 ONNX model (opset >= the asked one, IR version
<= 10 where the opset allows it) with its inputs and outputs described by `IOSpec`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qcompile.errors import SourceError
from qcompile.iospec import HasIO, IOSpec

logger = logging.getLogger(__name__)

# Ranges for named dynamic dims nobody told us about (inclusive).
DEFAULT_BATCH_RANGE = (1, 64)
DEFAULT_SEQ_RANGE = (1, 2048)
DEFAULT_DIM_RANGE = (1, 4096)
# Sizes used for example inputs when a dim's size is not known from real example inputs.
DEFAULT_BATCH_SIZE, DEFAULT_SEQ_SIZE, DEFAULT_DIM_SIZE = 2, 16, 16


def _is_batch(dim: str) -> bool:
    return "batch" in dim.lower()


def _is_seq(dim: str) -> bool:
    low = dim.lower()
    return "seq" in low or low.endswith("len") or "length" in low


def default_dim_range(dim: str) -> tuple[int, int]:
    """The range assumed for a named dim: batch (1, 64), seq (1, 2048), else (1, 4096)."""
    if _is_batch(dim):
        return DEFAULT_BATCH_RANGE
    if _is_seq(dim):
        return DEFAULT_SEQ_RANGE
    return DEFAULT_DIM_RANGE


def default_dim_size(dim: str, rng: tuple[int, int]) -> int:
    size = DEFAULT_BATCH_SIZE if _is_batch(dim) else DEFAULT_SEQ_SIZE if _is_seq(dim) else DEFAULT_DIM_SIZE
    return int(min(max(size, rng[0]), rng[1]))


@dataclass
class SourceModel(HasIO):
    """A model ready for the compiler: FP32 ONNX plus the description of its I/O.

    Attributes:
        name: a short name (file stem, factory name or built-in name).
        kind: "onnx", "torch" or "builtin".
        model: the FP32 ONNX model (external data, if any, loaded into memory).
        inputs, outputs: graph I/O in graph order.
        example_inputs: one valid feed (name -> array), used to trace and to test.
        path: the ONNX file it came from, or the file a large export was saved to.
        torch_module: the torch module it was exported from (torch and built-in kinds).
    """

    name: str
    kind: str
    model: onnx.ModelProto
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    example_inputs: dict[str, np.ndarray]
    path: Path | None = None
    torch_module: Any = field(default=None, repr=False, compare=False)

    def content_hash(self) -> str:
        """sha256 (hex) of the serialized model (initializer by initializer past 2 GB)."""
        if self.model.ByteSize() < 2**31 - 1:
            return hashlib.sha256(self.model.SerializeToString()).hexdigest()
        h = hashlib.sha256()
        stripped = onnx.ModelProto()
        stripped.CopyFrom(self.model)
        del stripped.graph.initializer[:]
        h.update(stripped.SerializeToString())
        for init in self.model.graph.initializer:
            h.update(init.SerializeToString())
        return h.hexdigest()

    def dim_sizes(self) -> dict[str, int]:
        """The size of each named dim in `example_inputs`."""
        sizes: dict[str, int] = {}
        for spec in self.inputs:
            arr = self.example_inputs.get(spec.name)
            for axis, dim in spec.dynamic_dims.items():
                if arr is not None and arr.ndim == spec.rank:
                    sizes.setdefault(dim, int(arr.shape[axis]))
        return sizes

    def engine_example(self) -> dict[str, np.ndarray]:
        """`example_inputs` for an engine's export: torch.export specializes dims of size 0 and 1, so a dynamic dim
        of that size (llama3-8b-layers' batch of 1) is raised to 2 where its range allows, in a seeded random feed."""
        sizes = self.dim_sizes()
        highs = {d: s.dim_ranges.get(d, default_dim_range(d))[1] for s in self.inputs for d in s.dynamic_dims.values()}
        raised = {d: 2 for d, size in sizes.items() if size < 2 and highs.get(d, 0) >= 2}
        return self.random_inputs(np.random.default_rng(0), {**sizes, **raised}) if raised else self.example_inputs

    def random_inputs(self, rng: np.random.Generator, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Random valid inputs; named dims take `sizes[dim]`, else their example size.

        Integer inputs are drawn uniformly from their `value_range`, floats from a standard
        normal. Raises SourceError for an unknown dim name or a size outside the dim's range.
        """
        known = self.dim_sizes()
        all_dims = {d for s in self.inputs for d in s.dynamic_dims.values()}
        sizes = dict(sizes or {})
        unknown = sorted(set(sizes) - all_dims)
        if unknown:
            raise SourceError(f"model {self.name!r} has no dynamic dim {unknown[0]!r}; "
                              f"its dims are: {', '.join(sorted(all_dims)) or '(none)'}")
        feeds = {}
        for spec in self.inputs:
            shape = []
            for dim in spec.shape:
                if isinstance(dim, int):
                    shape.append(dim)
                    continue
                lo, hi = spec.dim_ranges.get(dim, default_dim_range(dim))
                size = sizes.get(dim, known.get(dim, default_dim_size(dim, (lo, hi))))
                if not lo <= size <= hi:
                    raise SourceError(f"size {size} for dim {dim!r} of input {spec.name!r} is outside its range "
                                      f"[{lo}, {hi}]")
                shape.append(int(size))
            feeds[spec.name] = random_array(rng, spec, shape)
        return feeds


def random_array(rng: np.random.Generator, spec: IOSpec, shape: list[int]) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "b":
        lo, hi = spec.value_range or (0, 2)
        return rng.integers(int(lo), int(hi), size=shape).astype(bool)
    if dtype.kind in "iu":
        lo, hi = spec.value_range or (0, 2)
        return rng.integers(int(lo), int(hi), size=shape, dtype=dtype)
    if spec.value_range is not None:
        lo, hi = spec.value_range
        return rng.uniform(lo, hi, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


# --------------------------------------------------------------------------- load_source


def load_source(spec: str, *, opset: int = 21, work_dir: Path | None = None) -> SourceModel:
    """Turn a source spec (``.onnx`` path, ``file.py:factory`` or built-in name) into a SourceModel.

    Raises:
        SourceError: the file is missing or unreadable, the factory fails or returns the wrong
            thing, the export fails, or the name is not a built-in (the message lists them).
    """
    from qcompile.frontend import examples

    spec = str(spec)
    path_part, sep, fn_name = spec.rpartition(":")
    if sep and path_part.endswith(".py"):
        return _load_factory(Path(path_part), fn_name, opset=opset, work_dir=work_dir)
    if spec.endswith(".onnx") or Path(spec).suffix == ".onnx":
        return load_onnx_file(Path(spec), opset=opset)
    if spec in examples.EXAMPLES:
        example = examples.EXAMPLES[spec]
        return source_from_factory_result(example.factory(), name=spec, kind="builtin", where=f"built-in {spec!r}",
                                          opset=opset, work_dir=work_dir)
    if spec.endswith(".py") or Path(spec).exists():
        raise SourceError(f"cannot use {spec!r} as a model source: give an .onnx file, a factory as "
                          f"'{spec}:make_model' (a .py file and a function name), or a built-in example name")
    names = ", ".join(examples.EXAMPLES)
    raise SourceError(f"unknown model source {spec!r}: not an .onnx file, not file.py:factory, and not a built-in "
                      f"example; built-ins: {names}")


def import_file(path: Path, what: str, error: type[Exception] = SourceError):
    """Import a Python file by path (its folder is importable while it loads)."""
    if not path.is_file():
        raise error(f"{what} file {path} does not exist; check the path")
    mod_name = f"_qcompile_user_{path.stem}_{uuid.uuid4().hex[:8]}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"cannot import {what} file {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one clear message
        sys.modules.pop(mod_name, None)
        raise error(f"importing {what} file {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _load_factory(path: Path, fn_name: str, *, opset: int, work_dir: Path | None) -> SourceModel:
    where = f"{path}:{fn_name}"
    if not fn_name.isidentifier():
        raise SourceError(f"bad model source {where!r}: after the ':' give the factory function name, "
                          "e.g. model.py:make_model")
    module = import_file(path, "model")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise SourceError(f"{path} has no function {fn_name!r}; functions there: {', '.join(public) or '(none)'}")
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"factory {where} raised {type(exc).__name__}: {exc}") from exc
    return source_from_factory_result(result, name=fn_name, kind="torch", where=where, opset=opset,
                                      work_dir=work_dir)


def _normalize_factory_result(result: Any, where: str) -> dict[str, Any]:
    import torch

    expected = ("expected (module, inputs), (module, inputs, dynamic_dims) or a dict with keys "
                "'module' and 'inputs'")
    if isinstance(result, dict):
        unknown = sorted(set(result) - {"module", "inputs", "dynamic_dims", "dim_ranges", "value_ranges",
                                        "input_names", "output_names"})
        if unknown:
            raise SourceError(f"factory {where} returned a dict with unknown key {unknown[0]!r}; {expected}")
        missing = [k for k in ("module", "inputs") if k not in result]
        if missing:
            raise SourceError(f"factory {where} returned a dict without {missing[0]!r}; {expected}")
        out = dict(result)
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        out = {"module": result[0], "inputs": result[1]}
        if len(result) == 3:
            out["dynamic_dims"] = result[2]
    else:
        raise SourceError(f"factory {where} returned {type(result).__name__}; {expected}")
    if not isinstance(out["module"], torch.nn.Module):
        raise SourceError(f"factory {where} returned {type(out['module']).__name__} as the module; "
                          f"expected a torch.nn.Module")
    inputs = out["inputs"]
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, (tuple, dict)) or not inputs:
        raise SourceError(f"factory {where} returned inputs of type {type(inputs).__name__}; expected a "
                          "non-empty tuple of tensors or a dict name -> tensor")
    values = inputs.values() if isinstance(inputs, dict) else inputs
    bad = [type(v).__name__ for v in values if not isinstance(v, torch.Tensor)]
    if bad:
        raise SourceError(f"factory {where} returned an input of type {bad[0]}; every input must be a torch.Tensor")
    out["inputs"] = inputs
    return out


def source_from_factory_result(result: Any, *, name: str, kind: str, where: str, opset: int,
                               work_dir: Path | None) -> SourceModel:
    """Export what a factory returned and describe it as a SourceModel."""
    from qcompile.frontend.export import export_torch, forward_input_names, split_dynamic_shapes

    spec = _normalize_factory_result(result, where)
    module, inputs = spec["module"], spec["inputs"]
    n_inputs = len(inputs)
    input_names = list(spec.get("input_names") or (list(inputs) if isinstance(inputs, dict)
                                                  else forward_input_names(module, n_inputs)))
    if len(input_names) != n_inputs:
        raise SourceError(f"factory {where}: {len(input_names)} input_names for {n_inputs} inputs")
    dynamic_dims, dim_ranges = split_dynamic_shapes(spec.get("dynamic_dims") or {}, input_names, where)
    dim_ranges.update({k: (int(v[0]), int(v[1])) for k, v in (spec.get("dim_ranges") or {}).items()})
    for dim in {d for dims in dynamic_dims.values() for d in dims.values()}:
        dim_ranges.setdefault(dim, default_dim_range(dim))
    module.eval()
    model = export_torch(module, inputs, input_names=input_names, output_names=spec.get("output_names"),
                         dynamic_dims=dynamic_dims, dim_ranges=dim_ranges, opset=opset, work_dir=work_dir,
                         name=name)
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    example = {n: v.detach().cpu().numpy() for n, v in zip(input_names, values)}
    value_ranges = {k: tuple(v) for k, v in (spec.get("value_ranges") or {}).items()}
    unknown = sorted(set(value_ranges) - set(input_names))
    if unknown:
        raise SourceError(f"factory {where}: value_ranges names unknown input {unknown[0]!r}")
    ins, outs = describe_io(model, dim_ranges=dim_ranges, value_ranges=value_ranges)
    logger.info("exported %s (%s): %d nodes, opset %d", name, kind, len(model.graph.node), _default_opset(model))
    return SourceModel(name, kind, model, ins, outs, example, torch_module=module)


# --------------------------------------------------------------------------- ONNX files


def load_onnx_file(path: Path, *, opset: int = 21) -> SourceModel:
    """Load an ONNX file (with its external data) as a SourceModel."""
    from onnx.external_data_helper import uses_external_data

    from qcompile.frontend.export import normalize_model, stamp_module_names

    if not path.is_file():
        hint = "it is a directory; give the .onnx file inside it" if path.is_dir() else "check the path"
        raise SourceError(f"ONNX file {path} does not exist; {hint}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise SourceError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc}); "
                          "re-export the model or check that the file was copied completely") from None
    if not model.graph.node or not model.opset_import:
        raise SourceError(f"{path} is not a valid ONNX model (no graph nodes or no opset); "
                          "re-export the model or check that the file was copied completely")
    if any(uses_external_data(t) for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{path}: cannot read its external data ({type(exc).__name__}: {exc}); "
                              "keep the data file(s) next to the .onnx file, under the name it was saved with") \
                from None
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0]}; re-export the model") from None
    model = normalize_model(model, opset, where=str(path))
    if not any(any(p.key == "qcompile.module" for p in n.metadata_props) for n in model.graph.node):
        stamp_module_names(model)
    _name_unnamed_dims(model)
    ins, outs = describe_io(model, dim_ranges={}, value_ranges=_guess_value_ranges(model))
    src = SourceModel(path.stem, "onnx", model, ins, outs, {}, path=path)
    src.example_inputs = src.random_inputs(np.random.default_rng(0))
    return src


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _name_unnamed_dims(model: onnx.ModelProto) -> None:
    """Give every unnamed unknown input dim a name ("<input>_dim<axis>") so it has a range."""
    for value in model.graph.input:
        if not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") and not dim.dim_param:
                dim.dim_param = f"{value.name}_dim{axis}"


def _guess_value_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Integer inputs used as Gather indices into an initializer get (0, rows); masks get ones."""
    inits = {t.name: t for t in model.graph.initializer}
    ranges: dict[str, tuple[int, int]] = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        elem = value.type.tensor_type.elem_type
        if elem not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL):
            continue
        if "mask" in value.name.lower():
            ranges[value.name] = (1, 2)
            continue
        for node in model.graph.node:
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == value.name \
                    and node.input[0] in inits and inits[node.input[0]].dims:
                ranges[value.name] = (0, int(inits[node.input[0]].dims[0]))
                break
    return ranges


def describe_io(model: onnx.ModelProto, *, dim_ranges: dict[str, tuple[int, int]],
                value_ranges: dict[str, tuple]) -> tuple[list[IOSpec], list[IOSpec]]:
    """IOSpecs of the graph inputs (initializers excluded) and outputs."""
    inits = {t.name for t in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto, is_input: bool) -> IOSpec:
        ttype = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name if ttype.elem_type else "float32"
        shape: list[int | str] = []
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or f"{value.name}_dim{axis}")
        ranges = {}
        for d in shape:
            if isinstance(d, str):
                if d in dim_ranges:
                    ranges[d] = tuple(dim_ranges[d])
                elif is_input:
                    ranges[d] = default_dim_range(d)
        vr = value_ranges.get(value.name) if is_input else None
        return IOSpec(value.name, dtype, shape, ranges, None if vr is None else tuple(vr))

    ins = [spec(v, True) for v in model.graph.input if v.name not in inits]
    dim_ranges = {**{d: r for s in ins for d, r in s.dim_ranges.items()}, **dim_ranges}
    outs = [spec(v, False) for v in model.graph.output]
    return ins, outs
