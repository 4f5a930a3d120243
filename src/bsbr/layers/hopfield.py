"""The Hopfield layer of Ramsauer et al. (2020), "Hopfield Networks is All You Need", as causal self-attention.

Per head, with stored patterns Y and state patterns R both the layer input x:

    K = LN_stored(x) W_K      xi_0 = LN_state(x) W_Q      V = LN_proj(x) W_V
    xi_{n+1} = softmax(beta xi_n K^T + mask) K          (``update_steps`` times: retrieval in key space)
    o = softmax(beta xi_N K^T + mask) V

with inverse temperature beta (default 1/sqrt(d)) and the causal association mask (state pattern t may only
retrieve stored patterns s <= t).  With zero update steps and no layer norms this is softmax attention.
Parallel form: one ``scaled_dot_product_attention`` per step; reference: explicit masked softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _checks
from ..ops.hopfield import association, association_reference
from ..ops.rope import apply_rope
from .cache import GrowableBuffer, LayerCache
from .qkv import QKVAttention, split_heads


@dataclass
class HopfieldCache(LayerCache):
    """Stored patterns (keys) and pattern projections (values) of every absorbed token, [B, H, capacity, d]."""

    k: GrowableBuffer = field(default_factory=GrowableBuffer)
    v: GrowableBuffer = field(default_factory=GrowableBuffer)


class HopfieldAttention(QKVAttention):
    """Causal Hopfield layer.

    Args:
        hidden_dim, num_heads, dropout: as for every mechanism.
        update_steps: state-pattern updates before the final association (0 = one association = attention).
        beta: inverse temperature; None means 1/sqrt(head_dim).
        normalize: layer norms on the stored, state and projection patterns before their projections.
        rope: rotary positions on state and stored patterns (off by default: the paper has none).
        rope_base, bias: see :class:`~bsbr.layers.qkv.QKVAttention`.

    Shapes: hidden_states [B, T, D] -> [B, T, D].  Weights: the four D x D projections and, with
    ``normalize``, three LayerNorm(D).
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1, update_steps: int = 1,
                 beta: float | None = None, normalize: bool = True, *, rope: bool = False,
                 rope_base: float = 10000.0, bias: bool = False):
        super().__init__(hidden_dim, num_heads, dropout, bias=bias, rope=rope, rope_base=rope_base)
        self.update_steps = _checks.non_negative_int("update_steps", update_steps)
        if beta is None:
            beta = self.head_dim ** -0.5
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a positive number or None (1/sqrt(head_dim)), got {beta!r}")
        self.beta = float(beta)
        self.normalize = bool(normalize)
        if self.normalize:
            self.norm_stored = nn.LayerNorm(hidden_dim)
            self.norm_state = nn.LayerNorm(hidden_dim)
            self.norm_proj = nn.LayerNorm(hidden_dim)

    def qkv(self, x, positions):
        """State patterns xi_0 (as q), stored patterns K, projections V: [B, H, T, d]."""
        if self.normalize:
            xq, xk, xv = self.norm_state(x), self.norm_stored(x), self.norm_proj(x)
        else:
            xq = xk = xv = x
        q = split_heads(self.q_proj(xq), self.num_heads)
        k = split_heads(self.k_proj(xk), self.num_heads)
        v = split_heads(self.v_proj(xv), self.num_heads)
        if self.rope:
            q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        return q, k, v

    def _new_cache(self, lengths):
        return HopfieldCache(lengths)

    def _reference_parts(self, x):
        q, k, v = self.qkv(x, 0)
        for _ in range(self.update_steps):
            q = association_reference(q, k, k, self.beta)[0]
        return association_reference(q, k, v, self.beta)

    def _reference(self, x):
        return self.out(self._reference_parts(x)[0])

    def _attention_weights(self, x):
        return self._reference_parts(x)[1]

    def _parallel(self, x):
        q, k, v = self.qkv(x, 0)
        for _ in range(self.update_steps):
            q = association(q, k, k, self.beta)
        return self.out(association(q, k, v, self.beta))

    def _extend(self, x, cache: HopfieldCache):
        offset = int(cache.lengths[0])
        q, k, v = self.qkv(x, offset)
        cache.k.append(k)
        cache.v.append(v)
        keys, values = cache.k.view(), cache.v.view()
        for _ in range(self.update_steps):
            q = association(q, keys, keys, self.beta, offset)
        return self.out(association(q, keys, values, self.beta, offset))

    def _step(self, x, valid, cache: HopfieldCache):
        q, k, v = self.qkv(x[:, None], cache.lengths[:, None])
        cache.k.append_rows(k[:, :, 0], valid)
        cache.v.append_rows(v[:, :, 0], valid)
        keys, values = cache.k.view(), cache.v.view()
        idx = torch.arange(keys.shape[2], device=x.device)
        # slot 0 stays visible so that an empty, skipped row still gets a finite (unused) output
        allowed = ((idx[None, :] < cache.k.filled[:, None]) | (idx[None, :] == 0))[:, None, None, :]
        for _ in range(self.update_steps):
            q = association(q, keys, keys, self.beta, attn_mask=allowed)
        return self.out(association(q, keys, values, self.beta, attn_mask=allowed))[:, 0]

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", update_steps={self.update_steps}, beta={self.beta:.4g}, "
                                       f"normalize={self.normalize}")
