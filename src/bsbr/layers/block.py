"""The transformer block every model shares: pre-norm attention and pre-norm feed-forward, both residual."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .base import CausalAttention
from .cache import LayerCache


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class FeedForward(nn.Module):
    """Linear(D, ff) -> GELU -> Linear(ff, D) -> dropout."""

    def __init__(self, hidden_dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.fc_in = nn.Linear(hidden_dim, _checks.positive_int("ff_dim", ff_dim))
        self.fc_out = nn.Linear(ff_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(nn.functional.gelu(self.fc_in(x))))


class Block(nn.Module):
    """x + attn(norm1(x)), then + ff(norm2(x)).  Mechanisms that contain their own feed-forward
    (class attribute ``has_feedforward = True``, e.g. GAU) get no separate one."""

    def __init__(self, attention: CausalAttention, ff_dim: int, dropout: float = 0.1, norm: str = "layernorm"):
        super().__init__()
        dim = attention.hidden_dim
        self.norm1 = make_norm(norm, dim)
        self.attn = attention
        if getattr(attention, "has_feedforward", False):
            self.norm2 = self.ff = None
        else:
            self.norm2 = make_norm(norm, dim)
            self.ff = FeedForward(dim, ff_dim, dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """x: [B, T, D]; attention_mask: [B, T] (1 real, 0 padding); cache: this layer's streaming cache."""
        x = x + self.attn(self.norm1(x), attention_mask, cache)
        if self.ff is not None:
            x = x + self.ff(self.norm2(x))
        return x
