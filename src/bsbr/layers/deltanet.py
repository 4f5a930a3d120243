"""DeltaNet: the layer that owns the weights (q/k/v/out and beta projections) and picks the form.

The mechanism itself (delta rule, chunkwise WY/UT form, the token recurrence) is in :mod:`bsbr.ops.deltanet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..ops.deltanet import delta_chunkwise, delta_recurrent
from ..ops.linear import work_dtype
from .cache import LayerCache
from .qkv import QKVAttention


@dataclass
class DeltaCache(LayerCache):
    """The fast-weight state per row and head, [B, H, d, d]."""

    state: torch.Tensor | None = None


class DeltaNetAttention(QKVAttention):
    """DeltaNet (delta-rule linear attention).

    Args:
        hidden_dim, num_heads, dropout: as for every mechanism.
        chunk_size: tokens per chunk of the parallel form (a speed knob only).
        rope: rotary positions on q and k (off by default, as in the paper; rotation keeps the unit norm).
        rope_base, bias: see :class:`~bsbr.layers.qkv.QKVAttention`.

    Shapes: hidden_states [B, T, D] -> [B, T, D].  Weights: the four D x D projections and ``beta_proj``
    (D -> H, with bias).
    """

    segmented_prefill = True

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1, chunk_size: int = 64, *,
                 rope: bool = False, rope_base: float = 10000.0, bias: bool = False):
        super().__init__(hidden_dim, num_heads, dropout, bias=bias, rope=rope, rope_base=rope_base)
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size)
        self.beta_proj = nn.Linear(hidden_dim, num_heads)

    def _inputs(self, x: torch.Tensor, offset):
        """q, k (unit norm), v: [B, H, T, d]; beta [B, H, T]; all in the working dtype."""
        q, k, v = self.qkv(x, offset if isinstance(offset, int) else offset + torch.arange(x.shape[1], device=x.device))
        w = work_dtype(x.dtype)
        q, k = q.to(w), k.to(w)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        else:  # no autograd: q and k are this call's own tensors, normalised in place (as F.normalize does)
            q, k = (t.div_(t.norm(dim=-1, keepdim=True).clamp_min_(1e-12)) for t in (q, k))
        beta = torch.sigmoid(self.beta_proj(x).to(w)).transpose(1, 2)
        return q, k, v.to(w), beta

    def _new_cache(self, lengths):
        return DeltaCache(lengths)

    def _reference(self, x):
        o, _ = delta_recurrent(*self._inputs(x, 0))
        return self.out(o.to(x.dtype))

    def _parallel(self, x):
        o, _ = delta_chunkwise(*self._inputs(x, 0), self.chunk_size)
        return self.out(o.to(x.dtype))

    def _attention_weights(self, x):
        """o_t = sum_s w[t, s] v_s with w = tril(Q K^T) (I + tril(diag(beta) K K^T, -1))^-1 diag(beta)."""
        q, k, _, beta = self._inputs(x, 0)
        T = x.shape[1]
        eye = torch.eye(T, dtype=q.dtype, device=q.device)
        system = eye + (beta[..., None] * (k @ k.transpose(-1, -2))).tril(-1)
        solve = torch.linalg.solve_triangular(system, torch.diag_embed(beta), upper=False, unitriangular=True)
        return ((q @ k.transpose(-1, -2)).tril() @ solve).to(x.dtype)

    def _extend(self, x, cache: DeltaCache):
        o, state = delta_chunkwise(*self._inputs(x, cache.lengths[:, None]), self.chunk_size, cache.state)
        cache.state = state
        return self.out(o.to(x.dtype))

    def _step(self, x, valid, cache: DeltaCache):
        q, k, v, beta = self._inputs(x[:, None], cache.lengths[:, None])
        if cache.state is None:
            cache.state = q.new_zeros(*q.shape[:2], k.shape[-1], v.shape[-1])
        o, state = delta_recurrent(q, k, v, beta, cache.state)
        cache.state = torch.where(valid[:, None, None, None], state, cache.state)
        return self.out(o.to(x.dtype))[:, 0]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}"
