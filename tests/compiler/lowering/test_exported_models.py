"""Round trips of torch.onnx.export(dynamo=True, opset 21) graphs: a transformer block and a CNN,
lowered and compared with the torch module and with ONNX Runtime; torch.export of the lowered
program with dynamic dims; the ScaledGemm plugin node; one AOTInductor package (slow)."""
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qc_testutil import ort_session
from qcompile.lowering import lower_onnx


class Block(nn.Module):
    """Embedding -> RMSNorm -> causal attention with rotary embedding -> RMSNorm -> SwiGLU -> logits."""

    def __init__(self, vocab=64, dim=32, heads=4, ffn=48):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.Parameter(1 + 0.1 * torch.randn(dim)), nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim)))

    @staticmethod
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    @staticmethod
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, ids):
        b, s = ids.shape
        x = self.embed(ids)
        q, k, v = self.qkv(self.rms(x, self.norm1)).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        freqs = torch.arange(s, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q, k = q * cos + self.rotate_half(q) * sin, k * cos + self.rotate_half(k) * sin
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        attn = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, -1))
        h = self.rms(x, self.norm2)
        x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        return self.head(x)


class Cnn(nn.Module):
    """Conv-BN-ReLU stem, one residual block, MaxPool, grouped strided conv, global average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.res = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = torch.relu(self.down(self.pool(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.8, 1.2)
                m.weight.normal_(1, 0.1), m.bias.normal_(0, 0.1)
    return module.eval()


def _export(module, example, dims):
    batch = torch.export.Dim("batch", min=1, max=64)
    dyn = {0: batch} | ({1: torch.export.Dim("seq", min=2, max=256)} if "seq" in dims else {})
    program = torch.onnx.export(module, (example,), dynamo=True, opset_version=21, input_names=["x"],
                                output_names=["y"], dynamic_shapes=(dyn,), verbose=False)
    return program.model_proto


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    module = Block().eval()
    return module, _export(module, torch.randint(0, 64, (2, 8)), ("batch", "seq"))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    module = _randomize_bn(Cnn())
    return module, _export(module, torch.randn(2, 3, 16, 16), ("batch",))


def test_transformer_block_matches_torch_and_ort(transformer):
    module, model = transformer
    ops = {n.op_type for n in model.graph.node}
    assert {"Trilu", "Where", "Softmax", "Cos", "Sin", "Concat", "Slice", "Shape"} & ops, ops
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
    got = lower_onnx(model)(ids)[0]
    with torch.no_grad():
        torch.testing.assert_close(got, module(ids), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.numpy(), ort_session(model).run(None, {"x": ids.numpy()})[0], rtol=1e-4, atol=1e-4)


def test_cnn_matches_torch_and_ort(cnn):
    module, model = cnn
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    got = lower_onnx(model)(x)[0]
    with torch.no_grad():
        torch.testing.assert_close(got, module(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.numpy(), ort_session(model).run(None, {"x": x.numpy()})[0], rtol=1e-4, atol=1e-4)


def test_export_with_dynamic_dims_keeps_provenance(transformer):
    module, model = transformer
    program = lower_onnx(model)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=256)
    with torch.fx.traceback.preserve_node_meta():
        ep = torch.export.export(program, (torch.randint(0, 64, (2, 8)),), dynamic_shapes=(({0: batch, 1: seq},),))
    names = {n.meta.get("custom", {}).get("onnx_node") for n in ep.graph.nodes if n.op == "call_function"}
    assert len(names - {None}) > 10, "aten nodes carry their ONNX node names"
    ids = torch.randint(0, 64, (5, 23), generator=torch.Generator().manual_seed(7))
    got = ep.module()(ids)[0]
    np.testing.assert_allclose(got.numpy(), ort_session(model).run(None, {"x": ids.numpy()})[0], rtol=1e-4, atol=1e-4)


def test_compute_dtype_float16_on_transformer(transformer):
    module, model = transformer
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8))
    got = lower_onnx(model, compute_dtype=torch.float16)(ids)[0]
    assert got.dtype == torch.float32  # the declared output dtype
    with torch.no_grad():
        want = module(ids)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999


def _scaled_gemm_model(fmt, with_bias, n=16, k=32):
    from qcompile.plugins.scaled_gemm import onnx_schema

    rng = np.random.default_rng(2)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w_scale = (np.abs(w).max(1) / (127.0 if fmt == TensorProto.INT8 else 448.0)).astype(np.float32)
    if fmt == TensorProto.INT8:
        w_q = helper.make_tensor("w_q", fmt, [n, k], np.clip(np.round(w / w_scale[:, None]), -127, 127).astype(int).ravel())
    else:
        w_q = helper.make_tensor("w_q", fmt, [n, k], (w / w_scale[:, None]).ravel().tolist())
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else np.zeros(n, np.float32)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             helper.make_tensor("x_zp", fmt, [], [0]), w_q,
             numpy_helper.from_array(w_scale, "w_scale"), numpy_helper.from_array(bias, "bias")]
    node = onnx_schema.make_node("gemm0", ["x", "x_scale", "x_zp", "w_q", "w_scale", "bias"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx_schema.add_to_model(model)
    return model


@pytest.mark.parametrize("fmt, with_bias", [(TensorProto.INT8, True), (TensorProto.INT8, False),
                                            (TensorProto.FLOAT8E4M3FN, True)])
def test_scaled_gemm_node_lowers_to_the_plugin_op(fmt, with_bias):
    model = _scaled_gemm_model(fmt, with_bias)
    x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    program = lower_onnx(model)
    np.testing.assert_allclose(program(torch.from_numpy(x))[0].numpy(), ort_session(model).run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
    ep = torch.export.export(program, (torch.from_numpy(x),),
                             dynamic_shapes=(({0: torch.export.Dim("batch", min=1, max=64)},),))
    calls = [n for n in ep.graph.nodes if "scaled_gemm" in str(n.target)]
    assert len(calls) == 1, [str(n.target) for n in ep.graph.nodes]
    x_arg, w_q, w_scale, x_scale, bias = calls[0].args
    assert w_q.meta["val"].dtype == (torch.int8 if fmt == TensorProto.INT8 else torch.float8_e4m3fn)
    assert tuple(w_scale.meta["val"].shape) == (16,) and tuple(x_scale.meta["val"].shape) == ()
    assert (bias is None) == (not with_bias)


@pytest.mark.slow
def test_aoti_package_runs(tmp_path):
    """A small graph with a Shape-driven Reshape and an int8 per-channel weight DQ, built into an
    AOTInductor package and run at a batch size other than the example's."""
    rng = np.random.default_rng(9)
    wq = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    scale = (rng.random(8) * 0.01 + 0.001).astype(np.float32)
    model = onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 21]>' + """
        g (float[N,4,4] x) => (float[N,8] y) {
            shp = Shape <start = 0, end = 1> (x)
            tail = Constant <value = int64[1] {16}> ()
            flat = Concat <axis = 0> (shp, tail)
            h = Reshape(x, flat)
            w = DequantizeLinear <axis = 1> (wq, s)
            m = MatMul(h, w)
            y = Gelu(m)
        }""")
    model.graph.initializer.extend([numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "s")])
    program = lower_onnx(model)
    ep = torch.export.export(program, (torch.randn(2, 4, 4),),
                             dynamic_shapes=(({0: torch.export.Dim("batch", min=1, max=32)},),))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    x = rng.standard_normal((7, 4, 4)).astype(np.float32)
    got = compiled(torch.from_numpy(x))[0]
    np.testing.assert_allclose(got.numpy(), ort_session(model).run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["transformer", "cnn"])
def test_runs_on_the_device_of_its_inputs(fixture, request):
    """Tensors the converters create (Range of a shape, masks, shape data) land on the inputs' device: on
    the meta device any CPU tensor mixed into the computation raises, as it would on CUDA."""
    module, model = request.getfixturevalue(fixture)
    x = torch.randint(0, 64, (3, 9)) if fixture == "transformer" else torch.randn(3, 3, 16, 16)
    got = lower_onnx(model).to("meta")(x.to("meta"))[0]
    with torch.no_grad():
        want = module(x)
    assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transformer_on_cuda_matches_cpu(transformer):
    module, model = transformer
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(9))
    want = lower_onnx(model, compute_dtype=torch.float64)(ids)[0]
    got = lower_onnx(model, compute_dtype=torch.float64).to("cuda")(ids.cuda())[0]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-9)
