"""Byte-level language modelling on an offline corpus (see :mod:`bsbr.tasks.corpora`).

Training batches are windows of ``seq_len`` bytes at random offsets of the train split (the offsets depend
only on the seed and the batch index).  Validation and test batches tile their split with non-overlapping
windows in order, so ``num_batches(split, batch_size)`` batches cover it once (rows past the end wrap
around to the start and are not scored).  Every byte after the first
of a window is scored.  ``score`` adds the loss per position bucket: does the model use long context?
"""

from __future__ import annotations

import math
from pathlib import PurePath

import torch

from .. import _checks
from .base import SPLITS, Batch, Task, derive_seed, finish_score
from .corpora import DEFAULT_EXTENSIONS, load_corpus


class LanguageModeling(Task):
    name = "lm"
    vocab_size = 256

    def __init__(self, seq_len: int = 1024, seed: int = 0, corpus: str = "prose", path: str | None = None,
                 extensions: tuple[str, ...] | list[str] = DEFAULT_EXTENSIONS, position_buckets: int = 8):
        super().__init__(seq_len, seed)
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 for language modelling, got {seq_len}")
        self.position_buckets = _checks.positive_int("position_buckets", position_buckets)
        if path is not None and corpus not in ("dir", "wikitext"):
            corpus = "dir" if corpus == "prose" else corpus  # get_task("lm", path=...) means "this directory"
        if not isinstance(extensions, list | tuple) or not all(isinstance(e, str) for e in extensions):
            raise TypeError(f"extensions must be a list of file endings such as ['.txt'], got {extensions!r}")
        if path is not None and not isinstance(path, str | PurePath):
            raise TypeError(f"path must be a directory or file path (a string), got {path!r}")
        self.corpus, self.path, self.extensions = corpus, None if path is None else str(path), tuple(extensions)
        data = load_corpus(corpus, self.path, self.extensions)
        self._data = {s: torch.frombuffer(bytearray(data[s]), dtype=torch.uint8) for s in SPLITS}
        for s, d in self._data.items():
            if d.numel() < seq_len:
                raise ValueError(f"the {s} split of corpus {corpus!r} has {d.numel()} bytes, fewer than seq_len="
                                 f"{seq_len}")
        self.options.update(corpus=corpus, path=self.path, position_buckets=self.position_buckets)
        if corpus == "dir":
            self.options["extensions"] = list(self.extensions)

    def split_bytes(self, split: str) -> int:
        """Number of bytes in ``split``."""
        return int(self._data[_checks.one_of("split", split, SPLITS)].numel())

    def num_batches(self, split: str, batch_size: int) -> int:
        """Batches of non-overlapping windows needed to cover ``split`` once (the last may wrap around)."""
        windows = self.split_bytes(split) // self.seq_len
        return max(1, math.ceil(windows / _checks.positive_int("batch_size", batch_size)))

    def batch(self, split: str, batch_size: int, index: int) -> Batch:
        """[batch_size, seq_len] byte windows; see the module docstring for where they come from."""
        _checks.one_of("split", split, SPLITS)
        _checks.positive_int("batch_size", batch_size)
        _checks.non_negative_int("index", index)
        data, t = self._data[split], self.seq_len
        if split == "train":
            g = torch.Generator().manual_seed(derive_seed(self.name, sorted(self.options.items()), split, index))
            starts = torch.randint(0, data.numel() - t + 1, (batch_size,), generator=g)
            repeat = None
        else:
            windows = data.numel() // t
            flat = index * batch_size + torch.arange(batch_size)
            starts = (flat % windows) * t
            repeat = flat >= windows  # past the end of the split: wrapped around, so not scored again
        ids = data[starts[:, None] + torch.arange(t)].long()
        labels = ids.clone()
        if repeat is not None:
            labels[repeat] = -100
        return Batch(ids, labels)

    def score(self, logits: torch.Tensor, batch: Batch) -> dict:
        """As :meth:`Task.score`, plus "bucket_nll_sum" / "bucket_total" (summed loss and count of predicted
        positions per bucket of ``position_buckets`` equal spans of the window) and "bucket_edges"."""
        out = self._score_tokens(logits, batch)
        nll, scored = out["_nll"], out["_scored"]  # [B, T-1]: position p predicts byte p+1
        k = self.position_buckets
        edges = [round(i * (self.seq_len - 1) / k) for i in range(k + 1)]
        out["bucket_edges"] = edges
        spans = list(zip(edges[:-1], edges[1:], strict=True))
        out["bucket_nll_sum"] = [float(nll[:, a:b][scored[:, a:b]].sum()) for a, b in spans]
        out["bucket_total"] = [int(scored[:, a:b].sum()) for a, b in spans]
        return finish_score(out)
