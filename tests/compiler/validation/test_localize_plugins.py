"""Per-layer localization of the plugin kinds beyond ScaledGemm and INT4: W8A16, FP8 rowwise and block, FP4.

Each recipe's tiny-llama plugin graph (calibrated on seeded random data, no engine) gets one layer sabotaged (a
float scale of its weight times 3, or 4: the layer's output scaled as much); `localize_layers` must analyse every
plugin node from its FP input, rank the sabotaged one first and, reverting every layer, give back the FP graph's
outputs. The NVFP4 W4A4 layers' clip rate is checked against the NVFP4 activation quantizer: the values it counts
are the ones that quantizer saturates.
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qcompile.lowering import lower_onnx
from qcompile.plugins.fp4_gemm.format import nvfp4_fake_quantize
from qcompile.validation.localize import localize_layers, revert_layer

pytestmark = pytest.mark.slow

SABOTAGED = "layers.0.attn.o_proj"  # every recipe quantizes it (fp8_block: K and N multiples of 128)
# recipe -> (plugin op type, "weight/activation" format of its rows)
RECIPES = {"w8a16": ("Int8WeightOnlyGemm", "int8/fp16"), "fp8_rowwise": ("DynamicScaledGemm", "fp8/fp8"),
           "fp8_block": ("Fp8BlockGemm", "fp8/fp8"), "w4a16_nvfp4": ("Fp4Gemm", "nvfp4/fp16"),
           "mxfp4": ("Fp4Gemm", "mxfp4/fp16"), "nvfp4": ("Fp4GemmW4A4", "nvfp4/nvfp4")}
# recipe -> (index of a float32 input that scales the weight, per tensor, channel or block; the factor): MXFP4's
# block scales must stay powers of two (and its global scale 1), NVFP4's are E4M3, so its global scale takes it
SABOTAGE = {"w8a16": (2, 3.0), "fp8_rowwise": (3, 3.0), "fp8_block": (2, 3.0), "w4a16_nvfp4": (3, 3.0),
            "mxfp4": (2, 4.0), "nvfp4": (3, 3.0)}


def plugin_nodes(model, op_type):
    return [n for n in model.graph.node if n.domain == "qcompile" and n.op_type == op_type]


def module(node):
    return next((p.value for p in node.metadata_props if p.key == "qcompile.module"), None)


def scaled_initializer(model, name, factor):
    """A copy of `model` with initializer `name` times `factor`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    init = next(t for t in copy.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * factor).astype(np.float32), name))
    return copy


@pytest.fixture(scope="module")
def feeds(llama):
    rng = np.random.default_rng(11)
    return [llama.random_inputs(rng, {"batch": 2, "seq": 16}) for _ in range(2)]


def fp_outputs(model, feed):
    return lower_onnx(model).run({k: torch.from_numpy(v) for k, v in feed.items()})


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sabotaged_layer_of_every_plugin_kind_is_ranked_first(llama, graph_builds, feeds, recipe):
    op_type, fmt = RECIPES[recipe]
    plugin = graph_builds(recipe).plugin_model
    nodes = plugin_nodes(plugin, op_type)
    assert nodes, f"{recipe} wrote no {op_type} node"
    node = next(n for n in nodes if module(n) == SABOTAGED)
    index, factor = SABOTAGE[recipe]
    sabotaged = scaled_initializer(plugin, node.input[index], factor)

    rows = localize_layers(llama.model, sabotaged, feeds)
    assert len(rows) == len(nodes) and all(r.revertible and r.local_sqnr_db is not None for r in rows), rows
    assert all(r.format == fmt for r in rows), {r.format for r in rows}
    worst, others = rows[0], rows[1:]
    assert worst.node == node.name and worst.module == SABOTAGED and worst.rank == 1
    assert worst.local_sqnr_db < min(r.local_sqnr_db for r in others) - 3  # y * 3: a local SQNR of 6 dB at best
    assert worst.contribution_db > max(r.contribution_db for r in others) + 3
    assert all(0 < r.w_scale_min <= r.w_scale_max for r in rows)
    if op_type != "Fp4GemmW4A4":  # weight-only or dynamic activations: nothing static to clip
        assert all(r.clip_rate is None and r.x_scale is None for r in rows)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_reverting_every_layer_gives_the_fp_outputs(llama, graph_builds, feeds, recipe):
    op_type, _ = RECIPES[recipe]
    model = plugin = graph_builds(recipe).plugin_model
    for node in plugin_nodes(plugin, op_type):
        model = revert_layer(model, llama.model, node.name)
    onnx.checker.check_model(model, full_check=True)
    assert not plugin_nodes(model, op_type)
    want, _ = fp_outputs(llama.model, feeds[0])
    got, _ = fp_outputs(model, feeds[0])
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-4, atol=1e-4)


def test_nvfp4_clip_rate_counts_what_the_activation_quantizer_saturates(llama, graph_builds, feeds):
    """The W4A4 activation's global scale cut 100x for one layer: its clip rate is the fraction of its FP input that
    the NVFP4 quantizer (E4M3 block scales saturating at 448) maps to the largest magnitude 6 * 448 * x_global."""
    plugin = graph_builds("nvfp4").plugin_model
    node = next(n for n in plugin_nodes(plugin, "Fp4GemmW4A4") if module(n) == SABOTAGED)
    x_global = float(numpy_helper.to_array(next(t for t in plugin.graph.initializer if t.name == node.input[4])))
    squeezed = scaled_initializer(plugin, node.input[4], 0.01)

    rows = {r.node: r for r in localize_layers(llama.model, squeezed, feeds)}
    program = lower_onnx(llama.model)
    saturated, total = 0, 0
    for feed in feeds:
        _, captured = program.run({k: torch.from_numpy(v) for k, v in feed.items()}, capture=[node.input[0]])
        x = captured[node.input[0]].double()
        g = torch.tensor(x_global * 0.01, dtype=torch.float32)
        top = (6 * 448 * g).double()
        q = nvfp4_fake_quantize(x.float(), g).double()
        saturated += int(((q.abs() == top) & (x.abs() > top)).sum())
        total += x.numel()
    row = rows[node.name]
    assert 0.01 < saturated / total < 0.99  # the cut makes a real share of x clip
    assert row.clip_rate == pytest.approx(saturated / total, abs=1e-9)
    assert row.x_scale == pytest.approx(x_global * 0.01, rel=1e-6)
    others = [r.clip_rate for name, r in rows.items() if name != node.name]
    assert all(c is not None and c < 0.01 for c in others), others  # calibrated global scales clip (almost) nothing
