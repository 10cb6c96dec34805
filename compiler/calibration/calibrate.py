"""Run the FP graph on calibration data and measure the range of each quantized activation.

The graph runs through our own lowering (`qcompile.lowering.lower_onnx`), so calibration uses
the GPU when there is one. Samples are streamed one at a time under ``torch.no_grad()`` and
each captured tensor only updates its observer: activations are never accumulated.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import onnx

from qcompile.calibration.data import CalibrationData
from qcompile.calibration.observers import make_observer
from qcompile.errors import CalibrationError

logger = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    """What calibration measured.

    Attributes:
        amax: tensor name -> the range to quantize it with (what the recipe's method gives).
        num_samples: samples run.
        description, is_random: from the data (reports say when the data was random).
        method: "max" or "percentile"; percentile: its value (method "percentile" only).
        stats: tensor name -> extra numbers for reports ("max": the true |x| max, "amax", ...).
    """

    amax: dict[str, float]
    num_samples: int
    description: str
    is_random: bool
    method: str
    percentile: float | None = None
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def _lower(model: onnx.ModelProto, device: str):
    from qcompile.lowering import lower_onnx

    return lower_onnx(model).to(device)


def calibrate(model: onnx.ModelProto, tensors: list[str], data: CalibrationData, options, *,
              device: str = "cpu", progress: Callable[[int, int | None], None] | None = None,
              extra_observers: dict[str, list] | None = None) -> CalibrationResult:
    """Measure the range of each tensor in `tensors` over `data` (see `CalibrationOptions`).

    `extra_observers`: tensor name -> more observers (anything with `update(tensor)`, e.g. the AWQ / GPTQ
    statistics of `qcompile.algorithms.plan`) fed in the same streaming pass.

    Raises:
        CalibrationError: a tensor is not in the graph, the data holds no samples, or a tensor
            took NaN/Inf values.
    """
    import torch

    extra_observers = extra_observers or {}
    tensors = list(dict.fromkeys(tensors))
    watched = list(dict.fromkeys([*tensors, *extra_observers]))
    graph_inputs = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}
    produced = {o for n in model.graph.node for o in n.output} | graph_inputs
    unknown = [t for t in watched if t not in produced]
    if unknown:
        raise CalibrationError(f"cannot calibrate tensor {unknown[0]!r}: no node of the graph produces it")
    from_feeds = [t for t in watched if t in graph_inputs]
    to_capture = [t for t in watched if t not in graph_inputs]
    observers = {t: [make_observer(options)] if t in tensors else [] for t in watched}
    for name, extra in extra_observers.items():
        observers[name] = observers[name] + list(extra)
    total = data.num_samples
    if options.max_samples is not None:
        total = options.max_samples if total is None else min(total, options.max_samples)

    program = _lower(model, device)
    count = 0
    with torch.no_grad():
        for sample in data:
            if options.max_samples is not None and count >= options.max_samples:
                break
            feeds = {k: torch.from_numpy(v).to(device) for k, v in sample.items()}
            _, captured = program.run(feeds, capture=to_capture)
            for name in to_capture:
                if name not in captured:
                    raise CalibrationError(f"the lowered program did not capture tensor {name!r}")
                for obs in observers[name]:
                    obs.update(captured[name])
            for name in from_feeds:
                for obs in observers[name]:
                    obs.update(feeds[name])
            del captured, feeds
            count += 1
            if progress is not None:
                progress(count, total)
    if count == 0:
        raise CalibrationError(f"calibration data {data.description} yielded no samples")

    amax, stats = {}, {}
    for name in tensors:
        obs = observers[name][0]
        value = obs.amax()
        if not math.isfinite(value) or not math.isfinite(obs.true_max()):
            raise CalibrationError(f"tensor {name!r} took NaN or Inf values during calibration on "
                                   f"{data.description}; check the model and the data")
        amax[name] = value
        stats[name] = obs.stats()
    logger.info("calibrated %d tensors on %d samples (%s, %s)", len(amax), count, data.description, options.method)
    return CalibrationResult(amax, count, data.description, data.is_random, options.method,
                             options.percentile if options.method == "percentile" else None, stats)
