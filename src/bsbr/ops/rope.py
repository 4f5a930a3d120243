"""Rotary position embedding (Su et al. 2021), computed from positions — no fixed table, no maximum length.

* :func:`rope_angles` — cos and sin of the angles at any positions (the definition);
* :func:`apply_rope` — rotate x [B, H, T, d] by them (the plain form, out of place);
* :func:`rope_tables` — the same cos and sin for positions 0 .. T - 1, computed once per (length, head dim, base,
  dtype, device) and kept in a small cache (the tables do not depend on anything else, and every forward of
  every layer at one length asks for the same ones);
* :func:`split_heads_rotary` — the fast form the layers use: splits a projection's output [B, T, H*d] into
  contiguous heads [B, H, T, d] and rotates them in the same pass (one read and one write of the tensor,
  instead of a copy, six elementwise temporaries and a ``cat``).  Under autograd it is one custom function
  whose backward is the inverse rotation, so it saves nothing for backward.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin of the rotation angles.

    positions: [T] or [B, T] integer positions.  Returns (cos, sin), each [..., T, head_dim // 2] in ``dtype``.
    Angles are computed in fp64 when ``dtype`` is fp64 and in fp32 otherwise, so the same position always
    gives the same angle whichever path (parallel or streaming) asks for it.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=work) * 2.0 / head_dim)
    angles = positions.to(work).unsqueeze(-1) * inv_freq  # [..., T, half]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of x: [B, H, T, d] by position-dependent angles.

    positions: [T] (shared by the batch) or [B, T].  d must be even.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got head_dim={d}")
    cos, sin = rope_angles(positions, d, base, x.dtype)
    if cos.dim() == 3:  # [B, T, half] -> [B, 1, T, half]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ------------------------------------------------------------------------------------------ cached tables
_TABLES: OrderedDict = OrderedDict()
TABLE_CACHE_BYTES = 64 * 2**20
"""The cache keeps its most recently used tables up to this many bytes (and always the latest one)."""


def rope_tables(length: int, head_dim: int, base: float, dtype: torch.dtype,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [length, head_dim // 2], for positions 0 .. length - 1: :func:`rope_angles` of
    ``arange(length)``, the same values, cached.  The tables are ordinary tensors (made outside inference mode and
    without autograd history), so one made during inference serves training too.  Do not modify them."""
    device = torch.device(device)
    key = (int(length), int(head_dim), float(base), dtype, device)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    with torch.inference_mode(False), torch.no_grad():
        tables = rope_angles(torch.arange(length, device=device), head_dim, base, dtype)
    _TABLES[key] = tables
    total = sum(c.nbytes + s.nbytes for c, s in _TABLES.values())
    while len(_TABLES) > 1 and total > TABLE_CACHE_BYTES:
        _, (c, s) = _TABLES.popitem(last=False)
        total -= c.nbytes + s.nbytes
    return tables


def rope_cos_sin(positions: torch.Tensor | int, length: int, head_dim: int, base: float, dtype: torch.dtype,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``positions``: an int offset (positions offset .. offset + length - 1; offset 0 comes from
    the cache) or a tensor [T] / [B, T].  Returns [T, d/2] or [B, T, d/2] each."""
    if isinstance(positions, int):
        if positions == 0:
            return rope_tables(length, head_dim, base, dtype, device)
        positions = positions + torch.arange(length, device=device)
    return rope_angles(positions, head_dim, base, dtype)


# ------------------------------------------------------------------------------ split heads and rotate
def rotate_into(dst: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """dst = src rotated by +angle (sign 1) or -angle (sign -1); both [B, T, H, d] (any strides, not
    overlapping), cos/sin broadcastable to [B, T, 1, d/2].  Four elementwise passes over halves, no temporaries."""
    h = src.shape[-1] // 2
    s1, s2, d1, d2 = src[..., :h], src[..., h:], dst[..., :h], dst[..., h:]
    torch.mul(s1, cos, out=d1)
    d1.addcmul_(s2, sin, value=-sign)
    torch.mul(s2, cos, out=d2)
    d2.addcmul_(s1, sin, value=sign)


def _split(y: torch.Tensor, num_heads: int, cos, sin, sign: float = 1.0) -> torch.Tensor:
    """[B, T, H*d] -> contiguous [B, H, T, d], rotated when cos is given."""
    B, T, D = y.shape
    out = y.new_empty(B, num_heads, T, D // num_heads)
    src, dst = y.view(B, T, num_heads, -1), out.transpose(1, 2)
    if cos is None:
        dst.copy_(src)
    else:
        rotate_into(dst, src, cos, sin, sign)
    return out


def _merge(g: torch.Tensor, cos, sin) -> torch.Tensor:
    """Inverse of :func:`_split` for gradients: [B, H, T, d] -> [B, T, H*d], rotated back by -angle."""
    B, H, T, d = g.shape
    out = g.new_empty(B, T, H * d)
    dst, src = out.view(B, T, H, d), g.transpose(1, 2)
    if cos is None:
        dst.copy_(src)
    else:
        rotate_into(dst, src, cos, sin, -1.0)
    return out


def _broadcastable(cos: torch.Tensor | None) -> torch.Tensor | None:
    """[T, h] -> [T, 1, h]; [B, T, h] -> [B, T, 1, h] (against [B, T, H, h])."""
    return None if cos is None else cos.unsqueeze(-2)


class _SplitRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, num_heads, cos, sin):
        ctx.num_heads, ctx.cos, ctx.sin = num_heads, cos, sin  # tables, not activations: nothing saved
        return _split(y, num_heads, cos, sin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _merge(grad, ctx.cos, ctx.sin), None, None, None


def split_heads_rotary(y: torch.Tensor, num_heads: int, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None) -> torch.Tensor:
    """y: [B, T, H*d] -> contiguous [B, H, T, d], rotated by (cos, sin) ([T, d/2] or [B, T, d/2], from
    :func:`rope_cos_sin`) when given — the same values as ``apply_rope(split_heads(y), ...)`` in one pass.

    With autograd (y requires grad) the gradient is the inverse rotation, computed in one pass too; cos and sin
    get no gradient (they are functions of integer positions).
    """
    if cos is None:  # a plain head split (no rotation)
        if torch.is_grad_enabled() and y.requires_grad:
            return _SplitRotary.apply(y, num_heads, None, None)
        return _split(y, num_heads, None, None)
    cos, sin = _broadcastable(cos), _broadcastable(sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("split_heads_rotary: cos and sin must not require grad (they come from positions)")
    if torch.is_grad_enabled() and y.requires_grad:
        return _SplitRotary.apply(y, num_heads, cos, sin)
    return _split(y, num_heads, cos, sin)
