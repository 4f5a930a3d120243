"""Streaming caches: what each attention layer keeps between pieces of a sequence.

Every layer cache records ``lengths`` — the number of real tokens each batch row has absorbed — so rows may
differ in length (a left-padded prompt leaves them ragged).  The tensors a cache holds are allocated
lazily on first use, in the dtype and device of the hidden states, and grow by doubling.  Streaming is for
inference: what enters a cache is detached, so no gradient flows through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class LayerCache:
    """Base class of per-layer caches.  ``lengths``: [B] long, tokens absorbed per row."""

    lengths: torch.Tensor

    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds (including spare capacity of growable buffers)."""
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, GrowableBuffer):
                total += value.nbytes()
        return total

    def state_nbytes(self) -> int:
        """Bytes of the live contents only (no spare capacity): the cache's true size for this context."""
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, GrowableBuffer):
                total += value.live_nbytes()
        return total

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


@dataclass
class GrowableBuffer:
    """A tensor [B, H, capacity, *features] that grows along dim 2; rows fill it independently.

    ``filled`` ([B] long) says how many slots of each row hold data.  Used for KV caches, chunk-state
    lists and meta-key lists.
    """

    data: torch.Tensor | None = None
    filled: torch.Tensor | None = None
    min_capacity: int = 16
    _spare: list = field(default_factory=list, repr=False)

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        # like: [B, H, n, *features]
        if self.data is None:
            cap = max(self.min_capacity, needed)
            shape = (like.shape[0], like.shape[1], cap, *like.shape[3:])
            self.data = like.new_zeros(shape)
            self.filled = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        elif needed > self.data.shape[2]:
            cap = max(needed, 2 * self.data.shape[2])
            grown = self.data.new_zeros((*self.data.shape[:2], cap, *self.data.shape[3:]))
            grown[:, :, : self.data.shape[2]] = self.data
            self.data = grown

    def append(self, new: torch.Tensor) -> None:
        """Append new: [B, H, n, *features] to every row; rows must be equally filled."""
        n = new.shape[2]
        start = 0 if self.filled is None else int(self.filled[0])
        if self.filled is not None and not bool((self.filled == start).all()):
            raise RuntimeError("GrowableBuffer.append needs equally filled rows; use append_rows")
        self._reserve(new, start + n)
        self.data[:, :, start : start + n] = new.detach()
        self.filled += n

    def append_rows(self, new: torch.Tensor, rows: torch.Tensor) -> None:
        """Append one item new: [B, H, *features] to the rows where ``rows`` ([B] bool) is True."""
        like = new.unsqueeze(2)
        needed = 1 if self.filled is None else int(self.filled.max()) + 1
        self._reserve(like, needed)
        idx = rows.nonzero().squeeze(-1)
        if idx.numel():
            self.data[idx, :, self.filled[idx]] = new[idx].detach()
            self.filled[idx] += 1

    def view(self) -> torch.Tensor | None:
        """The filled prefix shared by all rows' capacity: [B, H, max_filled, *features] (rows may be shorter)."""
        if self.data is None:
            return None
        return self.data[:, :, : int(self.filled.max())]

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def live_nbytes(self) -> int:
        if self.data is None:
            return 0
        per_slot = self.data[:, :, :1].numel() * self.data.element_size() // self.data.shape[0]
        return int(self.filled.sum()) * per_slot
