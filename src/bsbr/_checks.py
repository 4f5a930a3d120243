"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` or ``TypeError`` whose message names the argument, shows the value
received and says what was expected, e.g. ``chunk_size must be a positive integer, got 0``.
"""

from __future__ import annotations

import numbers

import torch


def positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int if it is an integer >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return int(value)


def non_negative_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r} ({type(value).__name__})")
    if not float(value) >= 0:  # NaN fails too
        raise ValueError(f"{name} must be a number >= 0, got {value}")
    return float(value)


def probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def one_of(name: str, value: object, choices: tuple) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def heads_divide(hidden_dim: int, num_heads: int) -> int:
    """Check that ``num_heads`` divides ``hidden_dim`` and return the head dimension."""
    positive_int("hidden_dim", hidden_dim)
    positive_int("num_heads", num_heads)
    if hidden_dim % num_heads:
        raise ValueError(
            f"hidden_dim must be divisible by num_heads, got hidden_dim={hidden_dim}, num_heads={num_heads}"
        )
    return hidden_dim // num_heads


def hidden_states(x: object, hidden_dim: int, name: str = "hidden_states") -> torch.Tensor:
    """Check a [B, T, hidden_dim] floating tensor with T >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [batch, seq_len, {hidden_dim}], got {type(x)}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have 3 dimensions [batch, seq_len, {hidden_dim}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[-1] != hidden_dim:
        raise ValueError(f"{name} must have last dimension hidden_dim={hidden_dim}, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} is an empty sequence (seq_len=0); at least one token is required")
    return x


def input_ids(ids: object, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """Check a [B, T] integer tensor of token ids in [0, vocab_size) with T >= 1."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids with shape [batch, seq_len], got {type(ids)}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have 2 dimensions [batch, seq_len], got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is an empty sequence (seq_len=0); at least one token is required")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")
    return ids


def attention_mask(mask: object, shape: tuple[int, int], name: str = "attention_mask") -> torch.Tensor | None:
    """Check a [B, T] mask of 1 (real token) / 0 (padding) and return it as a bool tensor, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)} or None, got {type(mask)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [batch, seq_len] = {list(shape)}, got {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            bad = ~((mask == 0) | (mask == 1))
        else:
            bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must contain only 0 (padding) and 1 (real token)")
        mask = mask != 0
    return mask
