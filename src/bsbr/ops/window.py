"""Sliding-window causal softmax attention as pure tensor functions.

Query t sees keys s with t - W < s <= t.  :func:`window_attention_reference` is a dense banded mask;
:func:`window_attention` cuts the queries into blocks of W, each attending to the keys of its own and the
previous block (2W keys) through one batched product and softmax with one band mask — O(T W d), never a T x T
matrix.  Shapes: q [B, H, T, d]; k, v [B, H, n_prev + T, d].  Neither lets a value reach a query outside whose
window it is (:mod:`bsbr.ops.nonfinite`): the blocked product multiplies the zero weights of the block's later keys
and of keys that left the window by their values, so a NaN value at s made queries before s (and past s + W) NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nonfinite import masked_sum, split_nonfinite, window_sums
from .softmax import softmax_attention


def band_mask(tq: int, tk: int, window: int, offset: int, device) -> torch.Tensor:
    """[tq, tk] bool: query i (position offset + i) may see key j iff offset + i - window < j <= offset + i."""
    i = offset + torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return (j <= i) & (j > i - window)


def window_attention_reference(q, k, v, window: int, offset: int = 0):
    """Dense banded softmax.  q [B, H, Tq, d]; k, v [B, H, offset + Tq, d].  Returns (o, weights [.., Tq, Tk]);
    the weighted sum runs over each query's own window only (:func:`~bsbr.ops.nonfinite.masked_sum`)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    allowed = band_mask(q.shape[2], k.shape[2], window, offset, q.device)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return masked_sum(weights, v, allowed), weights


def window_attention(q, k, v, window: int, offset: int = 0) -> torch.Tensor:
    """Blocked banded softmax, same result as :func:`window_attention_reference`.

    q: [B, H, T, d]; k, v: [B, H, n_prev + T, d] where the first n_prev = min(offset, window - 1) keys are
    the tokens just before q (only those can be in any query's window).  Returns [B, H, T, d].

    With a non-finite value the blocked products run on v's finite part and each query adds the non-finite values
    in its window (:func:`~bsbr.ops.nonfinite.window_sums`); finite v costs one summing pass.  Non-finite keys need
    nothing: the band mask overwrites the scores of the keys outside a query's window.
    """
    B, H, T, d = q.shape
    n_prev = k.shape[2] - T
    W = window
    if n_prev == 0 and T <= W:  # every window reaches back to the first token: plain causal attention
        return softmax_attention(q, k, v)
    v, bad = split_nonfinite(v)
    N = -(-T // W)
    pad_q = N * W - T
    qb = F.pad(q, (0, 0, 0, pad_q)).view(B, H, N, W, d)
    # keys laid out so that block n's queries find their window in padded keys [n W, n W + 2 W)
    kp = F.pad(k, (0, 0, W - n_prev, pad_q))
    vp = F.pad(v, (0, 0, W - n_prev, pad_q))
    kb = kp.unfold(2, 2 * W, W).transpose(-1, -2)  # [B, H, N, 2W, d]
    vb = vp.unfold(2, 2 * W, W).transpose(-1, -2)
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    band = (j > i) & (j <= i + W)  # key j of the block is the token i + W - j steps before the query
    real = torch.arange(N, device=q.device)[:, None, None] * W + j[None] >= W - n_prev  # not front padding
    # written out rather than SDPA with a boolean mask (its CPU fallback materialises an additive mask: ~25% slower)
    scores = (qb * d**-0.5) @ kb.transpose(-1, -2)  # [B, H, N, W, 2W]
    weights = scores.masked_fill_(~(band[None] & real), float("-inf")).softmax(dim=-1)
    o = (weights @ vb).flatten(2, 3)[:, :, :T]
    return o if bad is None else o + window_sums(bad, W, T)


