"""Polygraphy runners: a qcompile engine, the ONNX Runtime reference, and the float64 lowering fallback.

- `QcompileRunner(engine_path)`: loads the engine in `activate` (not in `__init__`: Polygraphy builds
  runners before it runs them), takes its input metadata from the manifest (named dynamic dims).
- `onnxrt_reference(model)`: Polygraphy's `OnnxrtRunner` on CPU with ONNX Runtime's graph optimizations
  off (its optimizer rewrites Q/DQ numerics).
- `LoweringRunner(model)`: the graph run by our lowering in float64, for graphs ONNX Runtime cannot run.
- `exact_output_match`: a `find_output_func` that pairs outputs by exact name only (Polygraphy's default
  falls back to substring and position matching, which silently pairs the wrong tensors).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# numpy dtype names (qcompile.iospec) that numpy itself cannot name without ml_dtypes
_NON_NUMPY_DTYPES = {"bfloat16": DataType.BFLOAT16, "float8_e4m3fn": DataType.FLOAT8E4M3FN}


def polygraphy_dtype(name: str):
    """The Polygraphy `DataType` of a numpy dtype name as used in `IOSpec.dtype`."""
    return _NON_NUMPY_DTYPES.get(name) or DataType.from_dtype(np.dtype(name), "numpy")


class QcompileRunner(BaseRunner):
    """Runs a qcompile engine file (loaded on `activate`, dropped on `deactivate`)."""

    def __init__(self, engine_path: str | Path, name: str | None = None):
        super().__init__(name=name, prefix="qcompile-runner")
        self.engine_path = str(engine_path)

    def activate_impl(self):
        import qcompile

        self.engine = qcompile.load(self.engine_path)

    def get_input_metadata_impl(self) -> TensorMetadata:
        """Names, dtypes and shapes of the engine inputs; dynamic dims are their names (e.g. "batch")."""
        meta = TensorMetadata()
        for spec in self.engine.manifest.inputs:
            meta.add(spec.name, dtype=polygraphy_dtype(spec.dtype), shape=list(spec.shape))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = self.engine.run(dict(feed_dict))  # numpy arrays or torch tensors
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, outputs[name]) for name in self.engine.output_names)

    def deactivate_impl(self):
        self.engine.close()
        del self.engine


def onnxrt_reference(model: onnx.ModelProto, name: str = "onnxrt-reference") -> BaseRunner:
    """Polygraphy's ONNX Runtime runner for `model` on CPU, graph optimizations off.

    The session is created here, so a graph ONNX Runtime cannot run fails now, with ONNX Runtime's own
    exception (callers fall back to another reference). Models over the 2 GB protobuf limit are saved
    to a temp dir with external data (removed with the runner).
    """
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    model_or_path, folder = _model_bytes_or_path(model)
    try:
        session = SessionFromOnnx(model_or_path, providers=["CPUExecutionProvider"],
                                  graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)()
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    runner = OnnxrtRunner(session, name=name)
    if folder is not None:
        weakref.finalize(runner, shutil.rmtree, folder, True)
    return runner


def _model_bytes_or_path(model: onnx.ModelProto) -> tuple[bytes | str, str | None]:
    """(serialized `model`, None), or (path, its temp dir) with external data past the protobuf limit."""
    if model.ByteSize() < PROTOBUF_LIMIT:
        return model.SerializeToString(), None
    folder = tempfile.mkdtemp(prefix="qcompile-reference-")
    path = str(Path(folder) / "model.onnx")
    logger.info("reference model is over 2 GB; saving it with external data to %s", path)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the initializers in place
    onnx.save(copy, path, save_as_external_data=True, location="model.onnx.data")
    return path, folder


class LoweringRunner(BaseRunner):
    """Runs an ONNX graph through qcompile's lowering in float64 (the reference ONNX Runtime cannot be).

    Outputs come back in the graph's declared dtypes.
    """

    def __init__(self, model: onnx.ModelProto, name: str = "lowering-float64"):
        super().__init__(name=name, prefix="lowering-runner")
        self.model = model

    def activate_impl(self):
        import torch

        from qcompile.lowering import lower_onnx

        self.program = lower_onnx(self.model, compute_dtype=torch.float64)

    def get_input_metadata_impl(self) -> TensorMetadata:
        """The graph inputs (initializers excluded); dynamic dims are their dim_param, or None when unnamed."""
        meta = TensorMetadata()
        inits = {i.name for i in self.model.graph.initializer}
        for value in self.model.graph.input:
            if value.name in inits:
                continue
            t = value.type.tensor_type
            shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
            meta.add(value.name, dtype=DataType.from_dtype(t.elem_type, "onnx"), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        import torch

        from qcompile.engine.load import to_numpy, to_torch  # bfloat16 / float8 aware conversions

        start = time.perf_counter()
        with torch.inference_mode():
            outputs, _ = self.program.run({name: to_torch(value) for name, value in feed_dict.items()})
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, to_numpy(outputs[name])) for name in self.program.output_names)

    def deactivate_impl(self):
        del self.program


def exact_output_match(name, index, other_outputs, base_iter_result=None):
    """Polygraphy `find_output_func`: `[name]` when `other_outputs` has an output of exactly that name, else None.

    Polygraphy calls it as `find_output_func(name, index, iter_result)`; unlike its default it never pairs
    an output with a near-named (substring) or same-position one. `base_iter_result` is accepted and unused.
    """
    return [name] if name in other_outputs else None
