"""Causal softmax attention: the reference form and the fused form.  Shapes: q, k, v [B, H, T, d].

Neither lets a key or value reach a query that may not see it (:mod:`bsbr.ops.nonfinite`): SDPA's fused kernel
multiplies the zero probabilities of later keys inside a tile by their values, and with an explicit mask it adds -inf
to the scores of hidden keys (NaN + -inf = NaN), so a NaN at position s made queries before s NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nonfinite import causal_sums, has_nonfinite, masked_sum, split_nonfinite, split_nonfinite_keys


def causal_mask(tq: int, tk: int, offset: int, device) -> torch.Tensor:
    """[tq, tk] bool: query i (position offset + i) may see key j iff j <= offset + i."""
    return torch.arange(tk, device=device)[None, :] <= offset + torch.arange(tq, device=device)[:, None]


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0):
    """Explicit masked softmax.  Query i (absolute position offset + i) sees keys 0 .. offset + i.

    q: [B, H, Tq, d]; k, v: [B, H, Tk, d] with Tk = offset + Tq.  Returns ([B, H, Tq, d], weights [B, H, Tq, Tk]).
    The weighted sum runs over each query's own keys only (:func:`~bsbr.ops.nonfinite.masked_sum`).
    """
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = causal_mask(q.shape[-2], k.shape[-2], offset, q.device)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return masked_sum(weights, v, allowed), weights


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0,
                      scale: float | None = None) -> torch.Tensor:
    """Same as :func:`softmax_attention_reference` through ``scaled_dot_product_attention`` (fused kernel);
    ``scale`` as SDPA's (None: 1/sqrt(d)).  Tk = offset + Tq.

    A finite result is exact: a key or value that reached a query through a zero weight or a -inf mask would have
    made it NaN.  So the result is checked (one summing pass); when it is not finite the kernel runs again on the
    finite parts of k and v, and each query adds the non-finite values it sees and a NaN for each non-finite key it
    sees (:func:`~bsbr.ops.nonfinite.split_nonfinite`, :func:`~bsbr.ops.nonfinite.split_nonfinite_keys`).
    """
    o = _sdpa(q, k, v, offset, scale)
    if not has_nonfinite(o):
        return o
    k, bad_k = split_nonfinite_keys(k)
    v, bad_v = split_nonfinite(v)
    if bad_k is None and bad_v is None:  # non-finite queries (or an overflow) reach only their own outputs
        return o
    o = _sdpa(q, k, v, offset, scale)
    tq = q.shape[-2]
    if bad_v is not None:
        o = o + causal_sums(bad_v, tq)
    if bad_k is not None:
        o = o + causal_sums(bad_k, tq)
    return o


def _sdpa(q, k, v, offset: int, scale: float | None) -> torch.Tensor:
    tq, tk = q.shape[-2], k.shape[-2]
    if offset == 0 and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, offset, q.device), scale=scale)
