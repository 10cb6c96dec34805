"""`qcompile inspect`: describe an engine file (from its manifest) or an ONNX model."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from qcompile.errors import QCompileError

FP4_LAYOUT_WORDS = {"planar": "planar int32 words (K a multiple of 128; bytes otherwise)",
                    "pairs": "planar int32 words in row pairs (K a multiple of 128 and N even; else planar or bytes)",
                    "bytes": "uint8 bytes, two codes each"}


def describe(path: str | Path) -> dict[str, Any]:
    """A dict with `kind`, `header` rows, `io` rows and `layers` rows for `path`."""
    path = Path(path)
    if not path.is_file():
        raise QCompileError(f"{path} does not exist; give an engine file or an .onnx file")
    if zipfile.is_zipfile(path):
        return _describe_engine(path)
    return _describe_onnx(path)


def _describe_engine(path: Path) -> dict[str, Any]:
    from qcompile.algorithms.fp4 import FORMATS as FP4_FORMATS
    from qcompile.engine import read_manifest

    m = read_manifest(path).to_dict()
    m.update(m.pop("extra", None) or {})
    recipe = m.get("recipe") or {}
    calib = m.get("calibration") or {}
    header = [
        ("format version", m.get("format_version")),
        ("qcompile", m.get("qcompile_version")),
        ("torch", m.get("torch_version")),
        ("device", f"{m.get('device')} {m.get('device_name', '')} {m.get('compute_capability') or ''}".strip()),
        ("recipe", recipe.get("name")),
        ("compute dtype", m.get("compute_dtype")),
        ("calibration", calib.get("data", "not needed")),
        ("content hash", (m.get("content_hash") or "")[:16]),
    ]
    if m.get("fp8_large_m"):
        header.append(("large-M GEMMs", "INT4/FP4 above 128 rows in FP8 (--fp8-large-m)"))
    if m.get("fp4_layout") and any(str(r.get("format", "")).split("/")[0] in FP4_FORMATS for r in m.get("layers", [])):
        header.append(("FP4 weights", FP4_LAYOUT_WORDS.get(m["fp4_layout"], m["fp4_layout"])))
    one_row = m.get("one_row_model")
    if one_row is not None:
        header.append(("one-row model", "compiled: a call with every dynamic dim at 1 runs its own graph"
                       if one_row else "asked for, not compiled (the build log says why)"))
    if m.get("pdl"):
        count = m.get("pdl_kernels")
        kernels = "Inductor's kernels" if count is None else f"{count} of Inductor's kernels"
        header.append(("kernel launches", f"{kernels} with programmatic dependent launch (--pdl)"))
    validation = m.get("validation")
    if validation:
        verdict = "PASSED" if validation.get("passed") else "FAILED"
        cosine = validation.get("min_cosine")
        header.append(("last validation", f"{verdict} vs {validation.get('reference')} graph"
                       f"{'' if cosine is None else f', min cosine {cosine:.5f}'}, {validation.get('created')} "
                       f"({validation.get('report')})"))
    else:
        header.append(("last validation", "never (run `qcompile validate`)"))
    io = [_io_row(t, "input") for t in m.get("inputs", [])] + [_io_row(t, "output") for t in m.get("outputs", [])]
    return {"kind": "engine", "header": header, "io": io, "layers": m.get("layers", []), "manifest": m}


def _io_row(t: dict, io: str) -> dict:
    ranges = ", ".join(f"{k} {v[0]}..{v[1]}" for k, v in (t.get("dim_ranges") or {}).items())
    return {"name": t["name"], "io": io, "dtype": t["dtype"], "shape": _shape(t["shape"]), "ranges": ranges}


def _describe_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from qcompile.layers import initializer_bytes, layer_table
    from qcompile.report import human_bytes

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise QCompileError(f"{path} is neither an engine file nor a readable ONNX model: {exc}") from None

    def value_row(v, io):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "io": io,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?",
                "shape": _shape(dims), "ranges": ""}

    init_names = {i.name for i in model.graph.initializer}
    io = [value_row(v, "input") for v in model.graph.input if v.name not in init_names]
    io += [value_row(v, "output") for v in model.graph.output]
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    header = [("opsets", opsets), ("nodes", len(model.graph.node)),
              ("initializers", human_bytes(initializer_bytes(model)))]
    return {"kind": "onnx", "header": header, "io": io, "layers": [r.to_dict() for r in layer_table(model)]}


def _shape(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"
