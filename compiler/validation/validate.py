"""`validate_engine`: run an engine and its FP reference graph on the same inputs with Polygraphy, judge it.

The reference is the FP16 (or, on request, FP32) version of the FP ONNX graph in ONNX Runtime with graph
optimizations off; where ONNX Runtime cannot run it, our lowering in float64 (and the report says so).
Inputs: the data given (the user's validation data, or the held-out part of the calibration data), else
Polygraphy's seeded data loader with the dims and value ranges of the engine's manifest. Outputs are
matched by exact name. The report is printed, saved next to the engine and summarised in its manifest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from qcompile.errors import ValidationError
from qcompile.progress import STDERR, Progress
from qcompile.recipes.schema import ValidationThresholds
from qcompile.validation.metrics import compare_arrays, is_logits_like, merge_iterations
from qcompile.validation.report import OutputVerdict, ValidationReport, report_path_for

logger = logging.getLogger(__name__)

RANDOM_ITERATIONS = 4
RANDOM_SEED = 1
FLOAT_RANGE = (-1.0, 1.0)
PER_LAYER_FEEDS = 2  # inputs used for the per-layer analysis (it runs the graph once per layer)


def validate_engine(
    engine_path: str | Path,
    reference_model: onnx.ModelProto,
    *,
    reference_name: str = "FP ONNX graph",
    data: Iterable[dict[str, np.ndarray]] | None = None,
    data_description: str | None = None,
    thresholds: ValidationThresholds | None = None,
    precision: str = "fp16",
    per_layer: bool = False,
    save: bool = True,
    progress_stream=STDERR,
) -> ValidationReport:
    """Compare the engine at `engine_path` with `reference_model` (FP32 ONNX); see the module docstring.

    Args:
        data: input feeds (name -> array), one per iteration; None: seeded random data from the manifest.
        thresholds: pass/fail limits; default: the recipe's, from the engine manifest.
        precision: "fp16" (the FP16 version of the reference graph) or "fp32".
        per_layer: also rank the quantized layers by their contribution to the error (needs the quantized
            graph that `qcompile build` stores in the engine).
        save: write `<engine>.validation.json` and record the verdict in the engine's manifest.
    """
    from polygraphy.comparator import Comparator

    from qcompile.engine import read_manifest
    from qcompile.validation.runners import QcompileRunner

    if precision not in ("fp16", "fp32"):
        raise ValidationError(f"unknown reference precision {precision!r}; use fp16 or fp32")
    engine_path = Path(engine_path)
    manifest = read_manifest(engine_path)
    thresholds = thresholds or recipe_thresholds(manifest)
    progress = Progress(3 if per_layer else 2, progress_stream)

    with progress.stage("reference", f"{precision} graph"), _polygraphy_quiet():
        _check_io(manifest, reference_model)  # before building the reference (a session over the whole model)
        ref_runner, reference = _reference_runner(reference_model, precision, reference_name)
        if data is None:
            with _polygraphy_quiet():
                feeds = _random_feeds(manifest)
            data_info = {
                "description": f"Polygraphy seeded data loader (seed {RANDOM_SEED}, dims and ranges from the "
                               "engine manifest) — random, not representative data", "random": True}
        else:
            feeds, data_info = [dict(f) for f in data], {"description": data_description or "given data",
                                                         "random": False}
        if not feeds:
            raise ValidationError(f"no validation inputs in {data_info['description']}")
        data_info["iterations"] = len(feeds)

    with progress.stage("compare", f"{len(feeds)} inputs"), _polygraphy_quiet():
        results = Comparator.run([ref_runner, QcompileRunner(str(engine_path), name="qcompile-engine")],
                                 data_loader=feeds)
        ref_iters, eng_iters = (results[name] for name in (ref_runner.name, "qcompile-engine"))
        outputs = [_judge(name, [r[name] for r in ref_iters], [e[name] for e in eng_iters], thresholds)
                   for name in manifest.output_names]

    report = ValidationReport(
        engine=str(engine_path), reference=reference, data=data_info,
        thresholds=dataclasses.asdict(thresholds),
        outputs=outputs, versions=_versions(), created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    if per_layer:
        with progress.stage("per-layer", "revert one layer at a time") as tick:
            report.layers = _localize(engine_path, reference_model, feeds[:PER_LAYER_FEEDS], tick)
    if save:
        from qcompile.engine import update_manifest

        path = report.save(report_path_for(engine_path))
        update_manifest(engine_path, {"validation": report.manifest_entry(path)})
    return report


def _polygraphy_quiet():
    """Polygraphy logs each runner's steps at INFO; keep its warnings and errors only (unless -v / DEBUG)."""
    from polygraphy.logger import G_LOGGER

    if logger.isEnabledFor(logging.DEBUG):
        return contextlib.nullcontext()
    return G_LOGGER.verbosity(G_LOGGER.ERROR)


def recipe_thresholds(manifest) -> ValidationThresholds:
    """The thresholds of the recipe recorded in an engine's manifest."""
    table = ((manifest.recipe or {}).get("validation")) or {}
    return ValidationThresholds.from_table({k: v for k, v in table.items() if v is not None})


def _reference_runner(model: onnx.ModelProto, precision: str, model_name: str):
    """(runner, description): ONNX Runtime when it can run the graph, else our float64 lowering."""
    from qcompile.validation import runners
    from qcompile.validation.fp16 import to_float16

    graph = to_float16(model) if precision == "fp16" else model
    try:
        return (runners.onnxrt_reference(graph, name="onnxrt-reference"),
                {"model": model_name, "runtime": "ONNX Runtime CPU, graph optimizations off",
                 "precision": precision, "note": None})
    except Exception as exc:  # ORT raises its own exception types (NotImplemented, Fail, ...)
        problem = str(exc).strip().splitlines()[0][:200]
    note = f"ONNX Runtime cannot run the {precision} graph ({problem}); the reference is our lowering in float64"
    logger.warning(note)
    return (runners.LoweringRunner(model, name="lowering-float64"),
            {"model": model_name, "runtime": "qcompile lowering, float64", "precision": "float64", "note": note})


def _check_io(manifest, reference_model: onnx.ModelProto) -> None:
    """Engine and reference must have the same output and input names (compared by name, never position)."""
    ref_outputs = [o.name for o in reference_model.graph.output]
    missing = [n for n in manifest.output_names if n not in ref_outputs]
    if missing:
        raise ValidationError(f"engine output {missing[0]!r} is not an output of the reference graph (its outputs: "
                              f"{', '.join(ref_outputs)}); give the FP model this engine was built from")
    inits = {i.name for i in reference_model.graph.initializer}
    ref_inputs = [i.name for i in reference_model.graph.input if i.name not in inits]
    if sorted(ref_inputs) != sorted(manifest.input_names):
        raise ValidationError(f"the reference graph's inputs {ref_inputs} differ from the engine's inputs "
                              f"{manifest.input_names}; give the FP model this engine was built from")


def _random_feeds(manifest) -> list[dict[str, np.ndarray]]:
    """Polygraphy's seeded data loader with the manifest's dims (default sizes) and value ranges."""
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import DataLoader
    from polygraphy.datatype import DataType

    from qcompile.frontend.source import default_dim_size

    meta, ranges = TensorMetadata(), {}
    for spec in manifest.inputs:
        shape = [d if isinstance(d, int) else default_dim_size(d, manifest.dim_ranges[d]) for d in spec.shape]
        meta.add(spec.name, dtype=DataType.from_dtype(np.dtype(spec.dtype)), shape=shape)
        if spec.value_range is not None:
            lo, hi = spec.value_range
            ranges[spec.name] = (int(lo), int(hi) - 1) if np.dtype(spec.dtype).kind in "iu" else (lo, hi)
        elif np.dtype(spec.dtype).kind == "f":
            ranges[spec.name] = FLOAT_RANGE
    loader = DataLoader(seed=RANDOM_SEED, iterations=RANDOM_ITERATIONS, input_metadata=meta, val_range=ranges)
    return [{k: np.asarray(v) for k, v in feed.items()} for feed in loader]


def _judge(name: str, reference: list, engine: list, thresholds: ValidationThresholds) -> OutputVerdict:
    per_iteration = []
    for ref, got in zip(reference, engine):
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            raise ValidationError(f"output {name!r}: engine shape {got.shape} differs from the reference's {ref.shape}")
        per_iteration.append(compare_arrays(ref, got, top1=is_logits_like(name, ref)))
    metrics = merge_iterations(per_iteration)
    failed = []
    if not metrics["cosine"] >= thresholds.min_cosine:  # NaN fails too
        failed.append(f"cosine < {thresholds.min_cosine:g}")
    if thresholds.min_sqnr_db is not None and not metrics["sqnr_db"] >= thresholds.min_sqnr_db:
        failed.append(f"SQNR < {thresholds.min_sqnr_db:g} dB")
    if thresholds.min_top1 is not None and metrics["top1"] is not None and not metrics["top1"] >= thresholds.min_top1:
        failed.append(f"top-1 < {thresholds.min_top1:g}")
    return OutputVerdict(name, metrics, failed)


def _localize(engine_path: Path, reference_model: onnx.ModelProto, feeds: list, tick) -> list[dict[str, Any]]:
    from qcompile.engine import QUANTIZED_ONNX_NAME, read_member
    from qcompile.validation.localize import localize_layers

    data = read_member(engine_path, QUANTIZED_ONNX_NAME)
    if data is None:
        raise ValidationError(f"{engine_path} holds no quantized graph ({QUANTIZED_ONNX_NAME}); per-layer "
                              "validation needs an engine built by `qcompile build` from a model under 2 GB")
    rows = localize_layers(reference_model, onnx.load_from_string(data), feeds, progress=tick)
    return [r.to_dict() for r in rows]


def _versions() -> dict[str, str]:
    import onnxruntime
    import polygraphy
    import torch

    import qcompile

    return {"qcompile": qcompile.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "polygraphy": polygraphy.__version__}
