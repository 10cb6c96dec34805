"""Built-in example models with deterministic (seeded) weights.

- ``tiny-llama``: decoder-only transformer (RMSNorm, RoPE causal attention written out with
  MatMul/Softmax, SwiGLU MLP), vocab 512, hidden 256, 2 layers, 4 heads, ffn 688.
- ``small-cnn``: Conv-BN-ReLU stem, two residual blocks, MaxPool, global average pool, Linear.
- ``mlp-large``: 4 blocks of RMSNorm + SwiGLU MLP (2048 -> 5632 -> 2048) with residuals.
- ``llama3-8b-layers``: tiny-llama's architecture at Llama-3-8B's layer size (hidden 4096, grouped-query
  attention 32/8 heads, SwiGLU 14336), 2 layers, vocab 1024: the decode-speed benchmark of weight-only recipes.

Each factory returns the dict form of a model factory (see `qcompile.frontend.source`).
Weights are drawn with std ``fan_in ** -0.5`` (0.02-0.06 at these sizes), so activations and
logits are O(1) and cosine-similarity comparisons are meaningful.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

SEED = 20261122


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    factory: Callable[[], dict[str, Any]]


def _init_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic init: Linear/Conv ~ N(0, fan_in^-0.5), Embedding ~ N(0, 1), norms ~ 1 +- 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim == 1:  # norm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(1.0 + 0.2 * torch.rand(b.shape, generator=gen))
    return module.eval()


# --------------------------------------------------------------------------- tiny-llama


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal self-attention; `kv_heads < heads` is grouped-query attention (each K/V head serves
    heads / kv_heads query heads)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.kv_heads = kv_heads or heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def _kv(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        t = proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads == self.heads:
            return t
        rep = self.heads // self.kv_heads
        return t[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self._kv(self.k_proj, x), self._kv(self.v_proj, x)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, kv_heads: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(hidden)
        self.attn = Attention(hidden, heads, kv_heads)
        self.mlp_norm = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, ffn)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    """Decoder-only transformer: input_ids [batch, seq] -> logits [batch, seq, vocab]."""

    def __init__(self, vocab: int = 512, hidden: int = 256, layers: int = 2, heads: int = 4, ffn: int = 688,
                 max_seq: int = 2048, rope_theta: float = 10000.0, kv_heads: int | None = None):
        super().__init__()
        self.vocab, self.max_seq = vocab, max_seq
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderBlock(hidden, heads, ffn, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        head_dim = hidden // heads
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        pos = torch.arange(seq, device=input_ids.device)
        # additive causal mask; finite (-1e4) so it survives fp16 and range calibration
        mask = (pos[None, :] > pos[:, None]).to(x.dtype) * -1e4
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def tiny_llama(batch: int = 2, seq: int = 16, **sizes) -> dict[str, Any]:
    model = _init_(TinyLlama(**sizes), SEED)
    ids = torch.randint(0, model.vocab, (batch, seq), generator=torch.Generator().manual_seed(SEED + 1))
    return {"module": model, "inputs": (ids,), "input_names": ["input_ids"], "output_names": ["logits"],
            "dynamic_dims": {"input_ids": {0: "batch", 1: "seq"}},
            "dim_ranges": {"batch": (1, 64), "seq": (1, model.max_seq)},
            "value_ranges": {"input_ids": (0, model.vocab)}}


# Llama-3-8B's decoder layer (hidden 4096, 32 query / 8 KV heads, SwiGLU 14336, RoPE theta 5e5); vocab kept
# small so the (unquantized) embedding and LM head do not dominate a decode-speed comparison of the layers
LLAMA3_8B_LAYERS = dict(vocab=1024, hidden=4096, layers=2, heads=32, kv_heads=8, ffn=14336, max_seq=2048,
                        rope_theta=500000.0)


def llama3_8b_layers(batch: int = 1, seq: int = 16) -> dict[str, Any]:
    return tiny_llama(batch, seq, **LLAMA3_8B_LAYERS)


# --------------------------------------------------------------------------- small-cnn


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBN(channels, channels)
        self.conv2 = ConvBN(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(x + y)


class SmallCNN(nn.Module):
    """image [batch, 3, 32, 32] -> logits [batch, 10]."""

    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        self.stem = ConvBN(3, channels)
        self.block1 = ResidualBlock(channels)
        self.block2 = ResidualBlock(channels)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(channels, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(image))
        x = self.pool(self.block2(self.block1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def small_cnn(batch: int = 2) -> dict[str, Any]:
    model = _init_(SmallCNN(), SEED + 2)
    image = torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(SEED + 3))
    return {"module": model, "inputs": (image,), "input_names": ["image"], "output_names": ["logits"],
            "dynamic_dims": {"image": {0: "batch"}}, "dim_ranges": {"batch": (1, 64)}}


# --------------------------------------------------------------------------- mlp-large


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MLPLarge(nn.Module):
    """hidden [batch, seq, 2048] -> hidden_out [batch, seq, 2048]; GEMM-heavy benchmark model."""

    def __init__(self, hidden: int = 2048, ffn: int = 5632, blocks: int = 4):
        super().__init__()
        self.hidden = hidden
        self.blocks = nn.ModuleList(MLPBlock(hidden, ffn) for _ in range(blocks))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def mlp_large(batch: int = 2, seq: int = 16, **sizes) -> dict[str, Any]:
    model = _init_(MLPLarge(**sizes), SEED + 4)
    x = torch.randn((batch, seq, model.hidden), generator=torch.Generator().manual_seed(SEED + 5))
    return {"module": model, "inputs": (x,), "input_names": ["hidden"], "output_names": ["hidden_out"],
            "dynamic_dims": {"hidden": {0: "batch", 1: "seq"}}, "dim_ranges": {"batch": (1, 64), "seq": (1, 2048)}}


EXAMPLES: dict[str, Example] = {e.name: e for e in (
    Example("tiny-llama", "decoder-only transformer (RoPE attention, SwiGLU), vocab 512, hidden 256, 2 layers",
            tiny_llama),
    Example("small-cnn", "Conv-BN-ReLU stem, 2 residual blocks, pool, classifier; image [batch, 3, 32, 32]",
            small_cnn),
    Example("mlp-large", "4 x (RMSNorm + SwiGLU 2048->5632->2048), GEMM-heavy GPU benchmark", mlp_large),
    Example("llama3-8b-layers", "2 decoder layers of Llama-3-8B's size (hidden 4096, 32/8 heads, SwiGLU 14336), "
            "vocab 1024, random weights; decode (M = 1) GPU benchmark", llama3_8b_layers),
)}


def list_examples() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in example."""
    return [(e.name, e.description) for e in EXAMPLES.values()]
