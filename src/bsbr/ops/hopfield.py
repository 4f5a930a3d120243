"""The Hopfield association softmax(beta xi K^T + causal mask) V (Ramsauer et al. 2020) as pure tensor functions.

:func:`association_reference` writes the masked softmax out; :func:`association` runs it through
``scaled_dot_product_attention`` with scale beta.  Shapes: q [B, H, Tq, d]; k, v [B, H, offset + Tq, .].
Neither lets a key or value reach a query that may not see it (see :mod:`bsbr.ops.softmax`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nonfinite import masked_sum
from .softmax import causal_mask, softmax_attention


def association_reference(q, k, v, beta: float, offset: int = 0):
    """softmax(beta q k^T) v under the causal mask, explicitly.  q [B, H, Tq, d]; k, v [B, H, offset + Tq, .].

    Returns (out [B, H, Tq, .], weights [B, H, Tq, Tk]); the weighted sum runs over each query's own keys only.
    """
    scores = beta * (q @ k.transpose(-1, -2))
    allowed = causal_mask(q.shape[2], k.shape[2], offset, q.device)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return masked_sum(weights, v, allowed), weights


def association(q, k, v, beta: float, offset: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Same as :func:`association_reference` through ``scaled_dot_product_attention``
    (:func:`~bsbr.ops.softmax.softmax_attention` with scale beta, which keeps non-finite keys and values from the
    queries that may not see them).  ``attn_mask`` overrides the causal mask; the keys it hides must hold finite
    keys and values (a streaming cache's unfilled slots hold zeros), because the kernel adds -inf to their scores and
    multiplies their zero weights by their values.
    """
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=beta)
    return softmax_attention(q, k, v, offset, scale=beta)
