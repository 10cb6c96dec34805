"""Error metrics between a reference output and an engine output, computed in float64.

`compare_arrays(reference, actual)` gives, per output tensor:
- ``max_abs`` / ``mean_abs``: absolute error |actual - reference|;
- ``max_rel``: max |actual - reference| / (|reference| + eps), eps = 1e-6 * max|reference| (a floor so
  that zeros of the reference do not make it infinite);
- ``cosine``: cosine similarity of the flattened tensors (1.0 when both are all zeros);
- ``sqnr_db``: 10 log10(sum reference² / sum (actual - reference)²), the signal being the reference
  (inf when the outputs are equal);
- ``top1``: for logits-like outputs, the fraction of positions whose arg-max over the last axis agrees.
"""
from __future__ import annotations

import math

import numpy as np

METRICS = ("max_abs", "mean_abs", "max_rel", "cosine", "sqnr_db", "top1")


def is_logits_like(name: str, array: np.ndarray) -> bool:
    """Outputs whose arg-max is the prediction: named like logits, floating, at least 2 classes."""
    return "logit" in name.lower() and np.issubdtype(array.dtype, np.floating) and array.ndim >= 1 \
        and array.shape[-1] >= 2


def compare_arrays(reference: np.ndarray, actual: np.ndarray, *, top1: bool = False) -> dict[str, float | None]:
    """The metrics of `actual` against `reference` (same shape); see the module docstring."""
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if ref.shape != act.shape:
        raise ValueError(f"shape {act.shape} does not match the reference shape {ref.shape}")
    err = act - ref
    abs_err = np.abs(err)
    ref_mag = np.abs(ref)
    floor = 1e-6 * (ref_mag.max() if ref.size else 0.0) or np.finfo(np.float64).tiny
    signal = float(np.sum(ref * ref))
    noise = float(np.sum(err * err))
    norms = math.sqrt(signal) * math.sqrt(float(np.sum(act * act)))
    if norms == 0.0:
        cosine = 1.0 if noise == 0.0 else 0.0
    else:
        cosine = float(np.sum(ref * act) / norms)
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    result = {
        "max_abs": float(abs_err.max()) if ref.size else 0.0,
        "mean_abs": float(abs_err.mean()) if ref.size else 0.0,
        "max_rel": float((abs_err / (ref_mag + floor)).max()) if ref.size else 0.0,
        "cosine": cosine,
        "sqnr_db": sqnr,
        "top1": None,
    }
    if top1 and ref.ndim >= 1 and ref.size:
        result["top1"] = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(act, axis=-1)))
    if not np.isfinite(act).all():
        result.update(cosine=float("nan"), sqnr_db=float("nan"))
    return result


def merge_iterations(per_iteration: list[dict[str, float | None]]) -> dict[str, float | None]:
    """One row from several iterations' metrics: the worst value of each (max errors, min similarity)."""
    merged: dict[str, float | None] = {}
    for key in METRICS:
        values = [m[key] for m in per_iteration if m.get(key) is not None]
        if not values:
            merged[key] = None
        elif key in ("max_abs", "max_rel"):
            merged[key] = max(values)
        elif key == "mean_abs":
            merged[key] = float(np.mean(values))
        else:  # similarity: the worst iteration decides (NaN propagates)
            merged[key] = float("nan") if any(math.isnan(v) for v in values) else min(values)
    return merged
