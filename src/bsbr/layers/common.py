"""Pieces shared by the attention layers: head splitting and q/k/v/out projections with rotary positions."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.rope import apply_rope
from .base import CausalAttention


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*d] -> contiguous [B, H, T, d]."""
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2).contiguous()


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] -> [B, T, H*d]."""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


class QKVAttention(CausalAttention):
    """Base for mechanisms with the usual ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (nn.Linear).

    Keeping these four names lets weights map one-to-one between mechanisms (and from Hugging Face models).

    Args:
        bias: whether the four projections have a bias.
        rope: apply rotary position embeddings to q and k (positions count from each row's first real token).
        rope_base: the rotary base (10000 as in RoFormer / LLaMA).
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.1, *, bias: bool = False,
                 rope: bool = True, rope_base: float = 10000.0):
        super().__init__(hidden_dim, num_heads, dropout)
        if rope and self.head_dim % 2:
            raise ValueError(f"rope=True needs an even head dimension, got head_dim={self.head_dim}")
        if not rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {rope_base}")
        self.rope = bool(rope)
        self.rope_base = float(rope_base)
        self.q_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x: [B, T, D]; positions: [T] or [B, T].  Returns q, k, v: [B, H, T, d] (q, k rotated if rope)."""
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        if self.rope:
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        return q, k, v

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o: [B, H, T, d] -> out_proj(merged): [B, T, D]."""
        return self.out_proj(merge_heads(o))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rope={self.rope}"

