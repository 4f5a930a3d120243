"""Masks of the BSBR backends: the mask function they register, and the key padding mask read back from any mask.

The ``"bsbr"`` mask function (:func:`bsbr_mask`) hands the attention function the 2-D key padding mask [B, S]
(True = token) instead of a [B, 1, T, S] causal mask, which BSBR does not need and which at 64k tokens would be
4 GB.  Causality is built into the attention functions (:mod:`bsbr.convert.backends`).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import prepare_padding_mask


def bsbr_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask function of the BSBR backends: the key padding mask [B, kv_length] (True = a token), or None when
    every key is a token.  Causality is built into the attention functions."""
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if mask is None:
        return None
    mask = mask[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(mask.all()) else mask


def _key_validity(mask: torch.Tensor | None, S: int) -> torch.Tensor | None:
    """The [B, S] key padding mask from whatever mask arrived (None, 2-D, or a 4-D bool / additive mask)."""
    if mask is None:
        return None
    if mask.dim() == 4:  # another mask function built a [B, 1, T, S] mask: its last query row sees every key
        mask = mask[:, 0, -1, :]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask.bool()
    if mask.shape[-1] != S:
        raise ValueError(f"attention mask covers {mask.shape[-1]} keys, expected {S}")
    return None if bool(mask.all()) else mask
