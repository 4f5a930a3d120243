"""BSBR as a Hugging Face attention backend: the attention functions, registered under their names.

A converted model keeps its own classes, weights and code path; only ``config._attn_implementation`` changes.
The model's attention module computes q, k, v (rotated, for RoPE models) as always and hands them to
:func:`bsbr_attention_forward`, registered under the name ``"bsbr"`` (:data:`BSBR_IMPL`) in transformers'
``AttentionInterface``, with the mask function :func:`~bsbr.convert.masks.bsbr_mask` in its
``AttentionMaskInterface``.  The weights and settings are the layer's :class:`~bsbr.convert.meta.BSBRMeta`
(``module.bsbr``).  :func:`sliding_window_attention_forward` (:data:`WINDOW_IMPL`) is the cheaper conversion BSBR
is compared with.  Both take query [B, H, T, d], key/value [B, Hk, S, d] and return (output [B, T, H, d], None),
transformers' attention-function signature.

Streaming: with a :class:`~bsbr.convert.cache.BSBRHFCache` the cache's ``update`` returns only the new tokens' keys
and values and hands :func:`bsbr_attention_forward` its layer through the ``kwargs`` dict that the attention modules
pass to both ``cache.update`` and the attention function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .cache import _CACHE_KEY
from .masks import _key_validity, bsbr_mask
from .meta import BSBRMeta
from .padding import _padded_rows, _rolled

BSBR_IMPL = "bsbr"
WINDOW_IMPL = "bsbr_sliding_window"


def bsbr_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs):
    """BSBR in transformers' attention-function signature.

    query [B, H, T, d], key/value [B, Hk, S, d]; returns (output [B, T, H, d], None).  Without a cache S = T and
    each row's chunks count from its first token (left padding shifts them, as in the rest of bsbr).  With a
    :class:`~bsbr.convert.cache.BSBRHFCache`, S = T: the keys and values are the new tokens', and the cache
    supplies the past.
    """
    meta: BSBRMeta = module.bsbr
    B, H, T, d = query.shape
    S = key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    layer = kwargs.get(_CACHE_KEY)
    if S != T:
        raise ValueError(f"BSBR attention got {S} keys for {T} queries: the model was given a KV cache (e.g. "
                         f"DynamicCache) instead of bsbr.convert.BSBRHFCache; pass cache=BSBRHFCache() or none")
    valid = _key_validity(attention_mask, S)
    if layer is not None:
        out = layer.process(meta, query, key, value, valid, scaling)
    elif valid is None:
        out = meta.full(query, key, value, scaling, dropout=dropout)
    else:
        start, count = _padded_rows(valid)
        q, k, v = (_rolled(t, start) for t in (query, key, value))  # each row's tokens first, padding after
        out = _rolled(meta.full(q, k, v, scaling, dropout=dropout), start, inverse=True)
        out = torch.where(valid[:, None, :, None], out, 0.0)  # a select: padding's NaN stays out of the zeros
    return out.transpose(1, 2).contiguous(), None


def sliding_window_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                                     scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Causal softmax attention over the ``module.bsbr_window`` latest keys and, with ``module.bsbr_window_sink`` =
    s > 0, the row's first s tokens (StreamingLLM's attention sinks): the cheaper conversions BSBR is compared with.
    query [B, H, T, d], key/value [B, Hk, S, d] (S >= T with a KV cache)."""
    W = module.bsbr_window
    sink = getattr(module, "bsbr_window_sink", 0)
    B, H, T, d = query.shape
    S = key.shape[2]
    G = H // key.shape[1]
    valid = _key_validity(attention_mask, S)
    qpos = (S - T) + torch.arange(T, device=query.device)[:, None]
    kpos = torch.arange(S, device=query.device)[None, :]
    allowed = (kpos <= qpos) & (kpos > qpos - W)  # [T, S]
    if sink and valid is None:
        allowed = allowed | ((kpos < sink) & (kpos <= qpos))
    if valid is not None:
        allowed = allowed[None, None] & valid[:, None, None, :]
        if sink:  # each row's first s tokens (rows may be left-padded)
            rank = valid.long().cumsum(-1) - 1  # [B, S]
            allowed = allowed | ((rank < sink) & valid)[:, None, None, :] & (kpos <= qpos)
        allowed = allowed | (kpos == qpos)  # a padding query sees itself: no empty rows (its output is zeroed)
    k, v = (t.repeat_interleave(G, dim=1) if G > 1 else t for t in (key, value))
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, dropout_p=dropout,
                                         scale=d**-0.5 if scaling is None else scaling)
    if valid is not None:
        out = out * valid[:, None, S - T :, None]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(BSBR_IMPL, bsbr_attention_forward)
AttentionMaskInterface.register(BSBR_IMPL, bsbr_mask)
AttentionInterface.register(WINDOW_IMPL, sliding_window_attention_forward)
AttentionMaskInterface.register(WINDOW_IMPL, bsbr_mask)
