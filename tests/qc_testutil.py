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


def save_samples(path, source, count: int, sizes: dict, seed: int):
    """`count` random inputs of `source` (a SourceModel) stacked into an .npz (the calibration data format)."""
    rng = np.random.default_rng(seed)
    samples = [source.random_inputs(rng, sizes) for _ in range(count)]
    np.savez(path, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    return path
