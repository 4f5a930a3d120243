"""Causal softmax attention: the reference form and the fused form.  Shapes: q, k, v [B, H, T, d]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0):
    """Explicit masked softmax.  Query i (absolute position offset + i) sees keys 0 .. offset + i.

    q: [B, H, Tq, d]; k, v: [B, H, Tk, d] with Tk = offset + Tq.  Returns ([B, H, Tq, d], weights [B, H, Tq, Tk]).
    """
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = torch.arange(tk, device=q.device)[None, :] <= offset + torch.arange(tq, device=q.device)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Same as :func:`softmax_attention_reference` through ``scaled_dot_product_attention`` (fused kernel)."""
    if offset == 0 and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    tq, tk = q.shape[-2], k.shape[-2]
    allowed = torch.arange(tk, device=q.device)[None, :] <= offset + torch.arange(tq, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
