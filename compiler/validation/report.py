"""`ValidationReport`: what a validation compared, on which data, the metrics and the verdicts.

Printed as tables (`format_report`) and saved as JSON next to the engine (`<engine>.validation.json`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qcompile.report import format_table, write_json_atomic

REPORT_SUFFIX = ".validation.json"


@dataclass
class OutputVerdict:
    """The metrics of one output (worst over the iterations) and the checks it failed."""

    name: str
    metrics: dict[str, float | None]
    failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass
class ValidationReport:
    engine: str
    reference: dict[str, Any]  # model, runtime, precision, note
    data: dict[str, Any]  # description, iterations, random
    thresholds: dict[str, float | None]
    outputs: list[OutputVerdict]
    versions: dict[str, str]
    created: str
    layers: list[dict] | None = None  # per-layer localization rows (worst offender first)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = {o.name: {**_finite(o.metrics), "passed": o.passed, "failed": o.failed} for o in self.outputs}
        d["passed"] = self.passed
        return d

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    def manifest_entry(self, report_path: Path) -> dict[str, Any]:
        """The summary an engine's manifest keeps of its last validation."""
        return {"report": report_path.name, "passed": self.passed, "created": self.created,
                "reference": self.reference.get("precision"),
                "min_cosine": min((o.metrics["cosine"] for o in self.outputs), default=None)}


def report_path_for(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + REPORT_SUFFIX)


def format_report(report: ValidationReport) -> str:
    """The terminal view: reference and data lines, then one row per output with its verdict."""
    t = report.thresholds
    rows = []
    for o in report.outputs:
        m = o.metrics
        rows.append((o.name, m["max_abs"], m["mean_abs"], m["max_rel"], m["cosine"], m["sqnr_db"],
                     "-" if m.get("top1") is None else m["top1"],
                     "PASS" if o.passed else "FAIL: " + ", ".join(o.failed)))
    limits = ", ".join(f"{k} {v:g}" for k, v in t.items() if v is not None)
    lines = [
        f"reference: {report.reference['model']} ({report.reference['runtime']}, {report.reference['precision']})",
        f"data: {report.data['description']} ({report.data['iterations']} iterations)",
    ]
    if report.reference.get("note"):
        lines.append(f"note: {report.reference['note']}")
    lines.append(format_table(["output", "max abs", "mean abs", "max rel", "cosine", "SQNR dB", "top-1", "verdict"],
                              rows, title=f"Validation vs the {report.reference['precision']} graph ({limits})"))
    lines.append(f"validation {'PASSED' if report.passed else 'FAILED'}")
    return "\n".join(lines)


def _finite(metrics: dict) -> dict:
    """JSON has no inf/nan: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
