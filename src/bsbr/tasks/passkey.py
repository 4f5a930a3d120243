"""Passkey retrieval (after Mohtashami & Jaggi 2023), byte-level.

A random number of ``digits`` digits is stated once at a chosen ``depth`` (0 = start, 1 = end) inside
repetitive filler text; the row ends with a question and the number, whose digits are scored.  With
``depth=None`` each example draws its depth uniformly; ``score`` then also reports accuracy per depth bucket.
With ``train_all_bytes`` the train split labels every byte (a language-modelling loss on the filler and the
needle too, which teaches the copying that retrieval needs); valid and test always score the digits only.
"""

from __future__ import annotations

import torch

from .. import _checks
from .base import Batch, Task, finish_score

FILLER = b"The river runs to the sea. The hills stay where they are. Days follow nights. Onward and back. "
QUESTION = b" What number was hidden above? It was "


class Passkey(Task):
    name = "passkey"
    vocab_size = 256

    def __init__(self, seq_len: int = 1024, seed: int = 0, digits: int = 5, depth: float | None = None,
                 depth_buckets: int = 5, train_all_bytes: bool = False):
        super().__init__(seq_len, seed)
        self.digits = _checks.positive_int("digits", digits)
        if depth is not None and (not isinstance(depth, int | float) or not 0 <= depth <= 1):
            raise ValueError(f"depth must be a number in [0, 1] or None (random per example), got {depth!r}")
        self.depth = None if depth is None else float(depth)
        self.depth_buckets = _checks.positive_int("depth_buckets", depth_buckets)
        self._needle_len = len(self._needle(b"0" * self.digits))
        self._tail_len = len(QUESTION) + self.digits
        if seq_len < self._needle_len + self._tail_len + 1:
            raise ValueError(f"seq_len must be at least {self._needle_len + self._tail_len + 1} for passkey with "
                             f"digits={digits}, got {seq_len}")
        if not isinstance(train_all_bytes, bool):
            raise TypeError(f"train_all_bytes must be true or false, got {train_all_bytes!r}")
        self.train_all_bytes = train_all_bytes
        self.options.update(digits=self.digits, depth=self.depth, depth_buckets=self.depth_buckets)
        if train_all_bytes:  # (only when set, so earlier runs' options and batches stay as they were)
            self.options["train_all_bytes"] = True
        self.answer_tokens = torch.arange(ord("0"), ord("9") + 1)

    @staticmethod
    def _needle(number: bytes) -> bytes:
        return b" The hidden number is " + number + b". Keep it in mind. "

    def _generate(self, rows: int, g: torch.Generator) -> Batch:
        t = self.seq_len
        haystack = t - self._tail_len - self._needle_len  # filler bytes around the needle
        filler = torch.tensor(list(FILLER * (haystack // len(FILLER) + 2)), dtype=torch.long)
        ids = torch.empty(rows, t, dtype=torch.long)
        labels = torch.full((rows, t), -100, dtype=torch.long)
        depth = torch.rand(rows, generator=g, dtype=torch.float64) if self.depth is None else \
            torch.full((rows,), self.depth, dtype=torch.float64)
        offsets = torch.randint(0, len(FILLER), (rows,), generator=g)  # vary the filler phase per row
        numbers = torch.randint(0, 10, (rows, self.digits), generator=g) + ord("0")
        for r in range(rows):
            cut = int(round(float(depth[r]) * haystack))
            hay = filler[int(offsets[r]) : int(offsets[r]) + haystack]
            needle = torch.tensor(list(self._needle(bytes(numbers[r].tolist()))), dtype=torch.long)
            tail = torch.cat([torch.tensor(list(QUESTION), dtype=torch.long), numbers[r]])
            ids[r] = torch.cat([hay[:cut], needle, hay[cut:], tail])
        labels[:, t - self.digits :] = numbers
        return Batch(ids, labels, meta={"depth": depth})

    def batch(self, split: str, batch_size: int, index: int) -> Batch:
        out = super().batch(split, batch_size, index)
        if self.train_all_bytes and split == "train":
            labels = out.input_ids.clone()
            labels[:, 0] = -100  # nothing predicts the first byte
            out = Batch(out.input_ids, labels, out.attention_mask, out.meta)
        return out

    def score(self, logits: torch.Tensor, batch: Batch) -> dict:
        """As :meth:`Task.score`, plus "by_depth": example accuracy per depth bucket (list of
        {"depth_lo", "depth_hi", "correct", "total", "accuracy"})."""
        out = self._score_tokens(logits, batch)
        hit, scored = out["_hit"], out["_scored"]
        ok = (hit.sum(1) == scored.sum(1)).cpu()
        depth = batch.meta.get("depth")
        if depth is not None:
            k = self.depth_buckets
            bucket = (depth * k).long().clamp(max=k - 1)
            out["by_depth"] = []
            for b in range(k):
                sel = bucket == b
                c, n = int(ok[sel].sum()), int(sel.sum())
                out["by_depth"].append({"depth_lo": b / k, "depth_hi": (b + 1) / k, "correct": c, "total": n,
                                        "accuracy": c / n if n else float("nan")})
        return finish_score(out)
