"""Gated Attention Unit with FLASH mixed chunk attention (Hua et al. 2022, "Transformer Quality in Linear Time").

One GAU replaces the attention + feed-forward pair (``has_feedforward = True``: the block adds no FFN):

    U = SiLU(x W_u), V = SiLU(x W_v)            [T, e]   (e = expansion_dim, 2 D by default)
    Z = SiLU(x W_z)                             [T, s]   (s = qk_dim, 128 by default; single head)
    Q_quad, K_quad, Q_lin, K_lin = Z * gamma_i + beta_i   (per-dimension scale and offset), rotary positions
    out = (U * (A V)) W_o

FLASH's causal mixed chunk attention splits the sequence into groups of g tokens (counted from the row's
first token).  A[t, s] for s <= t is

    relu(Q_quad[t] . K_quad[s] / sqrt(s_dim))^2 / g           if s is in t's group   (quadratic, local)
    (Q_lin[t] . K_lin[s]) / (g * group(t))                    if s is in an earlier group (linear, global)

Scaling: the paper divides relu^2 scores by the sequence length n.  For a causal model n would make a token's
output depend on how many tokens follow it (breaking causality and streaming), so the local part divides by the
fixed group size g and the global part by the number of earlier-group tokens, g * group(t): both are averages
over a causal, length-independent count.  The 1/sqrt(s) inside relu keeps scores O(1) at any qk_dim, as in
softmax attention.  With group_size >= T the whole sequence is one group: plain quadratic GAU.

Parallel form: per-group g x g products plus a cumulative sum of per-group K_lin^T V states — O(T g + T s e).
Reference: the dense T x T matrix A above with its causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..ops.gau import gau_dense, gau_mixed
from ..ops.linear import work_dtype
from ..ops.rope import rope_cos_sin, split_heads_rotary
from .base import CausalAttention
from .cache import LayerCache, write_slot


@dataclass
class GAUCache(LayerCache):
    """state [B, s, e]: sum of K_lin^T V over completed groups; buf_kq, buf_lk [B, g, s], buf_v [B, g, e]: the
    open group's tokens (slot = position mod g)."""

    state: torch.Tensor | None = None
    buf_kq: torch.Tensor | None = None
    buf_lk: torch.Tensor | None = None
    buf_v: torch.Tensor | None = None


class GAUAttention(CausalAttention):
    """Gated attention unit (attention and feed-forward in one), single-headed, FLASH mixed chunk attention.

    Args:
        hidden_dim: model width D.  num_heads: checked to divide D (the common interface) but unused: GAU
            has a single head of size qk_dim.  dropout: on the unit's output.
        group_size: g, tokens per group of the mixed chunk attention (256 in the paper).
        qk_dim: s, the shared Q/K dimension (128 in the paper); even when rope is on.
        expansion_dim: e, width of U and V; None means 2 * hidden_dim (the paper's choice).
        rope, rope_base: rotary positions on the four Q/K views.
        qk_scale_init: standard deviation of the per-dimension scales gamma that make the four Q/K views from Z
            (offsets start at 0).  The default 0.02 is the common implementations' initialisation; with it the
            relu^2 attention starts almost silent (relu^2 of a product is fourth order in gamma: row sums of A
            ~1e-10 at hidden 128), which a short training budget may never leave: on MQAR at T = 64 (batch 32,
            4,000 steps) test accuracy was 0.029 at 0.02 and 0.979 at 0.5; at 1,500 steps 0.021 and 0.151
            (docs/experiments-archive.md, tags small and gau_init_*).

    Shapes: hidden_states [B, T, D] -> [B, T, D].  Weights: uv_proj (D -> 2e), z_proj (D -> s), gamma and
    beta (4 x s), out_proj (e -> D); the block's ff_dim is not used.
    """

    segmented_prefill = True

    has_feedforward = True

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1, group_size: int = 256,
                 qk_dim: int = 128, expansion_dim: int | None = None, *, rope: bool = True,
                 rope_base: float = 10000.0, qk_scale_init: float = 0.02):
        super().__init__(hidden_dim, num_heads, dropout)
        self.group_size = _checks.positive_int("group_size", group_size)
        self.qk_dim = _checks.positive_int("qk_dim", qk_dim)
        self.expansion_dim = _checks.positive_int("expansion_dim", 2 * hidden_dim if expansion_dim is None
                                                  else expansion_dim)
        if rope and qk_dim % 2:
            raise ValueError(f"rope=True needs an even qk_dim, got qk_dim={qk_dim}")
        if not rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {rope_base}")
        self.rope, self.rope_base = bool(rope), float(rope_base)
        self.uv_proj = nn.Linear(hidden_dim, 2 * self.expansion_dim)
        self.z_proj = nn.Linear(hidden_dim, qk_dim)
        if isinstance(qk_scale_init, bool) or not isinstance(qk_scale_init, (int, float)) or not qk_scale_init > 0:
            raise ValueError(f"qk_scale_init must be a positive number, got {qk_scale_init!r}")
        self.qk_scale_init = float(qk_scale_init)
        self.gamma = nn.Parameter(self.qk_scale_init * torch.randn(4, qk_dim))
        self.beta = nn.Parameter(torch.zeros(4, qk_dim))
        self.out_proj = nn.Linear(self.expansion_dim, hidden_dim)

    def _project(self, x: torch.Tensor, positions: torch.Tensor | int):
        """u, v [B, T, e]; qq, kq, lq, lk [B, T, s] (rotated), in the working dtype."""
        w = work_dtype(x.dtype)
        inplace = not torch.is_grad_enabled()  # no graph recorded: the projections' outputs are ours to overwrite
        u, v = F.silu(self.uv_proj(x), inplace=inplace).to(w).chunk(2, dim=-1)
        z = F.silu(self.z_proj(x), inplace=inplace).to(w)
        views = torch.addcmul(self.beta.to(w), z[:, :, None, :], self.gamma.to(w))  # [B, T, 4, s]
        B, T = views.shape[:2]
        cos = sin = None
        if self.rope:
            cos, sin = rope_cos_sin(positions, T, self.qk_dim, self.rope_base, w, x.device)
        # the four views as contiguous [B, 4, T, s], rotated in the same pass
        views = split_heads_rotary(views.view(B, T, 4 * self.qk_dim), 4, cos, sin)
        qq, kq, lq, lk = views.unbind(dim=1)
        return u, v, qq, kq, lq, lk

    def _finish(self, u, av, dtype):
        return self.out_proj((u * av).to(dtype))

    def _new_cache(self, lengths):
        return GAUCache(lengths)

    def _reference(self, x):
        u, v, qq, kq, lq, lk = self._project(x, 0)
        return self._finish(u, gau_dense(qq, kq, lq, lk, v, self.group_size)[0], x.dtype)

    def _attention_weights(self, x):
        _, v, qq, kq, lq, lk = self._project(x, 0)
        return gau_dense(qq, kq, lq, lk, v, self.group_size)[1][:, None].to(x.dtype)  # [B, 1, T, T]

    def _parallel(self, x):
        u, v, qq, kq, lq, lk = self._project(x, 0)
        return self._finish(u, gau_mixed(qq, kq, lq, lk, v, self.group_size)[0], x.dtype)

    def _extend(self, x, cache: GAUCache):
        g, T = self.group_size, x.shape[1]
        offset = int(cache.lengths[0])
        u, v, qq, kq, lq, lk = self._project(x, offset)
        self._allocate(cache, v, qq)
        r = offset % g  # tokens of the open group already seen: the segment restarts at its first token
        seg = [torch.cat([buf[:, :r], new], dim=1) for buf, new in
               ((torch.zeros_like(cache.buf_kq), qq), (cache.buf_kq, kq), (torch.zeros_like(cache.buf_lk), lq),
                (cache.buf_lk, lk), (cache.buf_v, v))]
        av, state = gau_mixed(*seg, g, offset - r, cache.state)
        complete, rest = divmod(r + T, g)
        if complete:
            cache.state = state
        for name, full in (("buf_kq", seg[1]), ("buf_lk", seg[3]), ("buf_v", seg[4])):
            # out of place (g rows, cheap): the open group keeps its autograd history
            old = getattr(cache, name)
            setattr(cache, name, torch.cat([full[:, complete * g:], old[:, rest:]], dim=1))
        return self._finish(u, av[:, r:], x.dtype)

    def _step(self, x, valid, cache: GAUCache):
        g = self.group_size
        u, v, qq, kq, lq, lk = (t[:, 0] for t in self._project(x[:, None], cache.lengths[:, None]))
        self._allocate(cache, v[:, None], qq[:, None])
        slot = cache.lengths % g
        cache.buf_kq = write_slot(cache.buf_kq[:, None], slot, valid, kq[:, None])[:, 0]
        cache.buf_lk = write_slot(cache.buf_lk[:, None], slot, valid, lk[:, None])[:, 0]
        cache.buf_v = write_slot(cache.buf_v[:, None], slot, valid, v[:, None])[:, 0]
        scores = (cache.buf_kq @ qq[:, :, None])[..., 0] * self.qk_dim**-0.5  # [B, g]
        seen = torch.arange(g, device=x.device)[None, :] <= slot[:, None]
        weights = (F.relu(scores).square() / g).masked_fill(~seen, 0.0)
        local = (weights[:, None, :] @ cache.buf_v)[:, 0]
        count = (cache.lengths - slot).clamp(min=1).to(v.dtype)
        glob = (lq[:, None, :] @ cache.state)[:, 0] / count[:, None]
        done = valid & (slot == g - 1)  # this token closes its group: fold the group into the state
        if bool(done.any()):
            closed = cache.buf_lk.transpose(-1, -2) @ cache.buf_v
            cache.state = torch.where(done[:, None, None], cache.state + closed, cache.state)
        return self._finish(u, local + glob, x.dtype)

    def _allocate(self, cache: GAUCache, v: torch.Tensor, q: torch.Tensor) -> None:
        if cache.buf_kq is None:
            B, g = v.shape[0], self.group_size
            cache.buf_kq = q.new_zeros(B, g, self.qk_dim)
            cache.buf_lk = q.new_zeros(B, g, self.qk_dim)
            cache.buf_v = v.new_zeros(B, g, self.expansion_dim)
            cache.state = v.new_zeros(B, self.qk_dim, self.expansion_dim)

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, group_size={self.group_size}, qk_dim={self.qk_dim}, "
                f"expansion_dim={self.expansion_dim}, rope={self.rope}, qk_scale_init={self.qk_scale_init:g}")
