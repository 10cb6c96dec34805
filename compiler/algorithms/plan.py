"""Run the recipe's INT4 weight algorithms (AWQ, GPTQ) on a model: which statistics, then which weights.

1. `plan_int4_jobs(model, recipe)`: the weight-only INT4 MatMuls whose rule names `awq` or `gptq`, with
   their FP weight and input tensor.
2. `observers_for(jobs)`: the streamed statistics the jobs need, one set per watched tensor (shared by the
   layers that read it; hand them to `calibrate(..., extra_observers=...)`): AWQ per-channel mean |x| and an
   activation sample, GPTQ the Hessian 2/n Σ xᵀx. No activations are stored beyond AWQ's bounded sample.
3. `run_jobs(jobs, observers)`: the quantized weights by node name, and for AWQ the per-input-channel
   scales s (the graph divides the layer's input by s) — what `QuantizeWeightsInt4Pass` consumes. AWQ
   layers that read the same tensor (q/k/v after one norm, gate/up) get ONE scale search on their
   concatenated weights, as AWQ does, so that one s can be folded into the tensor's producer
   (`FoldAwqScalesPass`).
4. `awq_input_amax(jobs, observers, scales)`: for W4A8 AWQ layers (static FP8 activations), the amax of the
   scaled input x / s that their activation quantizer sees, max_c(max|x_c| / s_c), from per-channel maxima
   observed in the same pass (exact whatever the calibration method) — what `InsertQDQPass` consumes.
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
from qcompile.calibration.observers import ChannelMaxObserver

logger = logging.getLogger(__name__)


@dataclass
class Int4Job:
    node: str
    algorithm: str  # "awq" or "gptq"
    x: str  # the input tensor to observe
    weight: np.ndarray  # FP [K, N]
    group_size: int | None
    symmetric: bool
    static_activation: bool = False  # W4A8: the rule also quantizes the (scaled) input with a static scale


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
        static = rule.activation is not None and rule.activation.mode == "static"
        jobs.append(Int4Job(node.name, rule.algorithm, node.inputs[0].name, np.asarray(w, np.float32),
                            rule.weight.group_size, rule.weight.symmetric, static))
    return jobs


def observers_for(jobs: list[Int4Job]) -> dict[str, list]:
    """Tensor name -> the observers to update with it (one of each kind the jobs reading it need)."""
    watch: dict[str, list] = {}
    for job in jobs:
        kinds = (ActAbsMeanObserver, ActivationSampleObserver) if job.algorithm == "awq" else (HessianObserver,)
        have = watch.setdefault(job.x, [])
        have.extend(kind() for kind in kinds if not any(isinstance(o, kind) for o in have))
    for x in dict.fromkeys(j.x for j in jobs if j.algorithm == "awq" and j.static_activation):
        watch[x].append(ChannelMaxObserver())
    return watch


def awq_groups(jobs: list[Int4Job]) -> list[list[Int4Job]]:
    """The AWQ jobs grouped by shared input tensor (and group size, symmetry): one scale search each."""
    groups: dict[tuple, list[Int4Job]] = {}
    for job in jobs:
        if job.algorithm == "awq":
            groups.setdefault((job.x, job.group_size, job.symmetric), []).append(job)
    return list(groups.values())


def run_jobs(jobs: list[Int4Job], watch: dict[str, list], device: str = "cpu"
             ) -> tuple[dict[str, QuantizedWeight], dict[str, np.ndarray]]:
    """(quantized weights by node, AWQ input scales by node) from the filled observers of `observers_for`.

    Each AWQ group (`awq_groups`) is searched on its weights concatenated along N: one s for all its layers
    (the loss is the error of all their outputs), then split back per layer (clipping is per column anyway).
    """
    quantized, input_scales = {}, {}
    for group in awq_groups(jobs):
        job = group[0]
        w = torch.from_numpy(np.concatenate([j.weight for j in group], axis=1)).to(device)
        result = awq_search(w, _observer(watch, job.x, ActivationSampleObserver).value(),
                            _observer(watch, job.x, ActAbsMeanObserver).value(), job.group_size,
                            symmetric=job.symmetric)
        scales = result.scales.cpu().numpy().astype(np.float32)
        for j, qweight in zip(group, _split_columns(result.qweight.to("cpu"), [j.weight.shape[1] for j in group])):
            quantized[j.node], input_scales[j.node] = qweight, scales
        logger.info("AWQ %s: alpha %.2f, loss %.3g -> %.3g", ", ".join(j.node for j in group), result.alpha,
                    result.losses.get("rtn", float("nan")), result.losses.get("final", float("nan")))
    for job in jobs:
        if job.algorithm == "gptq":
            hessian = _observer(watch, job.x, HessianObserver).value().to(device)
            quantized[job.node] = gptq_quantize(torch.tensor(job.weight, device=device), hessian, job.group_size,
                                                symmetric=job.symmetric).to("cpu")
    return quantized, input_scales


GPTQ_TOKENS_PER_CHANNEL = 4  # calibration tokens per input channel below which GPTQ gets a note


def gptq_data_notes(jobs: list[Int4Job], watch: dict[str, list]) -> list[str]:
    """A note when GPTQ layers saw fewer than GPTQ_TOKENS_PER_CHANNEL x K calibration tokens: their Hessian
    estimate is then too noisy and GPTQ fits the calibration tokens instead of the layer (on tiny-llama,
    K = 256: 512 tokens gave 0.4 dB less output SQNR than round to nearest, 1024 tokens 0.4 dB more, 2048
    tokens 0.9 dB more; tools/diag/gptq_calib_tokens.py)."""
    short = {}
    for job in jobs:
        if job.algorithm == "gptq":
            tokens = _observer(watch, job.x, HessianObserver).tokens
            if tokens < GPTQ_TOKENS_PER_CHANNEL * job.weight.shape[0]:
                short[job.node] = (tokens, job.weight.shape[0])
    if not short:
        return []
    tokens = min(t for t, _ in short.values())
    k = max(k for _, k in short.values())
    layers = f"{len(short)} layer{'s' * (len(short) != 1)}"
    need = GPTQ_TOKENS_PER_CHANNEL * k
    note = (f"GPTQ: {layers} saw fewer than {GPTQ_TOKENS_PER_CHANNEL}x as many calibration tokens as input "
            f"channels (as few as {tokens} tokens for K up to {k}): their Hessians are too noisy and GPTQ may do "
            f"worse than round to nearest; calibrate on at least {need} tokens (more samples or longer sequences)")
    logger.warning(note)
    return [note]


def _observer(watch: dict[str, list], x: str, kind: type):
    return next(o for o in watch[x] if isinstance(o, kind))


def _split_columns(qw: QuantizedWeight, widths: list[int]) -> list[QuantizedWeight]:
    """`qw` [K, sum(widths)] cut along N into [K, width] pieces."""
    bounds = np.cumsum([0, *widths])

    def cut(t):
        return None if t is None else [t[:, a:b].contiguous() for a, b in zip(bounds[:-1], bounds[1:])]

    zeros = cut(qw.zero) or [None] * len(widths)
    return [QuantizedWeight(q, s, z, qw.group_size) for q, s, z in zip(cut(qw.q), cut(qw.scale), zeros)]


def awq_input_amax(jobs: list[Int4Job], watch: dict[str, list], input_scales: dict[str, np.ndarray]
                   ) -> dict[str, float]:
    """W4A8 AWQ layers: node -> amax of the scaled input x / s, max_c(max|x_c| / s_c) (see the module doc)."""
    amax = {}
    for job in jobs:
        if job.algorithm == "awq" and job.static_activation and job.node in input_scales:
            channel_max = next(o for o in watch[job.x] if isinstance(o, ChannelMaxObserver)).value()
            scaled = channel_max.double().cpu().numpy() / input_scales[job.node].astype(np.float64)
            amax[job.node] = float(scaled.max())
    return amax
