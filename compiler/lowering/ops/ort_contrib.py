"""ONNX Runtime's contrib ops for transformers, as its transformer optimizer and ONNX Runtime GenAI exports emit them:
fused (skip) layer / RMS normalizations, GELU variants, RotaryEmbedding, GroupQueryAttention, MultiHeadAttention.

Semantics are those of ORT's CPU kernels (ContribOperators.md in the onnxruntime repository), which the tests compare
against; BiasAdd and BiasSplitGelu have CUDA kernels only and follow their documentation. Most live in the
`com.microsoft` domain; ORT registers `SimplifiedLayerNormalization` and the pre-opset-17 `LayerNormalization` in the
default one (ONNX itself has the latter from opset 17 only).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from qcompile.lowering.ops.attention import additive_mask, merge_heads, repeat_kv_heads, split_heads
from qcompile.lowering.ops.elementwise import sigmoid_gated, with_alpha
from qcompile.lowering.ops.nn import layer_norm, normalized_dims, rms_normalize
from qcompile.lowering.ops.rotary import cache_angles, rotate_pairs
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import IntList, as_tensor

DOMAIN = "com.microsoft"
SKIP_NORM_EPSILON = 1e-12  # the Skip*LayerNormalization schemas' default


def _contrib(op_type: str):
    return reg(op_type, since=1, domain=DOMAIN)


# --- normalizations -----------------------------------------------------------------------------------------------

reg("LayerNormalization", since=1)(layer_norm)  # ORT's default-domain op below opset 17: opset 17's semantics


def _skip_sum(x, skip, bias) -> torch.Tensor:
    """input + skip (+ bias), the normalized value and the `input_skip_bias_sum` output."""
    x = as_tensor(x)
    return _biased(x + as_tensor(skip).to(x.dtype), bias)


@reg("SimplifiedLayerNormalization", since=1)
def simplified_layer_norm(ctx, x, scale):
    """RMSNorm over the axes from `axis` on; Y in the scale's type (ORT's `V`), optional inv_std_var."""
    x = as_tensor(x)
    y, inv_std = rms_normalize(x, scale, normalized_dims(ctx, x), ctx.attr("epsilon", 1e-5), as_tensor(scale).dtype)
    return (y, inv_std)[:max(ctx.num_outputs, 1)]


@_contrib("SkipLayerNormalization")
def skip_layer_norm(ctx, x, skip, gamma, beta=None, bias=None):
    total = _skip_sum(x, skip, bias)
    norm_ctx = dataclasses.replace(ctx, attrs={"epsilon": ctx.attr("epsilon", SKIP_NORM_EPSILON)}, num_outputs=3)
    return (*layer_norm(norm_ctx, total, gamma, beta), total)[:max(ctx.num_outputs, 1)]


@_contrib("SkipSimplifiedLayerNormalization")
def skip_simplified_layer_norm(ctx, x, skip, gamma, bias=None):
    """RMSNorm of input + skip (+ bias); the `mean` output is zeros, as ORT gives."""
    total = _skip_sum(x, skip, bias)
    y, inv_std = rms_normalize(total, gamma, [-1], ctx.attr("epsilon", SKIP_NORM_EPSILON), total.dtype)
    return (y, torch.zeros_like(inv_std), inv_std, total)[:max(ctx.num_outputs, 1)]


# --- activations --------------------------------------------------------------------------------------------------

def _biased(x, bias) -> torch.Tensor:
    x = as_tensor(x)
    return x if bias is None else x + as_tensor(bias).to(x.dtype)


@_contrib("Gelu")
def gelu(ctx, x):
    return F.gelu(as_tensor(x))


@_contrib("BiasGelu")
def bias_gelu(ctx, a, b):
    return F.gelu(_biased(a, b))


@_contrib("FastGelu")
def fast_gelu(ctx, x, bias=None):
    """GELU's tanh approximation of x (+ bias)."""
    return F.gelu(_biased(x, bias), approximate="tanh")


_contrib("QuickGelu")(with_alpha(sigmoid_gated, 1.702))


@_contrib("BiasAdd")
def bias_add(ctx, x, bias, skip):
    y = _biased(x, bias)
    return y + as_tensor(skip).to(y.dtype)


@_contrib("BiasSplitGelu")
def bias_split_gelu(ctx, x, bias):
    """x + bias split in halves on the last axis: left * gelu(right)."""
    left, right = _biased(x, bias).chunk(2, -1)
    return left * F.gelu(right)


# --- rotary embeddings --------------------------------------------------------------------------------------------

def _rope(heads: torch.Tensor, cos_cache, sin_cache, positions: torch.Tensor, head_axis: int,
          interleaved: bool) -> torch.Tensor:
    """`heads` with the first 2 * cache-width features of each head rotated at `positions` ([batch or 1, seq])."""
    cos, sin = (cache_angles(as_tensor(c), positions, head_axis).to(heads.dtype) for c in (cos_cache, sin_cache))
    dim = 2 * cos.shape[-1]
    return torch.cat([rotate_pairs(heads[..., :dim], cos, sin, interleaved), heads[..., dim:]], -1)


@_contrib("RotaryEmbedding")
def rotary_embedding(ctx, x, position_ids, cos_cache, sin_cache):
    """X [batch, seq, hidden] or [batch, heads, seq, head_size]; position_ids [batch, seq], or [1]: an offset shared
    by the batch; the caches [positions, rotary_dim / 2]."""
    if ctx.attr("is_packed_batching", 0):
        raise ctx.fail("is_packed_batching (ragged batches) is not supported")
    x, cos_cache = as_tensor(x), as_tensor(cos_cache)
    dim = ctx.attr("rotary_embedding_dim", 0)
    if dim and 2 * cos_cache.shape[-1] != dim:
        raise ctx.fail(f"the caches' last dim {cos_cache.shape[-1]} is not half rotary_embedding_dim {dim}")
    if x.ndim == 4:
        heads, head_axis, seq = x, 1, x.shape[2]
    elif x.ndim == 3:
        num_heads = ctx.attr("num_heads", 0)
        if dim and not num_heads:
            raise ctx.fail("a 3-D input with rotary_embedding_dim needs the num_heads attribute")
        head_size = -1 if num_heads else 2 * cos_cache.shape[-1]  # without num_heads, all features rotate
        heads, head_axis, seq = x.reshape(x.shape[0], x.shape[1], num_heads or -1, head_size), 2, x.shape[1]
    else:
        raise ctx.fail(f"the input must be 3-D or 4-D, not {x.ndim}-D")
    positions = as_tensor(position_ids).to(torch.int64)
    if positions.ndim != 2:
        positions = positions.reshape(-1)[:1].reshape(1, 1) + torch.arange(seq, device=x.device).reshape(1, -1)
    return _rope(heads, cos_cache, sin_cache, positions, head_axis, bool(ctx.attr("interleaved", 0))).reshape(x.shape)


# --- attention ----------------------------------------------------------------------------------------------------

def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
            softcap: float = 0.0, sink: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * Q K^T, soft-capped, + bias) V over [batch, heads, seq, size] tensors, K/V heads shared by
    consecutive query heads; `sink` ([heads]) is an extra logit per head in the softmax's denominator only."""
    k, v = repeat_kv_heads(k, v, q.shape[1])
    if not softcap and sink is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scores = scale * (q @ k.transpose(-1, -2))
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if sink is not None:
        column = sink.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1] @ v
    return torch.softmax(scores, -1) @ v


def _scale(ctx, head_size) -> float:
    return float(ctx.attr("scale", 0.0) or 0.0) or 1.0 / math.sqrt(head_size)


def _padded(x: torch.Tensor, length, axis: int) -> torch.Tensor:
    """`x` zero-padded at the end of `axis` to `length` (not shorter than it already is)."""
    axis %= x.ndim
    pad = length - x.shape[axis]
    if isinstance(pad, int) and pad == 0:
        return x
    return torch.cat([x, x.new_zeros((*x.shape[:axis], pad, *x.shape[axis + 1:]))], axis)


@_contrib("GroupQueryAttention")
def group_query_attention(ctx, query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                          total_sequence_length=None, cos_cache=None, sin_cache=None, position_ids=None,
                          attention_bias=None, head_sink=None, *more):
    """Causal attention of the new tokens over a KV cache. Per batch entry b, seqlens_k[b] + 1 tokens are valid
    after this step, the new ones written at past_b = seqlens_k[b] + 1 - seq (0 on the first prompt, where
    total_sequence_length == seq) in a present buffer of max(total_sequence_length, past length) positions that
    starts as past_key / past_value; query token i attends the keys at positions past_b + i - local_window_size + 1
    .. past_b + i. With do_rotary, Q and K are rotated at their positions past_b + i first."""
    _check_gqa_support(ctx, past_key, position_ids, more)
    heads, kv_heads = ctx.attr("num_heads"), ctx.attr("kv_num_heads")
    q, k, v = _gqa_projections(ctx, as_tensor(query), key, value, heads, kv_heads)
    seq = q.shape[2]
    seqlens = as_tensor(seqlens_k).to(torch.int64)
    first_prompt = as_tensor(total_sequence_length).to(torch.int64).reshape(()) == seq
    past_lens = torch.where(first_prompt, 0, seqlens + 1 - seq)
    positions = past_lens.reshape(-1, 1) + torch.arange(seq, device=q.device)
    if ctx.attr("do_rotary", 0):
        interleaved = bool(ctx.attr("rotary_interleaved", 0))
        q, k = (_rope(x, cos_cache, sin_cache, positions, 1, interleaved) for x in (q, k))
    length = _present_length(total_sequence_length, past_key, seq)
    present_key, present_value = (_write_cache(past, new, positions, length) for past, new in
                                  ((past_key, k), (past_value, v)))
    bias = _gqa_bias(ctx, positions, length, attention_bias, q.dtype)
    sink = None if head_sink is None else as_tensor(head_sink)
    if sink is None and (ctx.attr("smooth_softmax", 0) or 0) > 0:
        sink = q.new_zeros(heads)
    y = _attend(q, present_key, present_value, bias, _scale(ctx, q.shape[-1]), float(ctx.attr("softcap", 0.0) or 0.0),
                sink)
    return (merge_heads(y), present_key, present_value)[:max(ctx.num_outputs, 1)]


def _check_gqa_support(ctx, past_key, position_ids, more) -> None:
    if ctx.num_outputs > 3:
        raise ctx.fail("the output_qk output is not supported")
    if any(x is not None for x in more):
        raise ctx.fail("quantized KV caches (k_scale, v_scale) and Q/K norm weights are not supported")
    if past_key is not None and not as_tensor(past_key).is_floating_point():
        raise ctx.fail("quantized KV caches are not supported")
    if ctx.attr("sliding_window_cache", 0):
        raise ctx.fail("sliding_window_cache (window-sized KV buffers) is not supported")
    if not ctx.attr("causal", 1):
        raise ctx.fail("causal=0 (bidirectional attention) is not supported")
    if position_ids is not None:
        raise ctx.fail("the position_ids input is not supported (rotary positions come from seqlens_k)")


def _gqa_projections(ctx, query: torch.Tensor, key, value, heads: int, kv_heads: int):
    """Q [batch, heads, seq, size] and the new K, V [batch, kv_heads, seq, size], from packed QKV when key and value
    are absent."""
    if not heads or not kv_heads or heads % kv_heads:
        raise ctx.fail(f"num_heads {heads} must be a positive multiple of kv_num_heads {kv_heads}")
    if key is None and value is None:
        size = query.shape[-1] // (heads + 2 * kv_heads)
        query, key, value = query.split([heads * size, kv_heads * size, kv_heads * size], -1)
    elif key is None or value is None:
        raise ctx.fail("key and value must be given together (or neither, for packed QKV)")
    return split_heads(query, heads), split_heads(as_tensor(key), kv_heads), split_heads(as_tensor(value), kv_heads)


def _present_length(total_sequence_length, past_key, seq):
    """ORT's max(total_sequence_length, past length). Known from shapes (an IntList, as in ORT GenAI's graphs), it
    is exact; as tensor data it cannot size a tensor under torch.export, and the past's length + seq is taken (what
    ORT gives unless past and present share a buffer longer than the total)."""
    past = 0 if past_key is None else as_tensor(past_key).shape[2]
    if isinstance(total_sequence_length, IntList):
        return torch.sym_max(total_sequence_length.values[0], past)
    return past + seq


def _write_cache(past, new: torch.Tensor, positions: torch.Tensor, length) -> torch.Tensor:
    """The present buffer: `past` (zeros where absent) of `length` positions with `new` ([batch, heads, seq, size])
    written at `positions` ([batch, seq])."""
    batch, heads, seq, size = new.shape
    base = new.new_zeros(batch, heads, 0, size) if past is None else as_tensor(past).to(new.dtype)
    index = positions.reshape(batch, 1, seq, 1).expand(batch, heads, seq, size)
    return _padded(base, length, 2).scatter(2, index, new)


def _gqa_bias(ctx, positions: torch.Tensor, length, attention_bias, dtype: torch.dtype) -> torch.Tensor:
    """The additive [batch, 1 or heads, seq, length] mask: -inf for keys after the query or before its window."""
    key_pos = torch.arange(length, device=positions.device)
    ahead = key_pos - positions.unsqueeze(-1)  # [batch, seq, length]: how far a key lies past the query
    allowed = ahead <= 0
    window = ctx.attr("local_window_size", -1)
    if window is not None and window > 0:
        allowed &= ahead > -window
    bias = additive_mask(allowed, dtype).unsqueeze(1)
    if attention_bias is not None:
        bias = bias + _padded(as_tensor(attention_bias).to(dtype), length, -1)
    return bias


@_contrib("MultiHeadAttention")
def multi_head_attention(ctx, query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
                         past_key=None, past_value=None, past_sequence_length=None, cache_indirection=None):
    """Attention of query [batch, seq, hidden] over key / value [batch, kv_seq, hidden] (projection bias added,
    past_key / past_value prepended, giving present_key / present_value) or over key / value already split in heads
    [batch, heads, kv_seq, size] (cross attention: the bias on the query only, no past). Masked scores get
    `mask_filter_value` added once per mask (key padding; `unidirectional`'s causal mask, offset by the past), and
    attention_bias is added."""
    _check_mha_support(ctx, query, key, value, past_key, past_value, past_sequence_length, cache_indirection)
    query, key, value = as_tensor(query), as_tensor(key), as_tensor(value)
    q, k, v = _mha_projections(query, key, value, bias, ctx.attr("num_heads"))
    if past_key is not None:
        k, v = torch.cat([as_tensor(past_key).to(k.dtype), k], 2), torch.cat([as_tensor(past_value).to(v.dtype), v], 2)
    mask = _mha_mask(ctx, key_padding_mask, q.shape[2], k.shape[2], q.dtype, q.device)
    if attention_bias is not None:
        mask = _biased(as_tensor(attention_bias).to(q.dtype), mask)
    y = _attend(q, k, v, mask, _scale(ctx, q.shape[-1]))
    return (merge_heads(y), k, v)[:max(ctx.num_outputs, 1)]


def _check_mha_support(ctx, query, key, value, past_key, past_value, past_sequence_length, cache_indirection):
    if ctx.num_outputs > 3:
        raise ctx.fail("the qk output is not supported")
    if past_sequence_length is not None or cache_indirection is not None:
        raise ctx.fail("buffer sharing (past_sequence_length) and beam search (cache_indirection) are not supported")
    if key is None or value is None or as_tensor(query).ndim != 3 or as_tensor(key).ndim not in (3, 4):
        raise ctx.fail("packed QKV / KV are not supported (as on ORT's CPU): give 3-D query, key and value")
    cross = as_tensor(key).ndim == 4
    if (past_key is None) != (past_value is None) or (past_key is not None and cross):
        raise ctx.fail("past_key and past_value go together, with 3-D key and value")
    if ctx.attr("unidirectional", 0) and (cross or as_tensor(key).shape[1] != as_tensor(query).shape[1]):
        raise ctx.fail("unidirectional needs self attention (key as long as query); ORT's CPU kernel misaligns its "
                       "causal mask otherwise")


def _mha_projections(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias, heads: int):
    """Q, K, V as [batch, heads, seq, size], the projection bias ([hidden + hidden + v_hidden]) added."""
    if bias is not None:
        bias = as_tensor(bias).to(query.dtype)
        hidden = query.shape[-1]
        query = query + bias[:hidden]
        if key.ndim == 3:
            key, value = key + bias[hidden:2 * hidden], value + bias[2 * hidden:]
    if key.ndim == 4:
        return split_heads(query, heads), key, value
    return split_heads(query, heads), split_heads(key, heads), split_heads(value, heads)


def _mha_mask(ctx, key_padding_mask, q_len, kv_len, dtype: torch.dtype, device) -> torch.Tensor | None:
    """The additive [batch or 1, 1, q_len, kv_len] mask, or None when nothing is masked. key_padding_mask is
    [batch] key lengths, or [batch, kv_len] / [batch, q_len, kv_len] with 0 for padding."""
    filtered = float(ctx.attr("mask_filter_value", -10000.0))
    key_pos = torch.arange(kv_len, device=device)
    mask = None
    if key_padding_mask is not None:
        padding = as_tensor(key_padding_mask)
        if padding.ndim == 1:
            keep = key_pos < padding.reshape(-1, 1, 1, 1)
        elif padding.ndim in (2, 3):
            keep = (padding != 0).reshape(padding.shape[0], 1, -1, padding.shape[-1])
        else:
            raise ctx.fail(f"a {padding.ndim}-D key_padding_mask is not supported")
        mask = torch.where(keep, 0.0, filtered).to(dtype)
    if ctx.attr("unidirectional", 0):
        query_pos = torch.arange(q_len, device=device).reshape(-1, 1) + (kv_len - q_len)  # the past's length
        causal = torch.where(key_pos <= query_pos, 0.0, filtered).to(dtype)
        mask = _biased(causal, mask)
    return mask
