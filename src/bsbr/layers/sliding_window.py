"""Sliding-window attention: softmax attention over the ``window_size`` most recent tokens (itself included).

Query t sees keys s with t - W < s <= t.  Parallel form: cut the queries into blocks of W; block n attends to
the keys of blocks n-1 and n (2W keys) by one batched product and softmax with one band mask shared by
every block — O(T W d) time and memory, never a T x T matrix (a sequence no longer than W, from its first token,
is plain causal attention and goes to SDPA's fused kernel).  Reference: a dense banded mask.  Streaming
keeps a ring of the last W keys and values per row, so the cache never grows past W tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _checks
from ..ops.window import window_attention, window_attention_reference
from .cache import LayerCache, write_slot
from .qkv import QKVAttention


@dataclass
class WindowCache(LayerCache):
    """Ring buffers of the last W rotated keys and values, [B, H, W, d] each (slot = position mod W)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class SlidingWindowAttention(QKVAttention):
    """Causal softmax attention restricted to the last ``window_size`` tokens.

    Args:
        hidden_dim, num_heads, dropout: as for every mechanism.
        window_size: W, the number of keys each query sees (itself included).
        rope, rope_base, bias: see :class:`~bsbr.layers.qkv.QKVAttention`.

    Shapes: hidden_states [B, T, D] -> [B, T, D].  Weights: the four D x D projections, nothing else.
    """

    segmented_prefill = True

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1, window_size: int = 128, *,
                 rope: bool = True, rope_base: float = 10000.0, bias: bool = False):
        super().__init__(hidden_dim, num_heads, dropout, bias=bias, rope=rope, rope_base=rope_base)
        self.window_size = _checks.positive_int("window_size", window_size)

    def _new_cache(self, lengths):
        return WindowCache(lengths)

    def _reference(self, x):
        q, k, v = self.qkv(x, 0)
        return self.out(window_attention_reference(q, k, v, self.window_size)[0])

    def _parallel(self, x):
        q, k, v = self.qkv(x, 0)
        return self.out(window_attention(q, k, v, self.window_size))

    def _attention_weights(self, x):
        q, k, v = self.qkv(x, 0)
        return window_attention_reference(q, k, v, self.window_size)[1]

    def _allocate(self, cache: WindowCache, like: torch.Tensor) -> None:
        if cache.k is None:
            B, H, _, d = like.shape
            cache.k = like.new_zeros(B, H, self.window_size, d)
            cache.v = like.new_zeros(B, H, self.window_size, d)

    def _extend(self, x, cache: WindowCache):
        W, T = self.window_size, x.shape[1]
        offset = int(cache.lengths[0])
        q, k, v = self.qkv(x, offset)
        self._allocate(cache, k)
        prev = torch.arange(max(0, offset - W + 1), offset, device=x.device) % W  # slots, oldest first
        keys = torch.cat([cache.k[:, :, prev], k], dim=2)
        values = torch.cat([cache.v[:, :, prev], v], dim=2)
        o = window_attention(q, keys, values, W, offset)
        keep = torch.arange(max(0, T - W), T, device=x.device)
        slots = (offset + keep) % W  # out of place: the ring keeps the new keys' autograd history
        cache.k = cache.k.index_copy(2, slots, k[:, :, keep])
        cache.v = cache.v.index_copy(2, slots, v[:, :, keep])
        return self.out(o)

    def _step(self, x, valid, cache: WindowCache):
        W = self.window_size
        q, k, v = self.qkv(x[:, None], cache.lengths[:, None])  # [B, H, 1, d]
        self._allocate(cache, k)
        slot = cache.lengths % W
        cache.k = write_slot(cache.k, slot, valid, k[:, :, 0])
        cache.v = write_slot(cache.v, slot, valid, v[:, :, 0])
        filled = (cache.lengths + valid.long()).clamp(max=W)
        idx = torch.arange(W, device=x.device)[None, :]
        # slot 0 stays visible so that an empty, skipped row still gets a finite (unused) output
        allowed = (idx < filled[:, None]) | (idx == 0)
        o = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=allowed[:, None, None, :])
        return self.out(o)[:, 0]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window_size={self.window_size}"
