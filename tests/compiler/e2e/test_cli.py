"""The CLI: build/run/inspect/recipes work, and every bad input ends in one line and exit 2."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import qcompile
from qcompile.cli import main

from qc_testutil import cosine, ort_session

pytestmark = pytest.mark.slow


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_recipes_lists_builtins(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    for name in ("fp16", "int8", "fp8"):
        assert name in out


def test_build_run_inspect_with_random_calibration(tmp_path, capsys, llama, int8_random_cli):
    build, engine = int8_random_cli  # `qcompile build tiny-llama --recipe int8 --calib random -o ENGINE` (shared)
    code, out, err = build.code, build.out, build.err
    assert code == 0, err
    assert engine.is_file()
    assert "Build summary" in out and "layers quantized" in out and "15" in out
    assert "RANDOM" in out  # the report says the calibration data was random
    report = json.loads((engine.parent / "tl.engine.build.json").read_text())
    assert report["calibration"]["random"] is True and report["layers_quantized"] == 15
    for stage in ("export", "calibrate", "quantize", "lower", "compile"):
        assert stage in err  # progress lines on stderr

    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    assert run_cli(capsys, "sample-inputs", "tiny-llama", "-o", inputs, "--dim", "batch=2", "--dim", "seq=20")[0] == 0
    code, out, err = run_cli(capsys, "run", engine, "--inputs", inputs, "--save-outputs", outputs)
    assert code == 0, err
    assert "logits" in out
    saved = np.load(outputs)["logits"]
    direct = qcompile.load(engine).run(dict(np.load(inputs)))["logits"]
    assert saved.shape == (2, 20, 512)
    np.testing.assert_array_equal(saved, direct)
    # the saved outputs agree with the FP32 graph (ONNX Runtime, optimizations off)
    fp32 = ort_session(llama.model).run(["logits"], dict(np.load(inputs)))[0]
    assert cosine(saved, fp32) >= 0.99

    code, out, err = run_cli(capsys, "inspect", engine)
    assert code == 0, err
    assert "input_ids" in out and "logits" in out and "int8" in out
    assert "layers.0.attn.q_proj" in out and "qcompile::ScaledGemm" in out


def test_engine_fusions_change_kernels_not_outputs(tmp_path, capsys, llama_builds):
    """The shared fp16 build lowers Q/K/V and gate/up as one GEMM each per layer and each layer's attention as one
    fused attention; `--no-sibling-fusion --no-attention-fusion` keeps them written out, and both engines give the
    same logits."""
    fused = llama_builds["fp16"]
    assert fused.pass_stats["FuseSiblingGemmsPass.fused_nodes"] == 10  # 2 layers x (q, k, v + gate, up)
    assert fused.pass_stats["FuseSiblingGemmsPass.groups"] == 4
    assert fused.pass_stats["FuseAttentionPass.AttentionRule"] == 2
    engine = tmp_path / "apart.engine"
    code, out, err = run_cli(capsys, "build", "tiny-llama", "--recipe", "fp16", "--no-sibling-fusion",
                             "--no-attention-fusion", "-o", engine)
    assert code == 0, err
    report = json.loads((tmp_path / "apart.engine.build.json").read_text())
    assert not any(key.startswith(("FuseSiblingGemmsPass", "FuseAttentionPass")) for key in report["pass_stats"])
    inputs = tmp_path / "in.npz"
    assert run_cli(capsys, "sample-inputs", "tiny-llama", "-o", inputs, "--dim", "batch=2", "--dim", "seq=9")[0] == 0
    feed = dict(np.load(inputs))
    apart = qcompile.load(engine).run(feed)["logits"]
    together = qcompile.load(fused.engine_path).run(feed)["logits"]
    np.testing.assert_allclose(together, apart, rtol=1e-4, atol=1e-4)


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("qcompile: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_corrupt_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    code, _, err = run_cli(capsys, "build", bad, "--recipe", "fp16", "-o", tmp_path / "e.engine")
    _assert_one_line_error(code, err, "bad.onnx")
    assert list(tmp_path.iterdir()) == [bad]


def test_unknown_recipe(tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "tiny-llama", "--recipe", "int3", "-o", tmp_path / "e.engine")
    _assert_one_line_error(code, err, "int3")
    assert not list(tmp_path.iterdir())


def test_bad_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\nsmoothing = 3\n')
    code, _, err = run_cli(capsys, "build", "tiny-llama", "--recipe", recipe, "-o", tmp_path / "e.engine")
    _assert_one_line_error(code, err, "smoothing")
    assert not (tmp_path / "e.engine").exists()


def test_nan_calibration_data(tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    image = np.random.default_rng(0).standard_normal((2, 1, 3, 32, 32)).astype(np.float32)
    image[1, 0, 0, 0, 0] = np.nan
    np.savez(calib, image=image)
    code, _, err = run_cli(capsys, "build", "small-cnn", "--recipe", "int8", "--calib", calib,
                           "-o", tmp_path / "e.engine")
    _assert_one_line_error(code, err, "image", "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


def test_missing_calibration_data(tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "small-cnn", "--recipe", "int8", "-o", tmp_path / "e.engine")
    _assert_one_line_error(code, err, "--calib")
    assert not list(tmp_path.iterdir())


def test_mistyped_calibration_path_fails_before_the_export(tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "small-cnn", "--recipe", "int8", "--calib", tmp_path / "calb.npz",
                           "-o", tmp_path / "e.engine")
    _assert_one_line_error(code, err, "calb.npz does not exist")
    assert "export" not in err  # no stage started
    assert not list(tmp_path.iterdir())


def test_run_with_inputs_that_are_not_an_npz(tmp_path, capsys, fp16_engine):
    (tmp_path / "in.npz").write_text("1 2 3")
    code, _, err = run_cli(capsys, "run", fp16_engine, "--inputs", tmp_path / "in.npz")
    _assert_one_line_error(code, err, "in.npz is not an .npz file", "qcompile sample-inputs")


def test_fp8_large_m_cpu_engine_emulates_the_fp8_path_above_128_rows(tmp_path, capsys, llama, graph_builds):
    """`build --fp8-large-m` on CPU: the summary counts the layers, inspect shows the flag, and the engine matches the
    exact plugin graph (our lowering without the flag) at 16 rows per GEMM but not at 160, where its FP8 numerics
    are a few % away (still cosine > 0.99 on the logits)."""
    import torch

    from qcompile.lowering import lower_onnx

    engine = tmp_path / "e.engine"
    code, out, err = run_cli(capsys, "build", "tiny-llama", "--recipe", "w4a16_rtn", "--device", "cpu",
                             "--fp8-large-m", "--no-validate", "-o", engine)
    assert code == 0, err
    assert "INT4/FP4 GEMM layer(s) emulate the FP8 path above 128 rows (cpu: its numerics, no speed-up)" in out
    assert "large-M GEMMs" in run_cli(capsys, "inspect", engine)[1]
    exact = lower_onnx(graph_builds("w4a16_rtn").plugin_model)
    built = qcompile.load(engine)
    for seq, fp8 in ((8, False), (80, True)):
        feeds = llama.random_inputs(np.random.default_rng(seq), {"batch": 2, "seq": seq})
        got = built.run(feeds)["logits"]
        want = exact(*[torch.from_numpy(feeds[n]) for n in exact.input_names])[0].numpy()
        diff = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert (1e-3 < diff < 0.1 and cosine(got, want) > 0.99) if fp8 else diff < 1e-4, (seq, diff)


@pytest.mark.parametrize("flag, layout", [((), None), (("--fp4-layout", "planar"), "planar"),
                                          (("--fp4-layout", "pairs"), "pairs")])
def test_build_hands_fp4_layout_to_the_pipeline(monkeypatch, tmp_path, capsys, flag, layout):
    """`build --fp4-layout` reaches `qcompile.build(fp4_layout=...)` (None without it: by device); what the pipeline
    does with it is tested in tests/plugins/test_fp4_planar.py."""
    import qcompile.pipeline

    class Built(Exception):
        pass

    def build(*args, **kwargs):
        raise Built(kwargs["fp4_layout"])

    monkeypatch.setattr(qcompile.pipeline, "build", build)
    with pytest.raises(Built) as built:
        run_cli(capsys, "build", "tiny-llama", "--recipe", "w4a16_nvfp4", *flag, "-o", tmp_path / "e.engine")
    assert built.value.args == (layout,)


def test_build_rejects_an_unknown_fp4_layout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "build", "tiny-llama", "--recipe", "w4a16_nvfp4", "--fp4-layout", "nibbles",
                "-o", tmp_path / "e.engine")
    assert exit_.value.code == 2
    assert "--fp4-layout: invalid choice: 'nibbles'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_one_row_model_engine_matches_the_plugin_graph(tmp_path, capsys, llama, graph_builds):
    """`build --one-row-model` on CPU: inspect says the branch is compiled, and the engine gives what the plugin
    graph gives (our lowering) at one token (the branch) and at 2 x 8 tokens (the other one)."""
    import torch

    from qcompile.lowering import lower_onnx

    engine = tmp_path / "e.engine"
    code, out, err = run_cli(capsys, "build", "tiny-llama", "--recipe", "w4a16_rtn", "--device", "cpu",
                             "--one-row-model", "--no-validate", "-o", engine)
    assert code == 0, err
    assert re.search(r"one-row model +compiled", run_cli(capsys, "inspect", engine)[1])
    exact = lower_onnx(graph_builds("w4a16_rtn").plugin_model)
    built = qcompile.load(engine)
    for batch, seq in ((1, 1), (2, 8)):
        feeds = llama.random_inputs(np.random.default_rng(seq), {"batch": batch, "seq": seq})
        got = built.run(feeds)["logits"]
        want = exact(*[torch.from_numpy(feeds[n]) for n in exact.input_names])[0].numpy()
        assert got.shape == (batch, seq, 512)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4, (batch, seq)


@pytest.mark.parametrize("where", ["missing-dir", "is-a-dir"])
def test_unwritable_output(tmp_path, capsys, where):
    out = tmp_path / "no" / "such" / "e.engine" if where == "missing-dir" else tmp_path
    code, _, err = run_cli(capsys, "build", "tiny-llama", "--recipe", "fp16", "-o", out)
    _assert_one_line_error(code, err, str(out))


def test_wrong_input_shape_at_run_time(llama_builds, tmp_path, capsys):
    engine = llama_builds["fp8"].engine_path
    wrong_rank = tmp_path / "rank.npz"
    np.savez(wrong_rank, input_ids=np.zeros((2, 3, 4), np.int64))
    code, _, err = run_cli(capsys, "run", engine, "--inputs", wrong_rank)
    _assert_one_line_error(code, err, "input_ids")
    wrong_name = tmp_path / "name.npz"
    np.savez(wrong_name, tokens=np.zeros((2, 3), np.int64))
    code, _, err = run_cli(capsys, "run", engine, "--inputs", wrong_name)
    _assert_one_line_error(code, err, "input_ids")


def test_console_script_prints_one_line(tmp_path):
    exe = shutil.which("qcompile") or None
    cmd = [exe] if exe else [sys.executable, "-m", "qcompile.cli"]
    proc = subprocess.run([*cmd, "build", str(tmp_path / "missing.onnx"), "--recipe", "fp16",
                           "-o", str(tmp_path / "e.engine")], capture_output=True, text=True)
    _assert_one_line_error(proc.returncode, proc.stderr, "missing.onnx")
    assert "done" not in proc.stderr  # a failed stage is not reported as done


def test_output_closed_early_is_not_an_error():
    """`qcompile recipes | head -1`: the reader closes the pipe; no traceback, exit 0."""
    script = ("from qcompile.cli import main; import sys\n"
              "for _ in range(400):\n"  # more output than a pipe buffer holds
              "    code = main(['recipes'])\n"
              "sys.exit(code)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


ONE_TOKEN_PY = '''
import torch
from torch import nn

def make():  # a decode-sized example input: batch 1, seq 1
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return {"module": module, "inputs": (torch.randn(1, 1, 16),), "input_names": ["x"],
            "dynamic_dims": {"x": {0: "batch", 1: "seq"}}, "dim_ranges": {"seq": (1, 64)}}
'''


def test_build_from_a_factory_whose_example_has_batch_one(tmp_path, capsys):
    """torch.export specializes dims of size 1, so the engine is exported from an example with those dims at 2;
    the engine then runs at any size in range, 1 included, and matches the module."""
    import torch

    (tmp_path / "one_token.py").write_text(ONE_TOKEN_PY)
    engine = tmp_path / "e.engine"
    code, _, err = run_cli(capsys, "build", f"{tmp_path / 'one_token.py'}:make", "--recipe", "fp16", "--device", "cpu",
                           "--no-validate", "-o", engine)
    assert code == 0, err
    built = qcompile.load(engine)
    namespace = {}
    exec(ONE_TOKEN_PY, namespace)
    module = namespace["make"]()["module"]
    for batch, seq in ((1, 1), (3, 5)):
        x = np.random.default_rng(batch).standard_normal((batch, seq, 16)).astype(np.float32)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(built.run({"x": x})[built.output_names[0]], want, atol=1e-5, rtol=1e-4)


SDPA_PY = '''
import torch
from torch import nn
from torch.nn import functional as F

class SelfAttention(nn.Module):  # what Hugging Face models call: F.scaled_dot_product_attention
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(64, 192), nn.Linear(64, 64)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 64))

def make():
    torch.manual_seed(0)
    return {"module": SelfAttention(), "inputs": (torch.randn(2, 8, 64),), "input_names": ["x"],
            "dynamic_dims": {"x": {0: "batch", 1: "seq"}}, "dim_ranges": {"seq": (1, 64)}}
'''


@pytest.mark.parametrize("recipe", ["w4a16_nvfp4", "w8a16"])
def test_a_model_that_calls_scaled_dot_product_attention_builds(tmp_path, capsys, recipe):
    """FP4 recipes export at opset 23, where torch.onnx writes SDPA as one ONNX Attention node: the build lowers it
    (it used to stop at "op 'Attention' ... is not supported"). The others export at opset 21, where SDPA is written
    out (K transposed through Reshape -> Transpose -> Reshape), and the engine pass fuses it back into one attention
    (dynamic batch and sequence). Either engine runs at other sequence lengths, and validation against the FP16
    graph in ONNX Runtime passes."""
    import onnx
    import torch

    (tmp_path / "sdpa.py").write_text(SDPA_PY)
    engine, portable = tmp_path / "e.engine", tmp_path / "e.onnx"
    code, out, err = run_cli(capsys, "build", f"{tmp_path / 'sdpa.py'}:make", "--recipe", recipe,
                             "--calib", "random", "--device", "cpu", "--emit-onnx", portable, "-o", engine)
    assert code == 0, err
    ops = {n.op_type for n in onnx.load(portable).graph.node}
    stats = json.loads((tmp_path / "e.engine.build.json").read_text())["pass_stats"]
    if recipe == "w4a16_nvfp4":
        assert "Attention" in ops and "FuseAttentionPass.AttentionRule" not in stats
    else:
        assert "Softmax" in ops and stats["FuseAttentionPass.AttentionRule"] == 1
    report = json.loads((tmp_path / "e.engine.validation.json").read_text())
    assert all(o["passed"] and o["cosine"] > 0.98 for o in report["outputs"].values()), report["outputs"]
    built = qcompile.load(engine)
    namespace = {}
    exec(SDPA_PY, namespace)
    module = namespace["make"]()["module"]
    x = np.random.default_rng(3).standard_normal((3, 13, 64)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = built.run({"x": x})[built.output_names[0]]
    assert cosine(got, want) > 0.98  # quantized weights: close to the float module, not equal


def test_pdl_on_a_cpu_build_is_refused_before_anything_runs(tmp_path, capsys):
    """`--pdl` needs a CUDA engine on compute capability 9.0 or more: a CPU build says so in one line and writes
    nothing."""
    engine = tmp_path / "pdl.engine"
    code, _, err = run_cli(capsys, "build", "tiny-llama", "--recipe", "fp16", "--device", "cpu", "--pdl", "-o", engine)
    _assert_one_line_error(code, err, "--pdl", "compute capability 9.0", "the CPU", "build without --pdl")
    assert list(tmp_path.iterdir()) == []
