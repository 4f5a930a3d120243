"""What every task shares: the Batch, the Task contract, deterministic seeding and disjoint splits.

A task turns ``(options, seed, split, index)`` into a batch, always the same one.  Synthetic tasks keep
their splits disjoint by construction: an example belongs to the split its content hashes to, and a
generator simply drops examples that hash elsewhere (so a test example can never appear in training).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import _checks

SPLITS = ("train", "valid", "test")
# Share of the content-hash space each split owns (synthetic tasks and file corpora alike).
SPLIT_SHARES = {"train": 0.8, "valid": 0.1, "test": 0.1}


@dataclass
class Batch:
    """One batch of a task.

    input_ids: [B, T] long.  labels: [B, T] long, -100 where nothing is scored; Hugging Face convention:
    labels[:, t] is predicted from the logits at t - 1.  attention_mask: [B, T] long (1 real, 0 padding) or
    None.  meta: per-example extras a scorer may use (e.g. passkey depth), never fed to the model.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def to(self, device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), mask, self.meta)

    def rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) (used to shard a global batch across processes)."""
        mask = None if self.attention_mask is None else self.attention_mask[start:stop]
        meta = {k: v[start:stop] for k, v in self.meta.items()}
        return Batch(self.input_ids[start:stop], self.labels[start:stop], mask, meta)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_of_bytes(data: bytes) -> str:
    """The split that content ``data`` belongs to (fixed: depends on the bytes only)."""
    u = int.from_bytes(hashlib.sha256(data).digest()[:8], "little") / 2.0**64
    return "train" if u < SPLIT_SHARES["train"] else ("valid" if u < SPLIT_SHARES["train"] + SPLIT_SHARES["valid"]
                                                       else "test")


# Fixed odd multipliers for the row hash below (any fixed values work: only determinism matters).
_MULT = torch.randint(1, 2**31 - 1, (1 << 16,), generator=torch.Generator().manual_seed(20231117)) * 2 + 1


def split_of_rows(ids: torch.Tensor) -> list[str]:
    """The split each row of ``ids`` [N, T] belongs to, from a hash of the row's tokens."""
    n, t = ids.shape
    mult = _MULT[torch.arange(t) % _MULT.numel()] + torch.arange(t) // _MULT.numel()
    h = (ids.long() * mult).sum(dim=1)  # int64 arithmetic wraps: still a deterministic function of the row
    h = (h ^ (h >> 29)) * 0x5851F42D4C957F2D
    u = ((h >> 11) & ((1 << 52) - 1)).double() / 2.0**52
    cut1, cut2 = SPLIT_SHARES["train"], SPLIT_SHARES["train"] + SPLIT_SHARES["valid"]
    return ["train" if x < cut1 else ("valid" if x < cut2 else "test") for x in u.tolist()]


class Task:
    """Base class.  Subclasses set ``name``, ``vocab_size`` and implement ``_generate(n, generator)`` (synthetic
    tasks; returns a Batch of n candidate rows) or override :meth:`batch` (corpora)."""

    name = "task"
    answer_tokens: torch.Tensor | None = None  # if set, predictions are argmax over these token ids only

    def __init__(self, seq_len: int, seed: int = 0):
        self.seq_len = _checks.positive_int("seq_len", seq_len)
        self.seed = _checks.non_negative_int("seed", seed)
        self.options: dict = {"seq_len": self.seq_len, "seed": self.seed}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    # ------------------------------------------------------------------------------------ batches
    def batch(self, split: str, batch_size: int, index: int) -> Batch:
        """Batch number ``index`` of ``split``: [batch_size, seq_len].  Same arguments -> same batch."""
        _checks.one_of("split", split, SPLITS)
        _checks.positive_int("batch_size", batch_size)
        _checks.non_negative_int("index", index)
        g = torch.Generator().manual_seed(derive_seed(self.name, self._seed_items(), split, batch_size, index))
        kept: list[Batch] = []
        have = 0
        share = SPLIT_SHARES[split]
        for _ in range(1000):
            want = max(8, math.ceil(1.3 * (batch_size - have) / share))
            cand = self._generate(want, g)
            keep = [i for i, s in enumerate(split_of_rows(cand.input_ids)) if s == split]
            if keep:
                idx = torch.tensor(keep[: batch_size - have])
                kept.append(_select(cand, idx))
                have += idx.numel()
            if have == batch_size:
                return _concat(kept)
        raise RuntimeError(f"task {self.name}: could not draw {batch_size} {split} examples (too few distinct ones?)")

    def _seed_items(self) -> list:
        """What the batches' random seed is derived from (with split, batch size and index): the options."""
        return sorted(self.options.items())

    def _generate(self, n: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ scoring
    def score(self, logits: torch.Tensor, batch: Batch) -> dict:
        """Score ``logits`` [B, T, V] on ``batch``; see :meth:`_score_tokens` for the keys returned."""
        return finish_score(self._score_tokens(logits, batch))

    def _score_tokens(self, logits: torch.Tensor, batch: Batch) -> dict:
        """Score ``logits`` [B, T, V] on ``batch``: a prediction is the argmax at t - 1 for each labelled t.

        Returns {"correct", "total", "accuracy", "nll_sum", "examples_correct", "examples"}: token accuracy,
        the summed negative log-likelihood of labelled tokens (nats), and how many rows were right everywhere.
        """
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != batch.labels.shape:
            got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must have shape [batch, seq_len, vocab] = {list(batch.labels.shape)} + [V], "
                             f"got {got}")
        logits = logits[:, :-1].float()
        target = batch.labels[:, 1:].to(logits.device)
        scored = target != -100
        safe = target.clamp(min=0)
        nll = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none")  # [B, T-1]
        if self.answer_tokens is not None:
            cand = self.answer_tokens.to(logits.device)
            pred = cand[logits[..., cand].argmax(-1)]
        else:
            pred = logits.argmax(-1)
        hit = (pred == safe) & scored
        rows_total = scored.sum(1)
        rows_ok = (hit.sum(1) == rows_total) & (rows_total > 0)
        correct, total = int(hit.sum()), int(scored.sum())
        return {"correct": correct, "total": total, "accuracy": correct / total if total else float("nan"),
                "nll_sum": float(nll[scored].sum()), "examples_correct": int(rows_ok.sum()),
                "examples": int((rows_total > 0).sum()), "_hit": hit, "_nll": nll, "_scored": scored}


def finish_score(out: dict) -> dict:
    """Drop the private per-position tensors a subclass may have used."""
    return {k: v for k, v in out.items() if not k.startswith("_")}


def _select(b: Batch, idx: torch.Tensor) -> Batch:
    mask = None if b.attention_mask is None else b.attention_mask[idx]
    return Batch(b.input_ids[idx], b.labels[idx], mask, {k: v[idx] for k, v in b.meta.items()})


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    mask = None if parts[0].attention_mask is None else torch.cat([p.attention_mask for p in parts])
    meta = {k: torch.cat([p.meta[k] for p in parts]) for k in parts[0].meta}
    return Batch(torch.cat([p.input_ids for p in parts]), torch.cat([p.labels for p in parts]), mask, meta)
