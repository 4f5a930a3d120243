"""FLASH mixed chunk attention of the gated attention unit (Hua et al. 2022) as pure tensor functions.

Groups of g tokens; for s <= t, A[t, s] = relu(Q_quad[t] . K_quad[s] / sqrt(s_dim))^2 / g inside t's group and
(Q_lin[t] . K_lin[s]) / (g * group(t)) for s in an earlier group (see :mod:`bsbr.layers.gau` for why these
scales).  :func:`gau_dense` is the reference (the dense [B, T, T] matrix); :func:`gau_mixed` the chunked form
(per-group products plus a running K_lin^T V state), which continues from a state for streaming.
Shapes: qq, kq, lq, lk [B, T, s]; v [B, T, e].  No value reaches a query before it (:mod:`bsbr.ops.nonfinite`):
the masked g x g product multiplied the zero weights of a group's later tokens by their values, so a NaN value at s
made the group's queries before s NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import exclusive_prefix
from .nonfinite import causal_sums, masked_sum, split_nonfinite


def gau_mixed(qq, kq, lq, lk, v, group: int, start: int = 0, state: torch.Tensor | None = None):
    """Mixed chunk attention A V for a segment that begins at absolute position ``start`` (a multiple of g).

    qq, kq, lq, lk: [B, T, s]; v: [B, T, e]; state: [B, s, e] = sum of K_lin^T V over earlier groups, or None.
    Returns (A V [B, T, e], that state after the segment's last complete group [B, s, e]).  The running state is a loop
    of N adds (:func:`~bsbr.ops.linear.exclusive_prefix`), not ``cumsum`` (slow over a non-inner dimension).

    Non-finite values: the group sums K_lin^T V see every value, so a finite final state says every value is finite
    (no extra pass); otherwise the in-group product runs on v's finite part and each query adds the non-finite values
    up to itself (:func:`~bsbr.ops.nonfinite.split_nonfinite`).
    """
    B, T, s = qq.shape
    g = group
    N = -(-T // g)
    # tile width: g, or T when the segment fits in one group (a short sequence is not padded up to g: at T = 64,
    # g = 256 padding made every product 4x, 16x for the g x g scores).  The scale stays 1 / g either way.
    w = g if N > 1 else T
    pad = N * w - T
    qq, kq, lq, lk, v = (F.pad(t, (0, 0, 0, pad)).view(B, N, w, -1) for t in (qq, kq, lq, lk, v))
    kv = lk.transpose(-1, -2) @ v  # [B, N, s, e]
    before, total = exclusive_prefix(kv[:, None], None if state is None else state[:, None])
    before, total = before[:, 0], total[:, 0]  # [B, N, s, e] state at each group's start, [B, s, e] at the end
    bad = None
    if not bool(torch.isfinite(total).all()):  # a non-finite value, key or start state (or an overflow)
        v, bad = split_nonfinite(v)
    scores = (qq @ kq.transpose(-1, -2)) * s**-0.5
    causal = torch.ones(w, w, dtype=torch.bool, device=qq.device).tril()
    local = (F.relu(scores).square() / g).masked_fill(~causal, 0.0) @ v
    count = (start + g * torch.arange(N, device=qq.device)).clamp(min=1).to(qq.dtype)
    glob = (lq @ before) / count[None, :, None, None]
    out = (local + glob).flatten(1, 2)
    if bad is not None:
        out = out + causal_sums(bad.flatten(1, 2), N * w)
    complete = T // g
    return out[:, :T], total if complete == N else before[:, complete]


def gau_dense(qq, kq, lq, lk, v, group: int):
    """Reference: the dense [B, T, T] matrix A of the module docstring, and A V."""
    T, s = qq.shape[1], qq.shape[2]
    pos = torch.arange(T, device=qq.device)
    grp = pos // group
    causal = pos[None, :] <= pos[:, None]
    same = (grp[None, :] == grp[:, None]) & causal
    earlier = grp[None, :] < grp[:, None]
    quad = F.relu((qq @ kq.transpose(-1, -2)) * s**-0.5).square() / group
    lin = (lq @ lk.transpose(-1, -2)) / (group * grp).clamp(min=1).to(qq.dtype)[:, None]
    A = quad.masked_fill(~same, 0.0) + lin.masked_fill(~earlier, 0.0)
    return masked_sum(A, v, causal), A


