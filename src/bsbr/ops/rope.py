"""Rotary position embedding (Su et al. 2021), computed from positions — no fixed table, no maximum length."""

from __future__ import annotations

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
