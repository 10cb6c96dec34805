"""SmoothQuant (Xiao et al., 2023): per-input-channel factors that move activation outliers into the weights.

For a group of MatMuls sharing input x [..., K] (q/k/v share one; weights concatenated along N):
`s_j = max|X_j|^α / max|W_j|^(1-α)` (j: input channel; max|X_j| streamed over the calibration data, max|W_j|
over the row j of every weight of the group). The graph then computes `(x / s) @ (diag(s) W)`, equal to
`x @ W` in exact arithmetic (`qcompile.passes.smooth_quant.SmoothQuantPass` folds 1/s into x's producer).

`alpha = "auto"`: for each group, the α of `ALPHA_GRID` whose quantized layer output `Q(x/s) @ Q(diag(s) W)`
is closest (relative squared error) to `x @ W` on a streamed sample of calibration rows, with the recipe's
weight (per output channel) and activation (per tensor / per token) formats.

1. `plan_smoothing(model, recipe)`: the groups (`SmoothJob`).
2. `observers_for(jobs)`: what calibration streams per input tensor (per-channel |x| max; rows for "auto").
3. `run_smoothing(jobs, watch)`: the factors (`SmoothResult`) by input tensor name.
`smooth_model` does 1-3 and applies the pass: the smoothed FP model to calibrate and quantize.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from qcompile.algorithms.awq import ActivationSampleObserver
from qcompile.plugins import formats

logger = logging.getLogger(__name__)

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0 (includes the default 0.5)
MIN_FACTOR = 1e-5  # s is floored here (and max|X_j|, max|W_j| too) so x / s stays finite


class ChannelAbsMaxObserver:
    """Running max of |x| per channel of the last axis (float32 [K]); running statistics only."""

    def __init__(self) -> None:
        self._max: torch.Tensor | None = None
        self.samples = 0

    def update(self, x: torch.Tensor) -> None:
        self.samples += 1
        if x.numel() == 0:
            return
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        self._max = m if self._max is None else torch.maximum(self._max, m)

    def value(self) -> torch.Tensor:
        if self._max is None:
            raise ValueError("ChannelAbsMaxObserver saw no data")
        return self._max.cpu()


def smoothing_factors(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """`s_j = max|X_j|^α / max|W_j|^(1-α)` (float64 [K]); channels never active (or all-zero weights) keep s = 1."""
    a = np.asarray(act_max, np.float64)
    w = np.asarray(weight_max, np.float64)
    s = np.maximum(a, MIN_FACTOR) ** alpha / np.maximum(w, MIN_FACTOR) ** (1.0 - alpha)
    s = np.maximum(s, MIN_FACTOR)
    return np.where((a > 0) & (w > 0), s, 1.0)


def layer_error(x: np.ndarray, weight: np.ndarray, s: np.ndarray, weight_fmt: str, act_fmt: str,
                act_granularity: str = "tensor") -> float:
    """Relative squared error of `Q(x/s) @ Q(diag(s) W)` against `x @ W` (x [R, K], W [K, N]), float64.

    Weights per output channel; activations per tensor (scale from the max of the sample) or per token."""
    x = np.asarray(x, np.float64)
    w_s = (weight.astype(np.float64) * s[:, None]).astype(np.float32)
    w_scale = formats.scale_from_amax(formats.weight_amax(w_s, 1), weight_fmt)
    w_q = formats.dequantize(formats.quantize(w_s, w_scale, weight_fmt, 1), w_scale, 1).astype(np.float64)
    x_s = (x / s).astype(np.float32)
    axis = 0 if act_granularity == "token" else None
    x_scale = formats.scale_from_amax(formats.weight_amax(x_s, axis), act_fmt)
    x_q = formats.dequantize(formats.quantize(x_s, x_scale, act_fmt, axis), x_scale, axis).astype(np.float64)
    want = x @ weight.astype(np.float64)
    return float(np.sum((x_q @ w_q - want) ** 2) / max(np.sum(want ** 2), 1e-30))


@dataclass
class SmoothJob:
    """One smoothing group: input tensor `x`, its MatMuls, their weights concatenated [K, sum N], the rule."""

    x: str
    nodes: list[str]
    weight: np.ndarray
    alpha: float | str
    weight_format: str
    act_format: str
    act_granularity: str


@dataclass
class SmoothResult:
    s: np.ndarray  # float64 [K]
    alpha: float
    errors: dict[float, float] = field(default_factory=dict)  # alpha -> layer_error ("auto" only)


def plan_smoothing(model: onnx.ModelProto, recipe) -> list[SmoothJob]:
    """The SmoothQuant groups of `model` (none, without a graph import, when no rule asks for smoothquant)."""
    if not any(r.algorithm == "smoothquant" for r in recipe.rules):
        return []
    from qcompile.passes import _graph as G
    from qcompile.passes.smooth_quant import smoothing_groups

    graph = G.import_model(model)
    nodes = {n.name: n for n in graph.nodes}
    jobs = []
    for group in smoothing_groups(graph, recipe):
        w = np.concatenate([G.const_values(nodes[n].inputs[1]).astype(np.float32) for n in group.nodes], axis=1)
        rule = group.rule
        jobs.append(SmoothJob(group.x, group.nodes, w, rule.alpha if rule.alpha is not None else 0.5,
                              rule.weight.format, rule.activation.format, rule.activation.granularity))
    return jobs


def observers_for(jobs: list[SmoothJob]) -> dict[str, list]:
    """Tensor name -> observers: per-channel |x| max, and a row sample for alpha = "auto"."""
    return {job.x: [ChannelAbsMaxObserver()] + ([ActivationSampleObserver()] if job.alpha == "auto" else [])
            for job in jobs}


def run_smoothing(jobs: list[SmoothJob], watch: dict[str, list]) -> dict[str, SmoothResult]:
    """The smoothing factors by input tensor name, from the filled observers of `observers_for`."""
    results = {}
    for job in jobs:
        act_max = watch[job.x][0].value().double().numpy()
        w_max = np.abs(job.weight).max(axis=1)
        if job.alpha != "auto":
            results[job.x] = SmoothResult(smoothing_factors(act_max, w_max, float(job.alpha)), float(job.alpha))
            continue
        sample = watch[job.x][1].value().double().cpu().numpy()
        errors = {a: layer_error(sample, job.weight, smoothing_factors(act_max, w_max, a), job.weight_format,
                                 job.act_format, job.act_granularity) for a in ALPHA_GRID}
        best = min(errors, key=errors.get)
        results[job.x] = SmoothResult(smoothing_factors(act_max, w_max, best), best, errors)
        logger.info("SmoothQuant %s: alpha %.1f (error %.3g; 0.5: %.3g)", job.x, best, errors[best], errors[0.5])
    return results


def smooth_model(model: onnx.ModelProto, recipe, data, options, *, device: str = "cpu", progress=None,
                 jobs: list[SmoothJob] | None = None) -> tuple[onnx.ModelProto, list[dict], list[str]]:
    """(the smoothed FP model, one report entry per group, the pass notes) after streaming `data` through
    `model` once.

    The report says per group: input tensor, layers, alpha, and where 1/s went ("folded" or the reason an
    explicit Mul stays); the notes are SmoothQuantPass's summary lines for the build summary."""
    from qcompile.calibration import calibrate
    from qcompile.passes import PassManager, export_model, import_model
    from qcompile.passes.smooth_quant import SmoothQuantPass

    jobs = plan_smoothing(model, recipe) if jobs is None else jobs
    if not jobs:
        return model, [], []
    watch = observers_for(jobs)
    calibrate(model, [], data, options, device=device, progress=progress, extra_observers=watch)
    results = run_smoothing(jobs, watch)
    graph = import_model(model)
    result = PassManager([SmoothQuantPass(recipe, {x: r.s for x, r in results.items()})]).run(graph)
    declined = dict(result.declined)
    report = []
    for job in jobs:
        reason = declined.get(job.nodes[0])
        report.append({"input": job.x, "layers": job.nodes, "alpha": results[job.x].alpha,
                       "inverse_scale": reason.split(": ", 1)[1] if reason else "folded into the producer"})
        if reason:
            logger.warning("SmoothQuant %s: %s", ", ".join(job.nodes), reason)
    return export_model(result.graph, like=model), report, result.notes
