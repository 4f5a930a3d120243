"""Standard causal softmax attention (Vaswani et al. 2017) with rotary positions and a KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops.softmax import softmax_attention, softmax_attention_reference
from .cache import GrowableBuffer, LayerCache
from .qkv import QKVAttention


@dataclass
class KVCache(LayerCache):
    """Keys and values of every absorbed token: [B, H, capacity, d] each (2 * n * D numbers per row)."""

    k: GrowableBuffer = field(default_factory=GrowableBuffer)
    v: GrowableBuffer = field(default_factory=GrowableBuffer)


class StandardAttention(QKVAttention):
    """softmax(q k^T / sqrt(d)) v over all earlier tokens.

    Parallel form: ``scaled_dot_product_attention(is_causal=True)``; reference: explicit masked softmax.
    """

    def _new_cache(self, lengths):
        return KVCache(lengths)

    def _reference(self, x):
        q, k, v = self.qkv(x, 0)
        return self.out(softmax_attention_reference(q, k, v)[0])

    def _parallel(self, x):
        q, k, v = self.qkv(x, 0)
        return self.out(softmax_attention(q, k, v))

    def _attention_weights(self, x):
        q, k, v = self.qkv(x, 0)
        return softmax_attention_reference(q, k, v)[1]

    def _extend(self, x, cache: KVCache):
        offset = int(cache.lengths[0])
        q, k, v = self.qkv(x, offset)
        cache.k.append(k)
        cache.v.append(v)
        return self.out(softmax_attention(q, cache.k.view(), cache.v.view(), offset=offset))

    def _step(self, x, valid, cache: KVCache):
        q, k, v = self.qkv(x[:, None], cache.lengths[:, None])  # [B, H, 1, d]
        cache.k.append_rows(k[:, :, 0], valid)
        cache.v.append_rows(v[:, :, 0], valid)
        keys, values = cache.k.view(), cache.v.view()
        idx = torch.arange(keys.shape[2], device=x.device)
        # slot 0 stays visible so that an empty, skipped row still gets a finite (unused) output
        allowed = (idx[None, :] < cache.k.filled[:, None]) | (idx[None, :] == 0)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None, None, :])
        return self.out(o)[:, 0]
