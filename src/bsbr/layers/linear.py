"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), causal.

With the feature map phi(x) = elu(x) + 1 (positive, so the normaliser never vanishes):

    S_t = sum_{s<=t} phi(k_s) v_s^T      z_t = sum_{s<=t} phi(k_s)      o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t)

Parallel form: chunkwise — inside a chunk of C tokens a masked C x C product, across chunks the running state —
O(T C d + T d^2).  Reference: the token recurrence above, with the normaliser riding along as one extra value
column (v_s -> [v_s, 1]) so that a single state [d, d+1] holds S and z.  Streaming keeps only that state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _checks
from ..ops.linear import linear_chunkwise, linear_recurrent, with_ones, work_dtype
from ..ops.rope import apply_rope
from .cache import LayerCache
from .qkv import QKVAttention


@dataclass
class LinearCache(LayerCache):
    """Running state per row and head: S = [sum phi(k) v^T | sum phi(k)], [B, H, d, d + 1]."""

    state: torch.Tensor | None = None


class LinearAttention(QKVAttention):
    """Causal linear attention with phi = elu + 1.

    Args:
        hidden_dim, num_heads, dropout: as for every mechanism.
        chunk_size: tokens per chunk of the parallel form (a speed knob only: the result does not depend on it).
        rope: rotary positions on q and k after the feature map (off by default: the paper has none).
        rope_base, bias: see :class:`~bsbr.layers.qkv.QKVAttention`.

    Shapes: hidden_states [B, T, D] -> [B, T, D].  Weights: the four D x D projections, nothing else.
    """

    segmented_prefill = True

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1, chunk_size: int = 64, *,
                 rope: bool = False, rope_base: float = 10000.0, bias: bool = False):
        super().__init__(hidden_dim, num_heads, dropout, bias=bias, rope=False, rope_base=rope_base)
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size)
        if rope and self.head_dim % 2:
            raise ValueError(f"rope=True needs an even head dimension, got head_dim={self.head_dim}")
        self.rope_after = bool(rope)

    def _features(self, x: torch.Tensor, offset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k feature-mapped, v; all [B, H, T, .] in the working dtype."""
        positions = offset + torch.arange(x.shape[1], device=x.device)
        q, k, v = self.qkv(x, positions)
        w = work_dtype(x.dtype)
        q, k, v = q.to(w), k.to(w), v.to(w)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            q, k = F.elu(q) + 1, F.elu(k) + 1
        else:  # no autograd: q and k are this call's own tensors, feature-mapped in place
            q, k = F.elu_(q).add_(1), F.elu_(k).add_(1)
        if self.rope_after:
            q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        return q, k, v

    def _finish(self, num: torch.Tensor, den: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.out((num / den[..., None]).to(dtype))

    def _new_cache(self, lengths):
        return LinearCache(lengths)

    def _reference(self, x):
        q, k, v = self._features(x, 0)
        o = linear_recurrent(q, k, with_ones(v))
        return self._finish(o[..., :-1], o[..., -1], x.dtype)

    def _parallel(self, x):
        q, k, v = self._features(x, 0)
        num, den, _ = linear_chunkwise(q, k, v, self.chunk_size)
        return self._finish(num, den, x.dtype)

    def _attention_weights(self, x):
        q, k, _ = self._features(x, 0)
        scores = (q @ k.transpose(-1, -2)).tril()
        return (scores / scores.sum(-1, keepdim=True)).to(x.dtype)

    def _extend(self, x, cache: LinearCache):
        q, k, v = self._features(x, cache.lengths[:, None])
        num, den, cache.state = linear_chunkwise(q, k, v, self.chunk_size, cache.state)
        return self._finish(num, den, x.dtype)

    def _step(self, x, valid, cache: LinearCache):
        q, k, v = self._features(x[:, None], cache.lengths[:, None])  # [B, H, 1, .]
        v = with_ones(v)
        if cache.state is None:
            cache.state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
        new = cache.state + k[:, :, 0, :, None] * v[:, :, 0, None, :]
        cache.state = torch.where(valid[:, None, None, None], new, cache.state)
        o = q @ new
        return self._finish(o[..., :-1], o[..., -1], x.dtype)[:, 0]

    def extra_repr(self) -> str:
        return super().extra_repr().replace("rope=False", f"rope={self.rope_after}") + f", chunk_size={self.chunk_size}"
