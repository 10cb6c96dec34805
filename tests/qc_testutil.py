"""Helpers shared by the tests (importable because pytest's `pythonpath` includes tests/)."""
import contextlib
import io
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch


def ort_session(model):
    """ONNX Runtime on CPU with graph optimizations off (its optimizer rewrites Q/DQ numerics)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_close_to(y: torch.Tensor, ref: np.ndarray, rel: float):
    """`y` (any device, any float dtype) against a float64 result of the same shape: within `rel` relative, and
    `rel` of the result's largest magnitude absolute (so entries near zero are held to the result's scale)."""
    got = y.float().cpu().numpy().astype(np.float64)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rel, atol=rel * max(np.abs(ref).max(), 1e-6))


def save_samples(path, source, count: int, sizes: dict, seed: int):
    """`count` random inputs of `source` (a SourceModel) stacked into an .npz (the calibration data format)."""
    rng = np.random.default_rng(seed)
    samples = [source.random_inputs(rng, sizes) for _ in range(count)]
    np.savez(path, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    return path


@dataclass
class CliRun:
    """One in-process `qcompile` command: exit code, stdout, stderr, and for `build` the BuildResult."""

    code: int
    out: str
    err: str
    result: object = None


def run_cli(*argv) -> CliRun:
    """Run `qcompile ARGV` in-process with stdout and stderr captured (usable where capsys is not: session
    fixtures); a `build` also hands back the `BuildResult` that `qcompile.pipeline.build` returned."""
    import pytest

    import qcompile.pipeline
    from qcompile.cli import main

    results = []
    real = qcompile.pipeline.build

    def build(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(qcompile.pipeline, "build", build)
        code = main([str(a) for a in argv])
    return CliRun(code, out.getvalue(), err.getvalue(), results[0] if results else None)


def launch_spy(record):
    """A `wrap` for the plugins' launchers that runs the raw Triton kernel and calls `record(grid, kwargs)` at
    each launch (so a test can check which specialization a launcher chose)."""
    def wrap(fn):
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    record(grid, kwargs)
                    return fn[grid](*args, **kwargs)
                return run
        return Launch()
    return wrap


def no_0d_launch_arguments(fake_impl):
    """The fake-tensor implementation of Triton launches in a trace (`triton_kernel_wrapper_mutation`'s), failing on
    a 0-d tensor argument. AOTInductor inlines a 0-d graph constant (a scale of the engine) as a scalar
    `ir.Constant`, and a Triton launch given one fails to compile ("'<=' not supported between instances of
    'Constant' and 'int'": the W4A4 engines on an H100, thirty-third session); the plugins pass such scalars as [1]
    tensors (`gemm_dispatch.scalar_buffer`)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    def checked(mode, **launch):
        flat = [name for name, a in launch["kwargs"].items() if isinstance(a, torch.Tensor) and a.dim() == 0]
        if flat:
            kernel = kernel_side_table.get_kernel(launch["kernel_idx"])
            name = getattr(getattr(kernel, "fn", kernel), "__name__", "a Triton kernel")
            raise AssertionError(f"{name}: launch argument {flat[0]} is a 0-d tensor; pass it as "
                                 "gemm_dispatch.scalar_buffer(t)")
        return fake_impl(mode, **launch)
    return checked


def fake_cuda(monkeypatch):
    """A FakeTensorMode in which torch believes it has an H200 (sm_90, 132 SMs) and Triton, so a plugin's GPU body
    traces on a machine without a GPU; a Triton launch with a 0-d tensor argument fails (`no_0d_launch_arguments`).
    Tensors made inside are fake: weights of any size cost nothing."""
    import types

    import torch.utils._triton
    from torch._subclasses.fake_tensor import FakeTensorMode

    for check in ("has_triton", "has_triton_tensor_descriptor_host_tma"):  # torch looks for a GPU otherwise
        monkeypatch.setattr(torch.utils._triton, check, lambda: True)
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation as launch

    monkeypatch.setitem(launch.python_key_table, FakeTensorMode,
                        no_0d_launch_arguments(launch.python_key_table[FakeTensorMode]))
    props = types.SimpleNamespace(multi_processor_count=132, major=9, minor=0, name="NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *_: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    return FakeTensorMode(allow_non_fake_inputs=True)


def engine_dims() -> dict:
    """The dynamic dims of an engine's [batch, seq, K] activation, as torch.export Dims by axis."""
    return {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=1, max=4096)}


def export_on_fake_cuda(monkeypatch, op, weights: tuple, x: torch.Tensor, dynamic_rows: bool = True,
                        dims: dict | None = None) -> list:
    """torch.export of `op(x, *weights)` with a dynamic row count (x [M, K] with M even and >= 4 exported as an
    engine's [batch, seq, K], both dynamic; `dynamic_rows=False`: x's shape; `dims`: x's dynamic dims as
    {axis: torch.export.Dim}) on fake CUDA tensors, as an engine exports a plugin's GPU body (its M buckets in
    torch.cond, traced by Dynamo; a concrete M takes one bucket, traced without it), on a machine without a GPU
    (an H200, sm_90, 132 SMs, is what torch is told it has). Errors in the Python of the launch code show up here
    instead of on the GPU, and so does a 0-d tensor handed to a Triton launch (`no_0d_launch_arguments`). The
    weights are buffers and the program is then re-traced as AOTInductor re-traces it (`run_decompositions`), both
    under the engine build's Dynamo settings; the kernels are not compiled. Returns the re-traced graph's
    call_function targets."""
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, w in enumerate(weights):
                if isinstance(w, torch.Tensor):  # buffers, as an engine holds its weights
                    self.register_buffer(f"w{i}", w.to("cuda"))

        def forward(self, x):
            return op(x, *(getattr(self, f"w{i}") if isinstance(w, torch.Tensor) else w
                           for i, w in enumerate(weights)))

    if dims is None and dynamic_rows and x.shape[0] % 2 == 0 and x.shape[0] >= 4:
        x = x.reshape(2, x.shape[0] // 2, *x.shape[1:])  # as an engine's x: [batch, seq, K], seq from 1
        dims = engine_dims()
    elif dims is None and dynamic_rows:
        dims = {0: torch.export.Dim("rows", min=1, max=4096)}
    ep = export_and_retrace_on_fake_cuda(monkeypatch, Layer, x, dims)
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def export_and_retrace_on_fake_cuda(monkeypatch, make_module, x: torch.Tensor, dims: dict | None):
    """torch.export of `make_module()` (built on fake CUDA, `fake_cuda`, so its buffers cost nothing) on x (moved to
    fake CUDA) with x's dynamic dims `dims` ({axis: torch.export.Dim}, or None: static), then the re-trace
    AOTInductor runs first (`run_decompositions`: torch.cond's branches through Dynamo again), both under the
    engine build's Dynamo settings (`static_branch_ints`). Returns the re-traced program."""
    from qcompile.engine.build import static_branch_ints

    with fake_cuda(monkeypatch), static_branch_ints():
        ep = torch.export.export(make_module(), (x.to("cuda"),), dynamic_shapes={"x": dims} if dims else None)
        return ep.run_decompositions()


def expect_launch_keyword(monkeypatch, module, name: str, keyword: str, expected) -> None:
    """Makes the launcher `module.<name>` fail unless its keyword argument `keyword` is given (truthy) exactly when
    `expected` (a bool, or a function of the launch's arguments): raising is what torch.cond's tracing lets out of
    a branch (as `expect_tma`), so an export on fake tensors shows how each bucket launched (e.g. whether it
    finishes in the kernel)."""
    real = getattr(module, name)

    def launch(*args, **kwargs):
        if bool(kwargs.get(keyword)) != (expected(*args, **kwargs) if callable(expected) else expected):
            wanted = "unset" if kwargs.get(keyword) else "set"
            raise AssertionError(f"{name}: {keyword}={kwargs.get(keyword)!r}, expected it {wanted}")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, launch)


def up_to_64_rows(*launch_args, **_) -> bool:
    """Whether an INT4 or FP4 one-dot launch (x, weights, scales, zero points or global scale, group size or bias,
    cfg, ...) is of a bucket of at most 64 rows: those that ship finishing in the kernel (`expect_launch_keyword`)."""
    return launch_args[5]["BLOCK_M"] <= 64


def expect_tma(monkeypatch, expected, one_dot=None) -> None:
    """Makes a one-dot launch fail unless its TMA decision (`use_tma`) is `expected(cfg)` for the bucket's
    configuration: raising is what torch.cond's tracing lets out of a branch, so an export on fake tensors
    (`export_on_fake_cuda`) shows which loads each bucket took. `one_dot`: the kernel module (default INT4's)."""
    if one_dot is None:
        from qcompile.plugins.int4_gemm import one_dot

    decided = one_dot.use_tma

    def use_tma(cfg, x2d, n, on_cpu):
        took = decided(cfg, x2d, n, on_cpu)
        if took != expected(cfg):
            raise AssertionError(f"{cfg.get('BLOCK_M')}-row one-dot bucket: TMA {took}, expected {expected(cfg)}")
        return took
    monkeypatch.setattr(one_dot, "use_tma", use_tma)


def exported_op_arg(program, x, op, name: str):
    """The value an exported `program(x)` passes as argument `name` of its one call of `op` (an OpOverloadPacket),
    its schema default when the graph leaves it out."""
    import torch

    ep = torch.export.export(program, (x,))
    (node,) = [n for n in ep.graph.nodes if n.target == op.default]
    names = [a.name for a in op.default._schema.arguments]
    i = names.index(name)
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if i < len(node.args) else op.default._schema.arguments[i].default_value


def _fake_cuda_export_marker():
    import importlib.util
    import os

    import pytest

    runs = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") != "1"
    return pytest.mark.skipif(not runs, reason="needs triton, not its CPU interpreter (TRITON_INTERPRET=1 launches "
                                               "differently)")


fake_cuda_export = _fake_cuda_export_marker()  # the marker of the tests that call `export_on_fake_cuda`


class ScaledGemmNet(torch.nn.Module):
    """Linear + ReLU, then the int8 scaled-GEMM plugin (its CPU reference off CUDA), plus a second input's projection
    (x [..., 32] and y [..., 8] with the same leading dims): the engine tests' model."""

    def __init__(self):
        from qcompile.plugins.scaled_gemm import register

        register()
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(32, 32)
        self.proj = torch.nn.Linear(8, 16)
        self.register_buffer("w_q", torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=g))
        self.register_buffer("w_scale", torch.rand(16, generator=g) * 0.01 + 0.001)
        self.register_buffer("x_scale", torch.tensor(0.05))
        self.register_buffer("bias", torch.randn(16, generator=g))

    def forward(self, x, y):
        h = torch.relu(self.fc1(x))
        return torch.ops.qcompile.scaled_gemm(h, self.w_q, self.w_scale, self.x_scale, self.bias) + self.proj(y)
