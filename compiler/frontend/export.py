"""torch module -> ONNX with `torch.onnx.export(dynamo=True)`, named I/O and dynamic dims.

Module names: the exporter writes, on every node, ``metadata_props["namespace"]`` such as::

    ": __main__.M/layers.0: __main__.Block/layers.0.attn: __main__.Attn/layers.0.attn.q_proj:
     torch.nn.modules.linear.Linear/linear: aten.linear.default"

i.e. "/"-separated ``scope: class`` entries: the root module (empty scope), one entry per
submodule call, and last the aten op. torch 2.13 writes fully qualified scopes (above; a
ModuleList item appears directly as "layers.0"); older exporters wrote scopes relative to their
parent ("attn", "q_proj"). `module_name_from_namespace` accepts both and we stamp the fully
qualified name (here "layers.0.attn.q_proj") as ``metadata_props["qcompile.module"]`` on every
node ("" for ops of the root module's own forward or of unknown origin).

Dynamic dims: one ``torch.export.Dim(name, min, max)`` per named dim, shared by every input
that uses it. Dim min 1 works for the built-ins with torch 2.13; if torch rejects a range
(constraint violation, typically because it specializes sizes 0/1) we retry once with
min >= 2, log a warning and record the range actually used.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
from pathlib import Path
from typing import Any

import onnx

from qcompile.errors import SourceError

logger = logging.getLogger(__name__)

MODULE_KEY = "qcompile.module"
NAMESPACE_KEY = "namespace"
LARGE_MODEL_BYTES = int(1.5 * 2**30)
MAX_IR_VERSION = 10
MAX_OPSET_FOR_IR10 = 22


def forward_input_names(module, count: int) -> list[str]:
    """Names of the first `count` positional parameters of `module.forward`."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def split_dynamic_shapes(dynamic: dict, input_names: list[str], where: str
                         ) -> tuple[dict[str, dict[int, str]], dict[str, tuple[int, int]]]:
    """Accept ``{input: {axis: "name"}}`` (or ``torch.export.Dim`` values) -> (dims, ranges).

    A positional list/tuple (one entry per input) is accepted too.
    """
    if isinstance(dynamic, (list, tuple)):
        dynamic = {n: d for n, d in zip(input_names, dynamic) if d}
    if not isinstance(dynamic, dict):
        raise SourceError(f"{where}: dynamic_dims must be a dict like {{'x': {{0: 'batch'}}}}, "
                          f"got {type(dynamic).__name__}")
    dims: dict[str, dict[int, str]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for inp, axes in dynamic.items():
        if inp not in input_names:
            raise SourceError(f"{where}: dynamic_dims names input {inp!r}, but the inputs are "
                              f"{', '.join(input_names)}")
        if not isinstance(axes, dict):
            raise SourceError(f"{where}: dynamic_dims[{inp!r}] must be a dict axis -> dim name, got {axes!r}")
        dims[inp] = {}
        for axis, dim in axes.items():
            if isinstance(dim, str):
                dims[inp][int(axis)] = dim
            elif hasattr(dim, "__name__") and hasattr(dim, "min"):  # torch.export.Dim
                dims[inp][int(axis)] = dim.__name__
                ranges[dim.__name__] = (int(dim.min), int(dim.max))
            else:
                raise SourceError(f"{where}: dynamic_dims[{inp!r}][{axis}] must be a dim name, got {dim!r}")
    return dims, ranges


def export_torch(module, example_inputs: tuple | dict, *, input_names: list[str],
                 output_names: list[str] | None = None, dynamic_dims: dict[str, dict[int, str]] | None = None,
                 dim_ranges: dict[str, tuple[int, int]] | None = None, opset: int = 21,
                 work_dir: Path | None = None, name: str = "model") -> onnx.ModelProto:
    """Export `module` to an FP ONNX model with named I/O, dynamic dims and module-name stamps.

    `dim_ranges` is updated in place when a range had to be narrowed (min 1 -> 2).
    Models over 1.5 GB are written with external data under `work_dir` and read back.
    """
    import torch

    dynamic_dims = dynamic_dims or {}
    dim_ranges = dim_ranges if dim_ranges is not None else {}
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), None

    def attempt(min_size: int):
        cache: dict[str, Any] = {}

        def dim(n: str):
            if n not in cache:
                lo, hi = dim_ranges[n]
                cache[n] = torch.export.Dim(n, min=max(lo, min_size), max=hi)
            return cache[n]

        per_input = [{a: dim(d) for a, d in dynamic_dims.get(n, {}).items()} or None for n in input_names]
        if kwargs is not None:
            shapes = {k: s for k, s in zip(kwargs, per_input)} if dynamic_dims else None
        else:
            shapes = tuple(per_input) if dynamic_dims else None
        with torch.no_grad():
            return torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                     dynamic_shapes=shapes, input_names=input_names, output_names=output_names,
                                     verbose=False, report=False, optimize=True)

    try:
        try:
            program = attempt(1)
        except Exception as exc:  # noqa: BLE001
            if not _is_constraint_violation(exc) or not any(lo < 2 for lo, _ in dim_ranges.values()):
                raise
            logger.warning("torch.export rejected dim minimum 1 for %s (%s); retrying with minimum 2",
                           name, str(exc).splitlines()[0])
            program = attempt(2)
            for d, (lo, hi) in list(dim_ranges.items()):
                dim_ranges[d] = (max(lo, 2), hi)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # torch.onnx's first line is generic; its "Exception summary" names the real error
        first = next((ln for ln in lines if ln.startswith("<class '")), lines[0] if lines else type(exc).__name__)
        raise SourceError(f"torch.onnx.export of {name} failed: {type(exc).__name__}: {first}") from exc

    size = sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())
    if size > LARGE_MODEL_BYTES:
        with contextlib.ExitStack() as stack:  # a folder of our own goes once the model is read back into memory
            folder = Path(work_dir) if work_dir else \
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qcompile-export-")))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.onnx"
            logger.info("model is %.1f GB: saving %s with external data", size / 2**30, path)
            program.save(str(path), external_data=True)
            model = onnx.load(str(path), load_external_data=True)
    else:
        model = program.model_proto
    model = normalize_model(model, opset, where=name)
    stamp_module_names(model)
    check_dynamic_dims(model, dynamic_dims, where=name)
    return model


def _is_constraint_violation(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__} {exc}"
        if "Constraints violated" in text or "ConstraintViolation" in text or "specialized" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def normalize_model(model: onnx.ModelProto, opset: int, *, where: str) -> onnx.ModelProto:
    """Default-domain opset >= `opset` (version converter) and IR version <= 10 where valid."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None:
        raise SourceError(f"{where}: the model imports no default-domain ONNX opset")
    if current < opset:
        logger.info("%s: converting opset %d -> %d", where, current, opset)
        metadata = {n.name: list(n.metadata_props) for n in model.graph.node if n.name and n.metadata_props}
        try:
            model = onnx.version_converter.convert_version(model, opset)
            for node in model.graph.node:  # the converter drops node metadata; put it back by node name
                if node.name in metadata and not node.metadata_props:
                    node.metadata_props.extend(metadata[node.name])
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{where} uses opset {current} and converting it to opset {opset} failed "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              f"re-export the model with opset {opset} or newer") from None
        current = opset
    if model.ir_version > MAX_IR_VERSION and current <= MAX_OPSET_FOR_IR10:
        model.ir_version = MAX_IR_VERSION
    return model


def module_name_from_namespace(namespace: str) -> str:
    """Fully qualified module name of the innermost module in an exporter namespace string."""
    entries = namespace.split("/")
    scopes = [e.partition(": ")[0] if ": " in e else e.split(":")[0] for e in entries]
    # entries[0] is the root module (scope ""), the last one is the aten op (not a module).
    modules = [s.strip() for s in scopes[1:-1]]
    name = ""
    for scope in modules:
        if not scope:
            continue
        if name and not scope.startswith(name + "."):
            name = f"{name}.{scope}"  # relative scope (older exporters)
        else:
            name = scope
    return name


def _iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def stamp_module_names(model: onnx.ModelProto) -> int:
    """Write ``metadata_props["qcompile.module"]`` on every node; returns how many got a non-empty name.

    The exporter folds eval-mode BatchNorm into the preceding Conv and gives the fused Conv the
    BatchNorm's namespace; such a Conv is named after the module owning its weight instead
    ("stem.0", from initializer "stem.0.weight", not "stem.1").
    """
    inits = {t.name for t in model.graph.initializer}
    named = 0
    for node in _iter_nodes(model.graph):
        props = {p.key: p for p in node.metadata_props}
        namespace = props[NAMESPACE_KEY].value if NAMESPACE_KEY in props else ""
        module = module_name_from_namespace(namespace) if namespace else ""
        if (node.op_type in ("Conv", "ConvTranspose") and "batch_norm" in namespace.rsplit("/", 1)[-1]
                and len(node.input) > 1 and node.input[1] in inits and node.input[1].endswith(".weight")):
            module = node.input[1][: -len(".weight")]
        named += bool(module)
        if MODULE_KEY in props:
            props[MODULE_KEY].value = module
        else:
            node.metadata_props.add(key=MODULE_KEY, value=module)
    return named


def check_dynamic_dims(model: onnx.ModelProto, dynamic_dims: dict[str, dict[int, str]], *, where: str) -> None:
    """Every asked-for dynamic dim must be a dim_param on its graph input."""
    graph_inputs = {v.name: v for v in model.graph.input}
    for inp, axes in dynamic_dims.items():
        value = graph_inputs.get(inp)
        if value is None:
            raise SourceError(f"{where}: the exported graph has no input {inp!r}; its inputs are "
                              f"{', '.join(graph_inputs)} (an input the model does not use is dropped)")
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis >= len(dims):
                raise SourceError(f"{where}: input {inp!r} has rank {len(dims)}, no axis {axis} for dim {name!r}")
            d = dims[axis]
            if not d.dim_param:
                raise SourceError(f"{where}: torch fixed axis {axis} of input {inp!r} to {d.dim_value} instead of "
                                  f"keeping it dynamic as {name!r}; the model code depends on that size")
            if d.dim_param != name:
                logger.debug("%s: input %s axis %d is named %r (asked %r)", where, inp, axis, d.dim_param, name)
