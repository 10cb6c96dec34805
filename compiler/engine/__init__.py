"""Engine files: build (`build_engine`), inspect (`read_manifest`) and run (`load` -> `Engine`; `GraphReplay`: one
input shape captured as a CUDA graph).

An engine file is a zip (stored) with `manifest.json` (see `Manifest`), `model.pt2` (an AOTInductor
package) and, from `qcompile build`, `quantized.onnx` (the quantized plugin graph, for per-layer validation). It is tied to the torch major.minor and the device kind (and GPU compute capability) that built it.
"""
from qcompile.engine.build import build_engine, update_manifest
from qcompile.engine.graph_replay import GraphReplay
from qcompile.engine.load import Engine, check_compatible, load, read_manifest, read_member
from qcompile.engine.manifest import FORMAT_VERSION, QUANTIZED_ONNX_NAME, IOSpec, Manifest

__all__ = ["build_engine", "update_manifest", "load", "read_manifest", "read_member", "check_compatible", "Engine",
           "GraphReplay", "IOSpec", "Manifest", "FORMAT_VERSION", "QUANTIZED_ONNX_NAME"]
