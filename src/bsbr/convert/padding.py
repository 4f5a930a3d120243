"""Padded rows through the BSBR op: each row's tokens moved to the front and the outputs moved back.

BSBR counts chunks from each row's first token (as the rest of bsbr does), so a left- or right-padded batch
[B, H, T, d] without a cache runs as if unpadded: :func:`_padded_rows` finds each row's contiguous run of tokens
from the key padding mask [B, T], and :func:`_rolled` rolls the row so the run starts at position 0 (and back).
"""

from __future__ import annotations

import torch


def _padded_rows(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first token, token count) per row; raise if a row's tokens are not one contiguous run."""
    T = valid.shape[1]
    count = valid.sum(dim=1)
    start = valid.float().argmax(dim=1)
    pos = torch.arange(T, device=valid.device)[None, :]
    run = (pos >= start[:, None]) & (pos < (start + count)[:, None])
    if not bool((run == valid).all()):
        bad = int((run != valid).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask row {bad} has padding between tokens; BSBR conversion supports left- or "
                         "right-padded rows (each row's tokens one contiguous run)")
    return start, count


def _rolled(x: torch.Tensor, shift: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Roll each row b of x [B, H, T, d] left by shift[b] along T (right, if ``inverse``)."""
    T = x.shape[2]
    idx = torch.arange(T, device=x.device)[None, :] + (-shift if inverse else shift)[:, None]
    idx = idx.remainder(T)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return x.gather(2, idx)
