"""ONNX RotaryEmbedding (opset 23): rotary positional embeddings (RoPE) on the first `rotary_embedding_dim` features
of each head (all of them when 0 or absent); the rest pass through.

Semantics (the op's schema): X is [batch, heads, seq, head_size], or [batch, seq, heads * head_size] split by
`num_heads`. The caches hold cos/sin over half the rotary dim: [batch, seq, dim/2], or [positions, dim/2] indexed by
`position_ids` [batch, seq]. A pair (x1, x2) becomes (x1 cos - x2 sin, x1 sin + x2 cos); pairs are the two halves of
the rotary features, or neighbours (2i, 2i+1) when `interleaved`.
"""
from __future__ import annotations

import torch

from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor


@reg("RotaryEmbedding", since=23)
def rotary_embedding(ctx, x, cos_cache, sin_cache, position_ids=None):
    x = as_tensor(x)
    heads, head_axis = _with_heads(ctx, x)
    cos, sin = (cache_angles(as_tensor(c), position_ids, head_axis).to(x.dtype) for c in (cos_cache, sin_cache))
    dim = ctx.attr("rotary_embedding_dim", 0) or heads.shape[-1]
    if isinstance(cos.shape[-1], int) and isinstance(dim, int) and 2 * cos.shape[-1] != dim:
        raise ctx.fail(f"the caches' last dim {cos.shape[-1]} is not half the rotary dim {dim}")
    rotated = rotate_pairs(heads[..., :dim], cos, sin, bool(ctx.attr("interleaved", 0)))
    return torch.cat([rotated, heads[..., dim:]], -1).reshape(x.shape)


def _with_heads(ctx, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """X with a heads axis ([batch, heads, seq, size] or [batch, seq, heads, size]) and that axis."""
    if x.ndim == 4:
        return x, 1
    if x.ndim != 3:
        raise ctx.fail(f"X must be 3-D or 4-D, not {x.ndim}-D")
    heads = ctx.attr("num_heads", 0)
    if not heads:
        raise ctx.fail("a 3-D X needs the num_heads attribute")
    return x.reshape(x.shape[0], x.shape[1], heads, -1), 2


def cache_angles(cache: torch.Tensor, position_ids, head_axis: int) -> torch.Tensor:
    """The [batch, seq, dim/2] cache values (looked up by `position_ids` when given), broadcastable over the heads."""
    if position_ids is not None:
        cache = cache[as_tensor(position_ids).to(torch.int64)]
    return cache.unsqueeze(head_axis)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, -1)
    real, imag = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    if interleaved:
        return torch.stack([real, imag], -1).flatten(-2)
    return torch.cat([real, imag], -1)
