"""The transformer block every model shares: pre-norm attention and pre-norm feed-forward, both residual."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from .base import CausalAttention
from .cache import LayerCache
from .qkv import blocked, linear_into, no_graph, row_blocks


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

    def residual(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x + forward(norm(x)).  Without autograd on CPU (and without dropout) long inputs go in row blocks through
        one bounded [rows, ff] workspace, the GELU in place and the residual added by the second product, so the
        [T, ff] hidden layer is never made whole (see :mod:`bsbr.layers.qkv` for why)."""
        rows = blocked(x, self.fc_in.out_features, self.fc_in.weight, self.fc_out.weight)
        if rows:  # the norm's weights are looked at only for long inputs: short ones skip the Python work
            norm_params = tuple(norm.parameters())
            if not no_graph(*norm_params) or any(p.dtype != x.dtype for p in norm_params):
                rows = 0
        if not rows or (self.training and self.dropout.p > 0):
            return x + self(norm(x))
        B, T, _ = x.shape
        y = torch.empty_like(x)
        work = x.new_empty(rows, self.fc_in.out_features)
        for b, t0, t1 in row_blocks(B, T, rows):
            h = torch.ops.aten.gelu_(linear_into(norm(x[b, t0:t1]), self.fc_in, work[: t1 - t0]))
            out = torch.addmm(x[b, t0:t1], h, self.fc_out.weight.t(), out=y[b, t0:t1])
            if self.fc_out.bias is not None:
                out.add_(self.fc_out.bias)
        return y


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
        a = self.attn(self.norm1(x), attention_mask, cache)
        # no autograd: the attention's output is a fresh tensor, and the residual goes into it
        fresh = no_graph(x, a) and a.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        x = a.add_(x) if fresh else x + a
        if self.ff is not None:
            x = self.ff.residual(self.norm2, x)
        return x
