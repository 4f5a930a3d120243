"""Selective copying (Gu & Dao 2023, Mamba): remember the data tokens scattered among noise, then write them
out in order.

Row layout (length T = context + 1 + num_tokens):  ``context`` positions holding ``num_tokens`` data tokens
at random positions (order kept) and noise token 0 elsewhere, then the copy marker, then the data tokens
again.  The copy is scored autoregressively (teacher forcing): after the marker, and after each copied token,
the model must predict the next data token.  Token ids: 0 noise, 1..num_symbols data, num_symbols + 1 marker.
"""

from __future__ import annotations

import torch

from .. import _checks
from .base import Batch, Task


class SelectiveCopy(Task):
    name = "selective_copy"

    def __init__(self, seq_len: int = 256, seed: int = 0, num_tokens: int = 16, num_symbols: int = 16):
        super().__init__(seq_len, seed)
        self.num_tokens = _checks.positive_int("num_tokens", num_tokens)
        self.num_symbols = _checks.positive_int("num_symbols", num_symbols)
        self.context = seq_len - 1 - self.num_tokens
        if self.context < self.num_tokens:
            raise ValueError(f"seq_len must be at least 2 * num_tokens + 1 = {2 * num_tokens + 1}, got {seq_len}")
        self.vocab_size = self.num_symbols + 2
        self.marker = self.num_symbols + 1
        self.options.update(num_tokens=self.num_tokens, num_symbols=self.num_symbols)
        self.answer_tokens = torch.arange(1, self.num_symbols + 1)

    def _generate(self, rows: int, g: torch.Generator) -> Batch:
        m, c = self.num_tokens, self.context
        data = torch.randint(1, self.num_symbols + 1, (rows, m), generator=g)
        pos = torch.rand(rows, c, generator=g).argsort(dim=1)[:, :m].sort(dim=1).values  # positions, in order
        ids = torch.zeros(rows, self.seq_len, dtype=torch.long)
        ids.scatter_(1, pos, data)
        ids[:, c] = self.marker
        ids[:, c + 1 :] = data
        labels = torch.full_like(ids, -100)
        labels[:, c + 1 :] = data
        return Batch(ids, labels)
