"""The build pipeline: source -> FP ONNX -> calibrate -> Q/DQ ONNX -> plugin ONNX -> engine.

Each stage is a call into its own package; this module only wires them together, times them
and assembles the manifest and the build report.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from qcompile.errors import QCompileError
from qcompile.layers import LayerRow, initializer_bytes, layer_table
from qcompile.progress import STDERR, Progress
from qcompile.recipes import Recipe, load_recipe

logger = logging.getLogger(__name__)

STAGES = ("export", "calibrate", "quantize", "lower", "compile")
GRAPH_STAGES = STAGES[:3]  # `build(..., output=None)`: the quantized graphs, no engine
COMPILE_HEARTBEAT_S = 15.0  # the AOTInductor compile is one call of 20 s to minutes: report its time this often


@dataclass
class BuildResult:
    """What `build` produced: the engine file (None for a graph-only build), the graphs on the way, the numbers.

    `pass_notes`: the passes' one-line summaries ("FoldAwqScalesPass: AWQ scales: 10 folded ..."), shown in the
    build summary; `declined`: (node, "Pass: reason") for the layers a pass of the recipe left alone."""

    engine_path: Path | None
    recipe: Recipe
    qdq_model: onnx.ModelProto
    plugin_model: onnx.ModelProto
    layers: list[LayerRow]
    stage_seconds: dict[str, float]
    bytes_before: int
    bytes_after: int
    calibration: dict[str, Any] | None
    pass_stats: dict[str, int] = field(default_factory=dict)
    report_path: Path | None = None
    source_model: onnx.ModelProto | None = None  # the FP32 ONNX graph it was built from (validation reference)
    validation_data: Any = None  # the held-out calibration samples (`holdout`), else None
    pass_notes: list[str] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "engine": str(self.engine_path) if self.engine_path is not None else None,
            "recipe": self.recipe.name,
            "layers_quantized": len(self.layers),
            "plugin_layers": sum(r.plugin.startswith("qcompile::") for r in self.layers),
            "weights_bytes_before": self.bytes_before,
            "weights_bytes_after": self.bytes_after,
            "stage_seconds": self.stage_seconds,
            "calibration": self.calibration,
            "pass_stats": self.pass_stats,
            "pass_notes": self.pass_notes,
            "declined": [{"node": node, "reason": reason} for node, reason in self.declined],
            "layers": [r.to_dict() for r in self.layers],
        }


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build(
    source: str,
    recipe: str | Path | Recipe,
    *,
    output: str | Path | None,
    calib: str | None = None,
    emit_onnx: str | Path | None = None,
    device: str | None = None,
    holdout: float = 0.0,
    fuse_siblings: bool = True,
    fuse_attention: bool = True,
    fp8_large_m: bool = False,
    fp4_layout: str | None = None,
    one_row_model: bool = False,
    pdl: bool = False,
    progress_stream=STDERR,
) -> BuildResult:
    """Build an engine from `source` with `recipe`; see the README for the source forms.

    `output`: the engine file; None stops after the quantized plugin graph (export, calibrate, quantize: no
    lowering, no compile, no engine; `BuildResult.engine_path` is None).
    `holdout`: the fraction of the calibration samples kept out of calibration for validation (real data
    only; `BuildResult.validation_data`). Too few samples to split: nothing is held out.
    `fuse_siblings`: lower GEMMs that share their input as one wider GEMM in the engine
    (`passes.fuse_sibling_gemms`; the plugin graph and the layer table keep one node per layer).
    `fuse_attention`: lower softmax attention written out (MatMul, scale, mask, Softmax, MatMul) as one fused
    scaled-dot-product attention in the engine (`passes.fuse_attention`).
    `fp8_large_m`: the INT4 and FP4 GEMM plugins run above 128 rows on FP8 tensor cores, weights rounded to FP8 and
    activations quantized per row to FP8 there (`plugins/fp8_large_m.py`); exact below. CPU engines emulate the same
    numerics (an accuracy preview, no speed-up).
    `fp4_layout`: "bytes", "planar" or "pairs" FP4 plugin weights in the engine; None: by device
    (`LoweringOptions.for_engine`).
    `one_row_model` (experimental): the engine also holds the program compiled with every dynamic dim at 1, which
    runs when a call has them all at 1 (a decode step): the plugins' GEMMs there need no dispatch by row count, and
    Inductor fuses around them (`engine/one_row.py`); both models share one copy of the weights. It doubles the
    compile time; where it does not export or compile, the engine is built without it (`build_engine`).
    `pdl`: the engine launches its Inductor kernels (norms, casts, element-wise ops) with programmatic dependent
    launch, so each may start while the kernel before it finishes (`engine/pdl.py`; CUDA engines on compute
    capability 9.0 or more, checked before anything runs).

    Raises:
        QCompileError (a subclass) for any user or input error, before any file is written.
    """
    from qcompile.engine.build import check_writable

    recipe = load_recipe(recipe)
    output = Path(output) if output is not None else None
    if output is not None:
        check_writable(output, "engine")
    if emit_onnx is not None:
        emit_onnx = Path(emit_onnx)
        check_writable(emit_onnx, "ONNX")
    import torch

    from qcompile.algorithms.plan import awq_input_amax, gptq_data_notes, observers_for, plan_int4_jobs, run_jobs
    from qcompile.algorithms.smoothquant import plan_smoothing, smooth_model
    from qcompile.calibration import RANDOM_SAMPLES, calibrate, check_calibration_spec, load_calibration_data
    from qcompile.engine import build_engine
    from qcompile.frontend import load_source
    from qcompile.lowering import LoweringOptions, lower_onnx
    from qcompile.passes import activation_tensors, fuse_plugins, plan_quantization, prepare_for_engine, quantize_model
    from qcompile.passes.quantize_weights_fp4 import fp4_activation_tensors

    device = device or default_device()
    if device not in ("cpu", "cuda"):
        raise QCompileError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise QCompileError("--device cuda was asked for, but torch sees no CUDA GPU on this machine; use --device cpu")
    if pdl and output is not None:
        from qcompile.engine.pdl import check_device as check_pdl_device

        check_pdl_device(torch.device(device))
    try:
        options = LoweringOptions.for_engine(device, fp8_large_m=fp8_large_m, fp4_layout=fp4_layout)
    except ValueError as exc:
        raise QCompileError(str(exc)) from None

    if calib is not None and recipe.needs_calibration:
        check_calibration_spec(calib)  # a mistyped path fails now, not after the export
    progress = Progress(len(STAGES if output is not None else GRAPH_STAGES), progress_stream)
    with progress.stage("export", source):
        src = load_source(source, opset=recipe.opset)

    calibration, amax, held_out, notes = None, {}, None, []
    int4_weights, int4_input_scales, int4_input_amax = {}, {}, {}
    with progress.stage("calibrate", recipe.calibration.method if recipe.needs_calibration else "(not needed)") as tick:
        targets = plan_quantization(src.model, recipe)
        tensors = activation_tensors(targets) + fp4_activation_tensors(src.model, recipe)
        jobs = plan_int4_jobs(src.model, recipe)
        watch = observers_for(jobs)
        smooth_jobs, smoothing, model = plan_smoothing(src.model, recipe), None, src.model
        data_hash = ""
        if recipe.needs_calibration and (tensors or jobs or smooth_jobs):
            # random data: as many samples as the recipe reads (GPTQ's Hessian needs several times K tokens)
            data = load_calibration_data(calib, src.inputs, source=src,
                                         random_samples=recipe.calibration.max_samples or RANDOM_SAMPLES)
            data_hash = data.content_hash()
            data, held_out = _split_holdout(data, holdout)
            if smooth_jobs:  # SmoothQuant: smooth the FP model, then calibrate the smoothed one
                model, smoothing, notes = smooth_model(src.model, recipe, data, recipe.calibration, device=device,
                                                       progress=tick, jobs=smooth_jobs)
                targets = plan_quantization(model, recipe)
                tensors = activation_tensors(targets) + fp4_activation_tensors(model, recipe)
            result = calibrate(model, tensors, data, recipe.calibration, device=device, progress=tick,
                               extra_observers=watch)
            amax = result.amax
            int4_weights, int4_input_scales = run_jobs(jobs, watch, device=device)
            notes = notes + gptq_data_notes(jobs, watch)
            int4_input_amax = awq_input_amax(jobs, watch, int4_input_scales)
            calibration = {"data": data.description, "random": data.is_random, "samples": result.num_samples,
                           "method": recipe.calibration.method, "tensors": len(amax)}
            if smoothing is not None:
                calibration["smoothquant"] = smoothing
            if data.is_random:
                logger.warning("calibrated on random data: scales are not representative of real inputs")

    # the layer count comes after, in the layer table: INT4, FP4 and FP8-block layers are not Q/DQ `targets`
    with progress.stage("quantize", recipe.name):
        qdq_model, qdq_result = quantize_model(model, recipe, amax, int4_weights, int4_input_scales,
                                               int4_input_amax)
        if emit_onnx is not None:
            _save_onnx_atomic(qdq_model, emit_onnx)
        plugin_model, fuse_result = fuse_plugins(qdq_model, recipe=recipe)

    layers = layer_table(plugin_model)
    prequantized = _prequantized_note(src.model)
    if prequantized:
        notes = notes + [prequantized]
    stats = {**qdq_result.stats, **fuse_result.stats}
    result = BuildResult(output, recipe, qdq_model, plugin_model, layers, dict(progress.times),
                         initializer_bytes(src.model), initializer_bytes(plugin_model), calibration, stats,
                         source_model=src.model, validation_data=held_out,
                         pass_notes=notes + qdq_result.notes + fuse_result.notes,
                         declined=qdq_result.declined + fuse_result.declined)
    if output is None:
        return result

    with progress.stage("lower", f"{device}, {'fp16' if options.compute_dtype else 'fp32'} compute"):
        engine_model = plugin_model
        if fuse_siblings or fuse_attention:
            engine_model, engine_result = prepare_for_engine(plugin_model, siblings=fuse_siblings,
                                                             attention=fuse_attention)
            result.pass_notes += engine_result.notes
            result.pass_stats.update(engine_result.stats)
        if fp8_large_m:
            result.pass_notes.append(_fp8_large_m_note(plugin_model, device))
        program = lower_onnx(engine_model, options).to(device)
        engine_example = src.engine_example()
        example = tuple(torch.from_numpy(engine_example[n]).to(device) for n in program.input_names)

    content_hash = hashlib.sha256(
        (src.content_hash() + recipe.content_hash() + data_hash
         + (f"holdout={holdout}" if held_out is not None else "")).encode()).hexdigest()
    manifest = {
        "source": {"name": src.name, "kind": src.kind, "spec": source},
        "recipe": recipe.to_dict(),
        "layers": [r.to_dict() for r in layers],
        "content_hash": content_hash,
        "calibration": calibration,
        "compute_dtype": "float16" if options.compute_dtype else "float32",
        "fp8_large_m": fp8_large_m,
        "fp4_layout": options.fp4_layout,
        "timings": dict(progress.times),
    }
    with progress.stage("compile", "AOTInductor", heartbeat=COMPILE_HEARTBEAT_S):
        build_engine(program, inputs=src.inputs, outputs=src.outputs, example_inputs=example,
                     manifest=manifest, output_path=output, device=device, extra_files=_quantized_graph(plugin_model),
                     one_row_model=one_row_model, pdl=pdl)
    result.stage_seconds = dict(progress.times)
    return result


def _prequantized_note(model) -> str | None:
    """The build summary's line on a source already quantized by ONNX Runtime (its integer "QOperator" ops)."""
    from collections import Counter

    from qcompile.lowering.ops.qoperator import OP_TYPES

    found = Counter(n.op_type for n in model.graph.node if n.op_type in OP_TYPES and n.domain in ("", "ai.onnx"))
    if not found:
        return None
    ops = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
    return (f"the source is already quantized ({ops}): those ops run as exact integer math in plain torch, not as "
            "the fast GEMM plugins, and the recipe quantizes only the float layers; build from the float model "
            "for the plugins")


def _fp8_large_m_note(model, device: str) -> str:
    """The build summary's line on `--fp8-large-m`: how many INT4 / FP4 GEMM layers of the plugin graph it applies to,
    and what it does to them on `device`."""
    import torch

    from qcompile.plugins.fp4_gemm import onnx_schema as fp4_schema
    from qcompile.plugins.int4_gemm import onnx_schema as int4_schema

    kinds = {int4_schema.OP_TYPE, *fp4_schema.OP_TYPES}
    count = sum(1 for n in model.graph.node if n.domain == int4_schema.DOMAIN and n.op_type in kinds)
    if not count:
        return "--fp8-large-m: the engine has no INT4 or FP4 GEMM; the flag changes nothing"
    layers = f"--fp8-large-m: {count} INT4/FP4 GEMM layer(s)"
    if device != "cuda":
        return f"{layers} emulate the FP8 path above 128 rows ({device}: its numerics, no speed-up)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"{layers} keep the exact path: this GPU (sm_{major}{minor}) has no FP8 tensor cores"
    return f"{layers} run on FP8 tensor cores above 128 rows"


def _split_holdout(data, fraction: float):
    """(calibration part, held-out part or None): real data only, and only when there are enough samples."""
    if fraction <= 0.0 or data.is_random:
        return data, None
    try:
        return data.split(fraction)
    except QCompileError as exc:
        logger.info("nothing held out for validation: %s", exc)
        return data, None


def _quantized_graph(plugin_model: onnx.ModelProto) -> dict[str, bytes]:
    """The quantized plugin graph as an engine member (per-layer validation), when it has quantized layers
    and fits in one protobuf (< 2 GB)."""
    from qcompile.engine import QUANTIZED_ONNX_NAME

    if not any(n.domain == "qcompile" for n in plugin_model.graph.node) or plugin_model.ByteSize() >= 2**31 - 1:
        return {}
    return {QUANTIZED_ONNX_NAME: plugin_model.SerializeToString()}


def _save_onnx_atomic(model: onnx.ModelProto, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
