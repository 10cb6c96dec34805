"""Run the recipe's INT4 weight algorithms (AWQ, GPTQ) on a model: which statistics, then which weights.

1. `plan_int4_jobs(model, recipe)`: the weight-only INT4 MatMuls whose rule names `awq` or `gptq`, with
   their FP weight and input tensor.
2. `observers_for(jobs)`: the streamed statistics each job needs, keyed by the tensor to watch (hand them
   to `calibrate(..., extra_observers=...)`): AWQ per-channel mean |x| and an activation sample, GPTQ the
   Hessian 2/n Σ xᵀx. No activations are stored beyond AWQ's bounded sample.
3. `run_jobs(jobs, observers)`: the quantized weights by node name, and for AWQ the per-input-channel
   scales s (the graph divides the layer's input by s) — what `QuantizeWeightsInt4Pass` consumes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from qcompile.algorithms.awq import ActAbsMeanObserver, ActivationSampleObserver, awq_search
from qcompile.algorithms.gptq import HessianObserver, gptq_quantize
from qcompile.algorithms.int4 import QuantizedWeight

logger = logging.getLogger(__name__)


@dataclass
class Int4Job:
    node: str
    algorithm: str  # "awq" or "gptq"
    x: str  # the input tensor to observe
    weight: np.ndarray  # FP [K, N]
    group_size: int | None
    symmetric: bool


def plan_int4_jobs(model: onnx.ModelProto, recipe) -> list[Int4Job]:
    """The AWQ/GPTQ layers of `model` (weight-only INT4 MatMuls with a constant 2-D weight)."""
    from qcompile.passes import _graph as G
    from qcompile.passes.quantize_weights_int4 import decline_reason, int4_targets

    if not any(r.algorithm in ("awq", "gptq") and r.weight is not None and r.weight.format == "int4"
               for r in recipe.rules):
        return []  # most recipes: no graph import (a full copy of the weights) on the build path
    graph = G.import_model(model)
    jobs = []
    for node, rule in int4_targets(graph, recipe):
        w = G.const_values(node.inputs[1])
        if rule.algorithm not in ("awq", "gptq") or decline_reason(node, w, rule, recipe):
            continue  # RTN, or QuantizeWeightsInt4Pass declines it (with the reason)
        jobs.append(Int4Job(node.name, rule.algorithm, node.inputs[0].name, np.asarray(w, np.float32),
                            rule.weight.group_size, rule.weight.symmetric))
    return jobs


def observers_for(jobs: list[Int4Job]) -> dict[str, list]:
    """Tensor name -> the observers to update with it (one set per job, in job order)."""
    watch: dict[str, list] = {}
    for job in jobs:
        if job.algorithm == "awq":
            watch.setdefault(job.x, []).extend([ActAbsMeanObserver(), ActivationSampleObserver()])
        else:
            watch.setdefault(job.x, []).append(HessianObserver())
    return watch


def run_jobs(jobs: list[Int4Job], watch: dict[str, list], device: str = "cpu"
             ) -> tuple[dict[str, QuantizedWeight], dict[str, np.ndarray]]:
    """(quantized weights by node, AWQ input scales by node) from the filled observers of `observers_for`."""
    taken: dict[str, int] = {}
    quantized, input_scales = {}, {}
    for job in jobs:
        start = taken.get(job.x, 0)
        w = torch.from_numpy(job.weight).to(device)
        if job.algorithm == "awq":
            mean, sample = watch[job.x][start:start + 2]
            taken[job.x] = start + 2
            result = awq_search(w, sample.value(), mean.value(), job.group_size, symmetric=job.symmetric)
            quantized[job.node] = result.qweight.to("cpu")
            input_scales[job.node] = result.scales.cpu().numpy().astype(np.float32)
            logger.info("AWQ %s: alpha %.2f, loss %.3g -> %.3g", job.node, result.alpha,
                        result.losses.get("rtn", float("nan")), result.losses.get("final", float("nan")))
        else:
            hessian = watch[job.x][start]
            taken[job.x] = start + 1
            quantized[job.node] = gptq_quantize(w, hessian.value().to(device), job.group_size,
                                                symmetric=job.symmetric).to("cpu")
    return quantized, input_scales
