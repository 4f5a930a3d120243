"""QKVAttention, the q/k/v/out projections with rotary positions that the attention layers share; head splitting.

Without autograd on CPU, projections of long inputs run in row blocks through one bounded workspace
(:func:`blocked`, :func:`linear_into`): each block is projected into the workspace and split into heads (and
rotated) straight into the result, and the output projection reads the merged heads block by block, so a forward
makes no [T, D] temporaries besides its results.  With glibc's default malloc, tensors above its mmap threshold
(at most 32 MiB) go back to the system when freed and are faulted in again by the next call, a cost that grows
with T; blocks of :data:`BLOCK_BYTES` stay in the heap and are reused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.rope import rope_cos_sin, rotate_into, split_heads_rotary
from .base import CausalAttention


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*d] -> contiguous [B, H, T, d]."""
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2).contiguous()


BLOCK_BYTES = 4 * 2**20
"""Size of the row-block workspaces used without autograd on CPU (see the module docstring)."""


def no_graph(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph would be recorded through ``tensors`` (inference, no_grad, frozen weights)."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def blocked(x: torch.Tensor, width: int, *params: torch.Tensor) -> int:
    """Rows per block for a row-blocked computation on x [B, T, .] whose widest row has ``width`` numbers, or 0
    when the plain (unblocked) form should run: with autograd, off CPU, or when one block holds everything."""
    rows = max(1, BLOCK_BYTES // (width * x.element_size()))
    if x.shape[0] * x.shape[1] <= rows:  # the common short input: decided before the slower checks
        return 0
    if x.device.type != "cpu" or not no_graph(x, *params) or torch.is_autocast_enabled("cpu"):
        return 0
    return 0 if any(p.dtype != x.dtype for p in params) else rows


def row_blocks(B: int, T: int, rows: int):
    """(b, t0, t1) covering [B, T] in blocks of at most ``rows`` tokens of one row."""
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, t0, min(T, t0 + rows)


def linear_into(x: torch.Tensor, layer: nn.Linear, out: torch.Tensor) -> torch.Tensor:
    """out = layer(x) for x [n, D_in] into ``out`` [n, D_out] (no autograd)."""
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


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

    def qkv(self, x: torch.Tensor, positions: torch.Tensor | int):
        """x: [B, T, D]; positions: an int offset (the tokens are at offset .. offset + T - 1) or a tensor [T] or
        [B, T].  Returns q, k, v: [B, H, T, d], contiguous (q, k rotated if rope).

        Three projections (fusing them into one [D, 3D] product was not faster on CPU: the same arithmetic and a
        3x larger output; ``benchmarks/bench_module.py`` times both), each split into heads and rotated in one
        pass (:func:`~bsbr.ops.rope.split_heads_rotary`, tables cached by :func:`~bsbr.ops.rope.rope_tables`).
        """
        cos = sin = None
        if self.rope:
            cos, sin = self.rope_cos_sin(positions, x.shape[1], x.dtype, x.device)
        return self.heads(self.q_proj, x, cos, sin), self.heads(self.k_proj, x, cos, sin), self.heads(self.v_proj, x)

    def heads(self, proj: nn.Linear, x: torch.Tensor, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None) -> torch.Tensor:
        """proj(x) split into contiguous heads [B, H, T, d], rotated by (cos, sin) when given (see :meth:`qkv`)."""
        H, d = self.num_heads, proj.out_features // self.num_heads
        rows = blocked(x, proj.out_features, proj.weight)
        if not rows:
            return split_heads_rotary(proj(x), H, cos, sin)
        B, T, _ = x.shape
        out = x.new_empty(B, H, T, d)
        work = x.new_empty(rows, proj.out_features)
        for b, t0, t1 in row_blocks(B, T, rows):
            w = linear_into(x[b, t0:t1], proj, work[: t1 - t0])
            src, dst = w.view(1, t1 - t0, H, d), out[b : b + 1, :, t0:t1].transpose(1, 2)
            if cos is None:
                dst.copy_(src)
            else:
                c, s = (t[t0:t1] if t.dim() == 2 else t[b : b + 1, t0:t1] for t in (cos, sin))
                rotate_into(dst, src, c.unsqueeze(-2), s.unsqueeze(-2), 1.0)
        return out

    def rope_cos_sin(self, positions: torch.Tensor | int, length: int, dtype: torch.dtype, device):
        """cos, sin of this layer's rotary angles at ``positions`` (see :meth:`qkv`): [T, d/2] or [B, T, d/2]."""
        return rope_cos_sin(positions, length, self.head_dim, self.rope_base, dtype, device)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o: [B, H, T, d] -> out_proj(merged): [B, T, D]."""
        B, H, T, d = o.shape
        rows = blocked(o.transpose(1, 2), max(H * d, self.out_proj.out_features), self.out_proj.weight)
        if not rows:
            return self.out_proj(merge_heads(o))
        y = o.new_empty(B, T, self.out_proj.out_features)
        work = o.new_empty(rows, H * d)
        for b, t0, t1 in row_blocks(B, T, rows):
            w = work[: t1 - t0]
            w.view(t1 - t0, H, d).copy_(o[b, :, t0:t1].transpose(0, 1))
            linear_into(w, self.out_proj, y[b, t0:t1])
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rope={self.rope}"

