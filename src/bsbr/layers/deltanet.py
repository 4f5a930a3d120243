"""DeltaNet: linear attention with the delta rule (Schlag et al. 2021), chunkwise form of Yang et al. (2024).

Per head, with L2-normalised q_t, k_t and a learned write strength beta_t = sigmoid(w_beta . x_t) in (0, 1):

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T          o_t = S_t^T q_t          (S: [d, d])

Each write replaces a beta-fraction of what the state recalled for k_t by v_t.  Chunkwise form: in a chunk of
C tokens with start state S0, the writes u_t = beta_t (v_t - S_{t-1}^T k_t) satisfy the unit lower triangular
system (I + tril(diag(beta) K K^T, -1)) U = diag(beta) (V - K S0), so with the WY/UT transform
T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta) (one triangular solve per chunk, all chunks at once):

    W = T K,  U = T V - W S0,   O = Q S0 + tril(Q K^T) U,   S_end = S0 + K^T U

Rearranged so that only S_end = (I - K^T W) S0 + K^T (T V) — one d x d matmul per chunk — runs chunk after
chunk; every other product is batched over all chunks.  T itself comes from one batched triangular solve
(X L = diag(beta), see the code), then W and T V are plain products.
Reference: the token recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .cache import LayerCache
from .common import QKVAttention
from .linear import pad_to_chunks, work_dtype


def delta_chunk_terms(q, k, v, beta, chunk: int):
    """Everything of the chunkwise form that is batched over all chunks (no chunk-to-chunk dependence).

    q, k: [B, H, T, d] (unit norm); v: [B, H, T, e]; beta: [B, H, T].  With M = B H N chunks of C = chunk tokens
    (the last zero-padded) and S_n the state at chunk n's start, O_n = q_eff_n S_n + o_local_n and
    S_{n+1} = decay_n S_n + writes_n.  Returns (q_eff [M, C, d], o_local [M, C, e], decay [B H, N, d, d],
    writes [B H, N, d, e]).
    """
    d, e = k.shape[-1], v.shape[-1]
    qc, kc, vc = (pad_to_chunks(t, chunk) for t in (q, k, v))  # [B, H, N, C, .]
    B, H, N = qc.shape[:3]
    bc = pad_to_chunks(beta[..., None], chunk)  # padded tokens get beta = 0, k = 0: no write
    qc, kc, vc, bc = (t.flatten(0, 2) for t in (qc, kc, vc, bc))  # every chunk of every row and head: [M, C, .]
    # T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta) = diag(beta) L^-1 with L = I + tril(K K^T diag(beta), -1),
    # because (I + tril(diag(beta) K K^T, -1)) diag(beta) = diag(beta) + tril(diag(beta) K K^T diag(beta), -1)
    # = diag(beta) L.  So T solves X L = diag(beta): one batched solve, no separate scaling.  The solve reads only
    # the strict lower triangle of its first argument (unitriangular), so K (beta K)^T is passed as it is.
    # Forming T and then multiplying is faster on CPU than solving against [beta K | beta V] (PyTorch's batched
    # CPU solve is slow; the products are not).
    system = kc @ (bc * kc).mT
    t = torch.linalg.solve_triangular(system, torch.diag_embed(bc[..., 0]), upper=False, left=False,
                                      unitriangular=True)
    w = t @ kc  # W = T K
    u = t @ vc  # U before the start state's correction: T V
    local = (qc @ kc.mT).tril_()
    # O_n = (Q_n - local_n W_n) S_n + local_n U_n and S_{n+1} = (I - K_n^T W_n) S_n + K_n^T U_n
    q_eff = torch.baddbmm(qc, local, w, alpha=-1)
    o_local = local @ u
    eye_d = torch.eye(d, dtype=q.dtype, device=q.device)
    decay = torch.baddbmm(eye_d, kc.mT, w, alpha=-1).view(B * H, N, d, d)
    writes = (kc.mT @ u).view(B * H, N, d, e)
    return q_eff, o_local, decay, writes


def delta_chunkwise(q, k, v, beta, chunk: int, state: torch.Tensor | None = None):
    """q, k: [B, H, T, d] (unit norm); v: [B, H, T, e]; beta: [B, H, T]; state: [B, H, d, e] or None.

    Returns (o [B, H, T, e], final state [B, H, d, e]).  :func:`delta_chunk_terms` does all but the state
    recursion, which leaves one small matmul per chunk in the loop.
    """
    (B, H, T, d), e = q.shape, v.shape[-1]
    q_eff, o_local, decay, writes = delta_chunk_terms(q, k, v, beta, chunk)
    S = q.new_zeros(B * H, d, e) if state is None else state.flatten(0, 1)
    starts = []
    for n in range(decay.shape[1]):
        starts.append(S)
        S = torch.baddbmm(writes[:, n], decay[:, n], S)
    starts = torch.stack(starts, dim=1).flatten(0, 1)  # [M, d, e]
    o = torch.baddbmm(o_local, q_eff, starts).view(B, H, -1, e)[:, :, :T]
    return o, S.view(B, H, d, e)


def delta_recurrent(q, k, v, beta, state: torch.Tensor | None = None):
    """The token recurrence (reference).  Same arguments and result as :func:`delta_chunkwise`."""
    S = q.new_zeros(*q.shape[:2], k.shape[-1], v.shape[-1]) if state is None else state
    outs = []
    for t in range(q.shape[2]):
        kt = k[:, :, t]
        recalled = (kt[:, :, None, :] @ S)[:, :, 0]  # S^T k_t: [B, H, e]
        write = beta[:, :, t, None] * (v[:, :, t] - recalled)
        S = S + kt[..., :, None] * write[..., None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=2), S


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
        rope_base, bias: see :class:`~bsbr.layers.common.QKVAttention`.

    Shapes: hidden_states [B, T, D] -> [B, T, D].  Weights: the four D x D projections and ``beta_proj``
    (D -> H, with bias).
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1, chunk_size: int = 64, *,
                 rope: bool = False, rope_base: float = 10000.0, bias: bool = False):
        super().__init__(hidden_dim, num_heads, dropout, bias=bias, rope=rope, rope_base=rope_base)
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size)
        self.beta_proj = nn.Linear(hidden_dim, num_heads)

    def _inputs(self, x: torch.Tensor, offset):
        """q, k (unit norm), v: [B, H, T, d]; beta [B, H, T]; all in the working dtype."""
        q, k, v = self.qkv(x, offset + torch.arange(x.shape[1], device=x.device))
        w = work_dtype(x.dtype)
        q, k = F.normalize(q.to(w), dim=-1), F.normalize(k.to(w), dim=-1)
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
