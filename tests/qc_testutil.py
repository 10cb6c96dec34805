"""Helpers shared by the tests (importable because pytest's `pythonpath` includes tests/)."""
import numpy as np
import onnxruntime as ort


def ort_session(model):
    """ONNX Runtime on CPU with graph optimizations off (its optimizer rewrites Q/DQ numerics)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
