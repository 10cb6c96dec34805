"""AWQ searches one scale per shared input (q/k/v, gate/up), and FoldAwqScalesPass folds it into the norm weight.

On synthetic layers with outlier channels: the grouped search is the search on the concatenated weights, split
back per layer. On tiny-llama's w4a16_awq graph: the Muls in front of q/k/v and gate/up disappear into the
RMSNorm weights, o_proj's stays (its input comes from a Reshape) and is reported, and ONNX Runtime gives the
same logits with and without the fold on fresh random inputs.
"""
import numpy as np
import pytest
import torch

from qc_testutil import ort_session
from qcompile.algorithms.awq import awq_search
from qcompile.algorithms.int4 import quantize_rtn
from qcompile.algorithms.plan import Int4Job, awq_groups, observers_for, run_jobs
from qcompile.passes import PassManager, export_model, import_model, qdq_passes, quantize_model
from qcompile.passes.fold_awq_scales import FoldAwqScalesPass


def _outlier_activations(rng, tokens=256, k=128):
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    x[:, rng.choice(k, 4, replace=False)] *= 30.0  # a few salient channels
    return torch.from_numpy(x)


def test_layers_sharing_an_input_get_one_search_on_their_concatenated_weights():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((128, n)).astype(np.float32) for n in (64, 32)]
    jobs = [Int4Job("q", "awq", "h", weights[0], 32, True), Int4Job("k", "awq", "h", weights[1], 32, True),
            Int4Job("o", "awq", "a", rng.standard_normal((128, 48)).astype(np.float32), 32, True),
            Int4Job("g", "gptq", "h", weights[0], 32, True)]
    assert [[j.node for j in group] for group in awq_groups(jobs)] == [["q", "k"], ["o"]]
    watch = observers_for(jobs)
    assert [type(o).__name__ for o in watch["h"]] == ["ActAbsMeanObserver", "ActivationSampleObserver",
                                                      "HessianObserver"]  # one of each kind per tensor
    x_h, x_a = _outlier_activations(rng), _outlier_activations(rng)
    for name, x in (("h", x_h), ("a", x_a)):
        for observer in watch[name]:
            observer.update(x)
    quantized, scales = run_jobs(jobs, watch)
    assert set(quantized) == {"q", "k", "o", "g"} and set(scales) == {"q", "k", "o"}
    np.testing.assert_array_equal(scales["q"], scales["k"])
    assert not np.array_equal(scales["q"], scales["o"])

    joint = awq_search(torch.from_numpy(np.concatenate(weights, axis=1)), x_h, x_h.double().abs().mean(0).float(), 32)
    np.testing.assert_array_equal(scales["q"], joint.scales.numpy())
    both = torch.cat([quantized["q"].dequantize(), quantized["k"].dequantize()], dim=1)
    torch.testing.assert_close(both, joint.qweight.dequantize(), rtol=0, atol=0)
    # the shared scale still beats round-to-nearest on the two layers' outputs (float64 reference)
    x64 = x_h.double()
    for name, w in zip(("q", "k"), weights):
        ref = x64 @ torch.from_numpy(w).double()
        awq = (x64 / torch.from_numpy(scales[name]).double()) @ quantized[name].dequantize().double()
        rtn = x64 @ quantize_rtn(torch.from_numpy(w), 32).dequantize().double()
        assert (awq - ref).pow(2).mean() < 0.9 * (rtn - ref).pow(2).mean(), name


@pytest.fixture(scope="module")
def awq_llama(w4a16_awq):
    """tiny-llama's w4a16_awq results: (recipe, AWQ weights, AWQ scales, jobs) (the shared AWQ calibration)."""
    return w4a16_awq["recipe"], w4a16_awq["weights"], w4a16_awq["scales"], w4a16_awq["jobs"]


@pytest.mark.slow
def test_tiny_llama_awq_muls_fold_into_the_norms(llama, awq_llama):
    recipe, weights, scales, jobs = awq_llama
    assert len(jobs) == 12 and len(awq_groups(jobs)) == 6  # per layer: q/k/v, gate/up, o_proj
    qdq, result = quantize_model(llama.model, recipe, {}, weights, scales)
    assert result.stats["FoldAwqScalesPass.folded"] == 10 and result.stats["FoldAwqScalesPass.kept_as_mul"] == 2
    kept = [(node, reason) for node, reason in result.declined if reason.startswith("FoldAwqScalesPass")]
    assert len(kept) == 2 and all("Reshape" in reason for _, reason in kept)
    modules = {n.name: {p.key: p.value for p in n.metadata_props}.get("qcompile.module") for n in qdq.graph.node}
    muls = [n for n in qdq.graph.node if n.op_type == "Mul" and n.name.endswith("/awq_scale")]
    assert sorted(n.name for n in muls) == sorted(node for node, _ in kept)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    for node in qdq.graph.node:  # q/k/v and gate/up read the RMSNorm's weight Mul directly
        module = modules.get(node.name) or ""
        if node.op_type == "MatMul" and module.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert modules[producer[node.input[0]].name].endswith("_norm"), module
        if node.op_type == "MatMul" and module.endswith("o_proj"):
            assert producer[node.input[0]].name.endswith("/awq_scale")

    passes = [p for p in qdq_passes(recipe, {}, weights, scales) if not isinstance(p, FoldAwqScalesPass)]
    unfolded = export_model(PassManager(passes).run(import_model(llama.model)).graph, like=llama.model)
    assert sum(n.name.endswith("/awq_scale") for n in unfolded.graph.node) == 12
    for seed in (11, 12):
        feeds = llama.random_inputs(np.random.default_rng(seed), {"batch": 2, "seq": 24})
        want = ort_session(unfolded).run(None, feeds)[0]
        got = ort_session(qdq).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
