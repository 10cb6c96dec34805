"""The engine's one-row branch (`engine/one_row.py`): the program traced again with every dynamic dim at 1."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from qcompile.engine import IOSpec, build_engine, load
from qcompile.engine import build as build_mod
from qcompile.engine.manifest import merge_dim_ranges
from qcompile.engine.one_row import one_row_dims

from qc_testutil import ScaledGemmNet

INPUTS = [
    IOSpec("x", "float32", ["batch", "seq", 32], {"batch": (1, 16), "seq": (1, 64)}),
    IOSpec("y", "float32", ["batch", "seq", 8]),
]
OUTPUTS = [IOSpec("out", "float32", ["batch", "seq", 16])]


def _feeds(batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, 32, generator=g), torch.randn(batch, seq, 8, generator=g)


@pytest.mark.parametrize("inputs, outputs, expected", [
    (INPUTS, OUTPUTS, {"batch": (0, 0), "seq": (0, 1)}),
    ([IOSpec("x", "float32", ["batch", 4], {"batch": (2, 8)})], [IOSpec("o", "float32", ["batch"])], {}),
    ([IOSpec("x", "float32", [3, 4])], [IOSpec("o", "float32", [3])], {}),
    ([IOSpec("x", "float32", ["batch", 4], {"batch": (1, 8)})],
     [IOSpec("o", "float32", ["tokens"], {"tokens": (1, 64)})], {}),
], ids=["batch-and-seq", "range-excludes-1", "static", "output-dim-not-an-input-dim"])
def test_one_row_dims(inputs, outputs, expected):
    assert one_row_dims(inputs, outputs, merge_dim_ranges(inputs + outputs)) == expected


def test_one_row_branch_traces_the_program_with_static_rows():
    """The branch taken at one row holds the plugin with x [1, 1, 32] (static: no dispatch by row count there);
    the other branch holds it with the symbolic dims, and both compute what the module computes."""
    net = ScaledGemmNet()
    where = one_row_dims(INPUTS, OUTPUTS, merge_dim_ranges(INPUTS + OUTPUTS))
    _, ep = build_mod._export_program(net, INPUTS, OUTPUTS, _feeds(2, 3), merge_dim_ranges(INPUTS + OUTPUTS),
                                      one_row_branch=True)
    assert ep is not None and where
    shapes = {}
    for name in ("true_graph_0", "false_graph_0"):
        graph = getattr(ep.graph_module, name).graph
        [gemm] = [n for n in graph.nodes if "scaled_gemm" in str(n.target)]
        shapes[name] = tuple(gemm.args[0].meta["val"].shape)
    assert shapes["true_graph_0"] == (1, 1, 32)
    assert not any(isinstance(d, int) for d in shapes["false_graph_0"][:2])
    for batch, seq in [(1, 1), (1, 5), (3, 1), (4, 7)]:
        feeds = _feeds(batch, seq, seed=batch * 10 + seq)
        (got,) = ep.module()(*feeds)
        torch.testing.assert_close(got, net(*feeds), rtol=0, atol=0)


def test_engine_with_one_row_branch_matches_eager(tmp_path):
    net = ScaledGemmNet()
    path = tmp_path / "one_row.engine"
    man = build_engine(net, inputs=INPUTS, outputs=OUTPUTS, example_inputs=_feeds(2, 3), manifest={},
                       output_path=path, device="cpu", one_row_branch=True)
    assert man.extra["one_row_branch"] is True
    engine = load(path)
    assert engine.manifest.extra["one_row_branch"] is True
    reference = copy.deepcopy(net).double()  # float64 math around the same int8 plugin
    for batch, seq in [(1, 1), (1, 9), (2, 1), (5, 3)]:
        x, y = _feeds(batch, seq, seed=100 + batch * 10 + seq)
        with torch.no_grad():
            want = reference(x.double(), y.double()).numpy()
        got = engine.run({"x": x.numpy(), "y": y.numpy()})["out"]
        assert got.shape == (batch, seq, 16)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


class Doubles(torch.nn.Module):
    """Returns 2 * batch rows while its output spec says batch: the one-row branch cannot hold it."""

    def forward(self, x):
        return torch.cat([x, x], 0) * 2


def test_branch_that_cannot_hold_the_outputs_is_left_out(caplog):
    inputs = [IOSpec("x", "float32", ["batch", 4], {"batch": (1, 8)})]
    outputs = [IOSpec("o", "float32", ["batch", 4])]
    ranges = merge_dim_ranges(inputs + outputs)
    with caplog.at_level(logging.WARNING, logger="qcompile.engine.build"):
        ep, branched = build_mod._export_program(Doubles(), inputs, outputs, (torch.randn(3, 4),), ranges, True)
    assert branched is None
    assert "without the one-row branch" in caplog.text
    if torch.__version__ >= "2.13":  # torch 2.11's Dynamo keeps only the first line of the error raised in the branch
        assert "output 'o' has shape [2, 4] at one row" in caplog.text
    x = torch.randn(1, 4)
    torch.testing.assert_close(ep.module()(x), Doubles()(x))


def test_no_branch_where_no_dim_can_be_1(caplog):
    inputs = [IOSpec("x", "float32", ["batch", 4], {"batch": (2, 8)})]
    with caplog.at_level(logging.INFO, logger="qcompile.engine.build"):
        ep, branched = build_mod._export_program(Doubles(), inputs, [IOSpec("o", "float32", ["batch", 4])],
                                                 (torch.randn(3, 4),), {"batch": (2, 8)}, True)
    assert branched is None and "no one-row branch" in caplog.text
    assert not any("cond" in str(n.target) for n in ep.graph.nodes)


def test_branch_that_does_not_compile_is_left_out(tmp_path, monkeypatch, caplog):
    """Where AOTInductor fails on the one-row branch (torch 2.11 on CUDA), the engine is compiled without it."""
    real = build_mod._compile

    def compile_fails_with_branch(ep, path, man, configs):
        if any("cond" in str(n.target) for n in ep.graph.nodes):
            raise build_mod.EngineError("AOTInductor compile failed: InductorError: AssertionError: ps0")
        return real(ep, path, man, configs)

    monkeypatch.setattr(build_mod, "_compile", compile_fails_with_branch)
    net, path = ScaledGemmNet(), tmp_path / "fallback.engine"
    with caplog.at_level(logging.WARNING, logger="qcompile.engine.build"):
        man = build_engine(net, inputs=INPUTS, outputs=OUTPUTS, example_inputs=_feeds(2, 3), manifest={},
                           output_path=path, device="cpu", one_row_branch=True)
    assert man.extra["one_row_branch"] is False
    assert "the one-row branch did not compile (AOTInductor compile failed" in caplog.text
    x, y = _feeds(1, 1, seed=7)
    with torch.no_grad():
        want = net(x, y).numpy()
    np.testing.assert_allclose(load(path).run({"x": x.numpy(), "y": y.numpy()})["out"], want, rtol=1e-5, atol=1e-5)
