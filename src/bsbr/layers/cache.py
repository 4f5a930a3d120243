"""Streaming caches: what each attention layer keeps between pieces of a sequence.

Every layer cache records ``lengths`` — the number of real tokens each batch row has absorbed — so rows may
differ in length (a left-padded prompt leaves them ragged).  The tensors a cache holds are allocated
lazily on first use, in the dtype and device of the hidden states, and grow by doubling.

Gradients: under ``torch.no_grad``/``inference_mode`` (generation) caches are updated in place.  When autograd
is recording and the new contents require grad, updates are out of place instead, so a loss computed from
streamed pieces back-propagates through the cache exactly as through one parallel forward (the recurrent
form's gradients are tested against the parallel form's).  Call :meth:`LayerCache.detach` between pieces for
truncated back-propagation through time.
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
        return self._bytes(live=False)

    def state_nbytes(self) -> int:
        """Bytes of the live contents only (no spare capacity): the cache's true size for this context."""
        return self._bytes(live=True)

    def _bytes(self, live: bool) -> int:
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, GrowableBuffer):
                total += value.live_nbytes() if live else value.nbytes()
        return total

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def detach(self) -> None:
        """Cut the autograd history of everything held (truncated back-propagation through time)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.detach())
            elif isinstance(value, GrowableBuffer) and value.data is not None:
                value.data = value.data.detach()


def tracks_grad(t: torch.Tensor) -> bool:
    """True when writing ``t`` into a cache must keep its autograd history (out-of-place update)."""
    return torch.is_grad_enabled() and t.requires_grad


def write_slot(buf: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Write ``new`` [B, H, *f] at index ``slot[b]`` of dim 2 of ``buf`` [B, H, n, *f] for rows where ``rows``.

    In place without autograd; out of place (returning a new tensor) when gradients must flow."""
    if not (tracks_grad(new) or tracks_grad(buf)):
        idx = rows.nonzero().squeeze(-1)
        buf[idx, :, slot[idx]] = new[idx]
        return buf
    hit = (torch.arange(buf.shape[2], device=buf.device)[None, :] == slot[:, None]) & rows[:, None]  # [B, n]
    hit = hit.view(buf.shape[0], 1, buf.shape[2], *([1] * (buf.dim() - 3)))
    return torch.where(hit, new.unsqueeze(2), buf)


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
        if tracks_grad(new) or (self.data is not None and tracks_grad(self.data)):
            # keep the history: a new tensor holding exactly the filled part (no spare capacity)
            self.data = new if self.data is None else torch.cat([self.data[:, :, :start], new], dim=2)
            if self.filled is None:
                self.filled = torch.zeros(new.shape[0], dtype=torch.long, device=new.device)
            self.filled = self.filled + n
            return
        self._reserve(new, start + n)
        self.data[:, :, start : start + n] = new
        self.filled += n

    def append_rows(self, new: torch.Tensor, rows: torch.Tensor) -> None:
        """Append one item new: [B, H, *features] to the rows where ``rows`` ([B] bool) is True."""
        like = new.unsqueeze(2)
        needed = 1 if self.filled is None else int(self.filled.max()) + 1
        if tracks_grad(new) or (self.data is not None and tracks_grad(self.data)):
            if self.data is None or self.data.shape[2] < needed:  # grow by one slot, out of place
                pad = new.new_zeros(*new.shape[:2], needed - (0 if self.data is None else self.data.shape[2]),
                                    *new.shape[2:])
                self.data = pad if self.data is None else torch.cat([self.data, pad], dim=2)
                if self.filled is None:
                    self.filled = torch.zeros(new.shape[0], dtype=torch.long, device=new.device)
        else:
            self._reserve(like, needed)
        self.data = write_slot(self.data, self.filled, rows, new)
        self.filled = self.filled + rows.long()

    def drop_front(self, n: int) -> None:
        """Forget the first n slots of every row (all rows must have filled at least n).  The kept part is
        copied into a buffer of its own size plus spare, so the memory of the dropped slots is released."""
        if self.data is None or n <= 0:
            return
        if int(self.filled.min()) < n:
            raise RuntimeError(f"GrowableBuffer.drop_front: n={n} exceeds the least filled row")
        kept = self.data[:, :, n:]
        if tracks_grad(kept):
            self.data = kept  # out of place: the history stays; the storage goes with the graph
        else:
            cap = max(self.min_capacity, kept.shape[2])
            fresh = kept.new_zeros((*kept.shape[:2], cap, *kept.shape[3:]))
            fresh[:, :, : kept.shape[2]] = kept
            self.data = fresh
        self.filled = self.filled - n

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
