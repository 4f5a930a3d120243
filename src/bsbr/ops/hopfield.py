"""The Hopfield association softmax(beta xi K^T + causal mask) V (Ramsauer et al. 2020) as pure tensor functions.

:func:`association_reference` writes the masked softmax out; :func:`association` runs it through
``scaled_dot_product_attention`` with scale beta.  Shapes: q [B, H, Tq, d]; k, v [B, H, offset + Tq, .].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def association_reference(q, k, v, beta: float, offset: int = 0):
    """softmax(beta q k^T) v under the causal mask, explicitly.  q [B, H, Tq, d]; k, v [B, H, offset + Tq, .].

    Returns (out [B, H, Tq, .], weights [B, H, Tq, Tk]).
    """
    scores = beta * (q @ k.transpose(-1, -2))
    tq, tk = q.shape[2], k.shape[2]
    allowed = torch.arange(tk, device=q.device)[None, :] <= offset + torch.arange(tq, device=q.device)[:, None]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return weights @ v, weights


def association(q, k, v, beta: float, offset: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Same as :func:`association_reference` through ``scaled_dot_product_attention``; ``attn_mask`` overrides."""
    if attn_mask is None:
        if offset == 0 and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=beta)
        tq, tk = q.shape[2], k.shape[2]
        attn_mask = torch.arange(tk, device=q.device)[None, :] <= offset + torch.arange(tq, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=beta)


