"""The fused operators that the passes put into the graph, with their PyTorch meaning.

Each is an ordinary function over ``[batch, seq, ...]`` tensors, so a rewritten graph still runs
with PyTorch and every pass can be checked against the graph it started from. Lowering turns
each of them into a kernel call of the program.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    None: lambda t: t,
    "gelu": lambda t: F.gelu(t),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
    "relu": torch.relu,
}


def embed_layernorm(
    input_ids,
    token_type_ids,
    word,
    position,
    token_type,
    ln_weight,
    ln_bias,
    eps,
    position_offset,
    padding_idx=None,
):
    """LayerNorm(word[ids] + position[s + offset] + token_type[type ids]).

    With ``padding_idx`` (RoBERTa and its family), positions are ``padded_positions(input_ids,
    padding_idx)`` instead, which equal ``s + offset`` (offset ``padding_idx + 1``) wherever no
    padding token comes at or before ``s``.
    """
    if padding_idx is not None:
        pos = padded_positions(input_ids, padding_idx)
        x = F.embedding(input_ids, word) + F.embedding(pos, position)
    else:
        seq = input_ids.shape[1]
        pos = torch.arange(seq, device=input_ids.device) + position_offset
        x = F.embedding(input_ids, word) + F.embedding(pos, position)[None]
    if token_type is not None:
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = x + F.embedding(tt, token_type)
    return F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)


def padded_positions(input_ids, padding_idx):
    """RoBERTa's position ids: ``padding_idx`` + the number of tokens up to and including this
    one that are not ``padding_idx``; ``padding_idx`` itself at padding tokens. ``[B, S]``."""
    real = input_ids.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


def linear(x, weight, bias, activation, residual):
    """activation(x @ weight.T + bias) + residual."""
    y = _ACTIVATIONS[activation](F.linear(x, weight, bias))
    return y if residual is None else y + residual


def layer_norm(x, residual, weight, bias, eps):
    """LayerNorm(x + residual) over the last dimension."""
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def padding_mask(attention_mask):
    """The boolean ``[B, 1, 1, S]`` key-padding mask of ``attention_mask`` (1 = visible)."""
    return attention_mask.bool()[:, None, None, :]


def attention(q, k, v, attention_mask, num_heads, scale):
    """Bidirectional multi-head attention over ``[B, S, H]`` q, k, v, keys masked where
    ``attention_mask`` is 0. Returns ``[B, S, H]``."""
    b, s, h = q.shape
    d = h // num_heads

    def heads(t):
        return t.reshape(b, s, num_heads, d).transpose(1, 2)

    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()[:, None, None, :]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(b, s, h)


def attention_packed(qkv, attention_mask, num_heads, scale):
    """``attention`` over one ``[B, S, 3H]`` tensor holding q, k and v side by side."""
    q, k, v = qkv.chunk(3, dim=-1)
    return attention(q, k, v, attention_mask, num_heads, scale)


def attention_first(q, k, v, attention_mask, num_heads, scale):
    """``attention`` of the first query of each sequence only: ``[B, H]``, the row at position 0
    of ``attention(q, k, v, attention_mask, num_heads, scale)``."""
    return attention(q, k, v, attention_mask, num_heads, scale)[:, 0]


def attention_packed_first(qkv, attention_mask, num_heads, scale):
    """``attention_first`` over one ``[B, S, 3H]`` tensor holding q, k and v side by side."""
    return attention_packed(qkv, attention_mask, num_heads, scale)[:, 0]


def first_token(x):
    """The hidden state at position 0 of each sequence: ``[B, S, H] -> [B, H]``."""
    return x[:, 0]


def pointwise(expr, *inputs):
    """A fused chain of elementwise ops (see ``optimum_disc.kernels.pointwise``)."""
    from optimum_disc.kernels.pointwise import pointwise_reference

    full = next(t for t, kind in zip(inputs, expr["inputs"]) if kind == "full")
    if full.dim() == 0:  # a scalar (a constant of the model): one row of one value
        flat = [t.reshape(1, 1) if kind == "full" else t for t, kind in zip(inputs, expr["inputs"])]
        return pointwise_reference(expr, flat, out_dtype=full.dtype).reshape(())
    lead = full.shape[:-1]
    flat = [
        t.reshape(-1, t.shape[-1]) if kind == "full" else t
        for t, kind in zip(inputs, expr["inputs"])
    ]
    return pointwise_reference(expr, flat, out_dtype=full.dtype).reshape(*lead, -1)


FUSED_OPS = (
    padding_mask,
    padded_positions,
    embed_layernorm,
    linear,
    layer_norm,
    attention,
    attention_packed,
    attention_first,
    attention_packed_first,
    first_token,
    pointwise,
)
