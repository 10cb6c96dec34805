"""Built-in examples: exported graphs are valid, dynamic, stamped with module names and match torch."""
import numpy as np
import onnx
import pytest
import torch

from qcompile.errors import SourceError
from qcompile.frontend import EXAMPLES, list_examples, load_source
from qcompile.frontend.examples import LLAMA3_8B_LAYERS, Attention, mlp_large, tiny_llama
from qcompile.frontend.source import source_from_factory_result

from qc_testutil import ort_session

LLAMA_GEMMS = {f"layers.{i}.{m}" for i in range(2)
               for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {"lm_head"}


@pytest.fixture(scope="module")
def cnn():
    return load_source("small-cnn")


def _module(node):
    return next(p.value for p in node.metadata_props if p.key == "qcompile.module")


def _torch_out(src, feeds):
    with torch.no_grad():
        return src.torch_module(*(torch.from_numpy(feeds[n]) for n in src.input_names)).numpy()


def _dim_params(model, name):
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("which", ["llama", "cnn"])
def test_valid_fp32_onnx(which, request):
    src = request.getfixturevalue(which)
    onnx.checker.check_model(src.model, full_check=True)
    assert src.model.ir_version <= 10
    assert next(o.version for o in src.model.opset_import if o.domain == "") >= 21
    assert src.kind == "builtin"
    assert all(n.metadata_props for n in src.model.graph.node)


def test_llama_io_and_dims(llama):
    (inp,), (out,) = llama.inputs, llama.outputs
    assert (inp.name, inp.dtype, inp.shape, inp.value_range) == ("input_ids", "int64", ["batch", "seq"], (0, 512))
    assert inp.dim_ranges == {"batch": (1, 64), "seq": (1, 2048)}
    assert (out.name, out.dtype, out.shape) == ("logits", "float32", ["batch", "seq", 512])
    assert _dim_params(llama.model, "input_ids") == ["batch", "seq"]
    assert llama.example_inputs["input_ids"].shape == (2, 16)


@pytest.mark.parametrize("sizes", [{"batch": 1, "seq": 1}, {"batch": 3, "seq": 37}])
def test_llama_matches_torch(llama, sizes):
    feeds = llama.random_inputs(np.random.default_rng(0), sizes)
    assert feeds["input_ids"].shape == (sizes["batch"], sizes["seq"])
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 512
    got = ort_session(llama.model).run(["logits"], feeds)[0]
    want = _torch_out(llama, feeds)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # non-degenerate logits: O(1) spread, different argmax across positions
    assert 0.3 < want.std() < 5
    if want[..., 0].size > 1:
        assert len(np.unique(want.argmax(-1))) > 1


def test_llama_module_stamps(llama):
    matmuls = [n for n in llama.model.graph.node if n.op_type == "MatMul"]
    weighted = {_module(n) for n in matmuls if n.input[1] in {t.name for t in llama.model.graph.initializer}}
    assert weighted == LLAMA_GEMMS
    # the score/value matmuls belong to the attention module
    assert {_module(n) for n in matmuls} == LLAMA_GEMMS | {"layers.0.attn", "layers.1.attn"}


@pytest.mark.parametrize("batch", [1, 5])
def test_cnn_matches_torch(cnn, batch):
    feeds = cnn.random_inputs(np.random.default_rng(batch), {"batch": batch})
    got = ort_session(cnn.model).run(["logits"], feeds)[0]
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, _torch_out(cnn, feeds), atol=1e-4, rtol=1e-4)


def test_cnn_dims_and_stamps(cnn):
    assert _dim_params(cnn.model, "image") == ["batch", 3, 32, 32]
    assert cnn.outputs[0].shape == ["batch", 10]
    convs = {_module(n) for n in cnn.model.graph.node if n.op_type == "Conv"}
    # BatchNorm is folded into the Conv; the Conv keeps the name of the module owning its weight
    assert convs == {"stem.0", "block1.conv1.0", "block1.conv2.0", "block2.conv1.0", "block2.conv2.0"}
    assert {_module(n) for n in cnn.model.graph.node if n.op_type in ("Gemm", "MatMul")} == {"fc"}


def test_random_inputs_checks_dims(llama):
    with pytest.raises(SourceError, match="'heads'"):
        llama.random_inputs(np.random.default_rng(0), {"heads": 2})
    with pytest.raises(SourceError, match=r"'batch'.*\[1, 64\]"):
        llama.random_inputs(np.random.default_rng(0), {"batch": 65})


def test_content_hash(llama, cnn):
    assert len(llama.content_hash()) == 64
    assert llama.content_hash() == llama.content_hash() != cnn.content_hash()


def test_weights_are_deterministic():
    a, b = tiny_llama()["module"].state_dict(), tiny_llama()["module"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_list_examples():
    names = [n for n, _ in list_examples()]
    assert names == list(EXAMPLES) == ["tiny-llama", "small-cnn", "mlp-large", "llama3-8b-layers"]
    assert all(desc for _, desc in list_examples())


def test_mlp_large_eager():
    spec = mlp_large(batch=1, seq=4)
    x = spec["inputs"][0]
    assert x.shape == (1, 4, 2048)
    with torch.no_grad():
        y = spec["module"](x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert 0.1 < (y - x).std() < 10  # the blocks really do something
    assert spec["module"].blocks[3].mlp.up_proj.weight.shape == (5632, 2048)


def test_grouped_query_attention_equals_attention_with_repeated_kv_heads():
    """kv_heads < heads is the same function as full attention whose K/V weights repeat per head group."""
    torch.manual_seed(0)
    gqa, full = Attention(64, 8, kv_heads=2).eval(), Attention(64, 8).eval()
    with torch.no_grad():
        full.q_proj.weight.copy_(gqa.q_proj.weight)
        full.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, 8, 64)  # [kv_heads, head_dim, hidden]
            getattr(full, name).weight.copy_(w.repeat_interleave(4, dim=0).reshape(64, 64))
        x, cos, sin = torch.randn(2, 5, 64), torch.randn(5, 8), torch.randn(5, 8)
        mask = torch.triu(torch.full((5, 5), -1e4), 1)
        torch.testing.assert_close(gqa(x, cos, sin, mask), full(x, cos, sin, mask), rtol=1e-6, atol=1e-6)


def test_llama3_8b_layers_is_llama_3_8b_sized_and_its_gqa_graph_exports():
    """The decode benchmark example's layer sizes, and the same architecture (scaled down) through the
    ONNX export, run by ONNX Runtime against torch."""
    cfg = LLAMA3_8B_LAYERS
    assert (cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["ffn"]) == (4096, 32, 8, 14336)
    small = dict(cfg, hidden=128, heads=8, kv_heads=2, ffn=256, vocab=64, max_seq=64)
    src = source_from_factory_result(tiny_llama(2, 7, **small), name="gqa", kind="builtin", where="test", opset=21,
                                     work_dir=None)
    assert src.torch_module.layers[0].attn.k_proj.weight.shape == (32, 128)  # 2 KV heads x head_dim 16
    feeds = src.random_inputs(np.random.default_rng(3), {"batch": 2, "seq": 9})
    got = ort_session(src.model).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, _torch_out(src, feeds), atol=1e-4, rtol=1e-4)
