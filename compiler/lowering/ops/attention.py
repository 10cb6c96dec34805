"""ONNX `Attention` (opset 23-25): scaled dot-product attention, lowered to torch's fused
`scaled_dot_product_attention` (flash / memory-efficient kernels in CUDA engines) unless the node asks for what only
the explicit math gives (a soft cap, the `qk_matmul_output` debug output, a softmax precision).

torch.onnx emits this op for `F.scaled_dot_product_attention` from opset 23 on. Semantics (the op's schema): 3-D
Q/K/V are split into `q_num_heads` / `kv_num_heads` heads; `past_key`/`past_value` are prepended to K/V and the
results are the `present_*` outputs; a boolean `attn_mask` (True attends) or a float one (added) is padded on its
last axis to the key length with "masked"; `is_causal` is bottom-right aligned (query i attends key j iff
j <= i + offset, offset = the cached keys, or `nonpad_kv_seqlen - q_len` per batch); opset 25's sliding window
bounds j - offset - i on both sides; `nonpad_kv_seqlen` masks the padded keys; grouped-query K/V heads serve
consecutive query heads; a query row with every key masked gives zeros.

Also here: `qcompile::ScaledDotProductAttention`, the node `FuseAttentionPass` makes of attention written out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qcompile.lowering.ops.dtypes import onnx_to_torch_dtype
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins import attention as fused_schema


@reg("Attention", since=23)
def attention(ctx, q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    rank3 = q.ndim == 3
    if rank3:
        heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
        if not heads or not kv_heads:
            raise ctx.fail("3-D Q, K and V need the q_num_heads and kv_num_heads attributes")
        q, k, v = split_heads(q, heads), split_heads(k, kv_heads), split_heads(v, kv_heads)
    if (past_key is None) != (past_value is None):
        raise ctx.fail("past_key and past_value must be given together")
    past = 0
    if past_key is not None:
        past_key, past_value = as_tensor(past_key), as_tensor(past_value)
        past = past_key.shape[2]
        k, v = torch.cat([past_key.to(k.dtype), k], 2), torch.cat([past_value.to(v.dtype), v], 2)
    present = (k, v)
    if q.shape[1] % k.shape[1]:
        raise ctx.fail(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads evenly")
    scale = ctx.attr("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    offset = past if nonpad_kv_seqlen is None else as_tensor(nonpad_kv_seqlen).reshape(-1, 1, 1, 1) - q.shape[2]
    bias = _bias(ctx, attn_mask, nonpad_kv_seqlen, offset, q, k)
    kr, vr = repeat_kv_heads(k, v, q.shape[1])
    softcap, precision = float(ctx.attr("softcap", 0.0) or 0.0), ctx.attr("softmax_precision")
    if softcap or precision is not None or ctx.num_outputs > 3:
        y, qk = _explicit(ctx, q, kr, vr, bias, scale, softcap, precision)
    else:
        plain_causal = bias is None and bool(ctx.attr("is_causal", 0))  # offset 0: torch's top-left mask
        y = F.scaled_dot_product_attention(q, kr, vr, attn_mask=bias, is_causal=plain_causal, scale=scale)
        y, qk = _zero_masked_rows(y, bias), None
    if rank3:
        y = merge_heads(y)
    return (y, *present, qk)[:max(ctx.num_outputs, 1)]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads * size] -> [batch, heads, seq, size]."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, size] -> [batch, seq, heads * size]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def repeat_kv_heads(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V with each of their heads repeated for the consecutive query heads it serves (grouped-query)."""
    rep = heads // k.shape[1]
    return (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1 else (k, v)


def _bias(ctx, attn_mask, nonpad_kv_seqlen, offset, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The additive bias over [.., q_len, kv_len] in Q's dtype (0 attends, -inf masked), or None when nothing is
    masked beyond what torch's `is_causal` (top-left, offset 0) gives."""
    q_len, kv_len = q.shape[2], k.shape[2]
    causal = bool(ctx.attr("is_causal", 0))
    left, right = ctx.attr("left_window_size", -1), ctx.attr("right_window_size", -1)
    positional = left >= 0 or right >= 0 or nonpad_kv_seqlen is not None \
        or (causal and not (isinstance(offset, int) and offset == 0))
    if attn_mask is None and not positional:
        return None
    bias = torch.zeros((), dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        bias = bias + _mask_bias(as_tensor(attn_mask), kv_len, q.dtype)
    if causal or positional:
        i = torch.arange(q_len, device=q.device).reshape(-1, 1)
        j = torch.arange(kv_len, device=q.device).reshape(1, -1)
        ahead = j - (i + offset)  # how far past the query's own (absolute) position a key lies
        allowed = torch.ones_like(ahead, dtype=torch.bool)
        if causal:
            allowed &= ahead <= 0
        if left >= 0:
            allowed &= -ahead <= left
        if right >= 0:
            allowed &= ahead <= right
        if nonpad_kv_seqlen is not None:
            allowed = allowed & (j < as_tensor(nonpad_kv_seqlen).reshape(-1, 1, 1, 1))
        bias = bias + additive_mask(allowed, q.dtype)
    return bias


def _mask_bias(mask: torch.Tensor, kv_len, dtype: torch.dtype) -> torch.Tensor:
    """`attn_mask` as an additive bias, its last axis padded to `kv_len` with -inf."""
    bias = additive_mask(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)
    pad = kv_len - bias.shape[-1]
    if isinstance(pad, int) and pad == 0:
        return bias
    return torch.cat([bias, bias.new_full((*bias.shape[:-1], pad), -math.inf)], -1)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, -inf elsewhere, in `dtype`."""
    return torch.where(allowed, 0.0, -math.inf).to(dtype)


@reg(fused_schema.OP_TYPE, since=fused_schema.VERSION, domain=fused_schema.DOMAIN)
def fused_attention(ctx, q, k, v, mask=None):
    """`qcompile::ScaledDotProductAttention` (written by `FuseAttentionPass`): Softmax(Q K^T scale + mask) V as
    torch's fused attention. A query row whose every key is masked gives what the kernel gives (the written-out
    softmax gives NaN there)."""
    q = as_tensor(q)
    bias = None if mask is None else as_tensor(mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, as_tensor(k).to(q.dtype), as_tensor(v).to(q.dtype), attn_mask=bias,
                                          scale=float(ctx.attr("scale")))


def _zero_masked_rows(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x` with zeros on the query rows whose every key is masked (the explicit softmax gives NaN there, and so
    does CUDA's memory-efficient kernel, pytorch#110213; torch's CPU kernel gives zeros already)."""
    if bias is None:
        return x
    dead = torch.isneginf(bias.amax(-1, keepdim=True))
    return torch.where(dead, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _explicit(ctx, q, k, v, bias, scale: float, softcap: float, precision):
    """Y and the requested `qk_matmul_output` in explicit math, in the schema's order of steps."""
    root = math.sqrt(scale)
    scores = (q * root) @ (k * root).transpose(-1, -2)
    raw = scores
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    capped = scores
    if ctx.attr("is_causal", 0) and bias is None:
        q_len, kv_len = q.shape[2], k.shape[2]
        bias = additive_mask(torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(), q.dtype)
    if bias is not None:
        scores = scores + bias
    biased = scores
    dtype = scores.dtype if precision is None else onnx_to_torch_dtype(int(precision))
    probs = _zero_masked_rows(torch.softmax(scores.to(dtype), -1), bias).to(q.dtype)
    mode = ctx.attr("qk_matmul_output_mode", 0)
    if mode not in (0, 1, 2, 3):
        raise ctx.fail(f"qk_matmul_output_mode {mode} is not one of 0, 1, 2, 3")
    return probs @ v, (raw, capped, biased, probs)[mode].to(q.dtype)
