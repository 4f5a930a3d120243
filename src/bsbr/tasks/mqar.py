"""Multi-query associative recall (MQAR), after Zoology (Arora et al. 2023).

Layout of one row of length T (all token ids in [0, vocab_size)):

    k1 v1 k2 v2 ... kN vN | filler ... kq vq ... filler ... kq' vq' ...
    <----- 2N tokens ----> <------------ T - 2N query section --------->

Keys come from [1, vocab_size / 2), values from [vocab_size / 2, vocab_size), both distinct within a row.
Every key is queried once, in random order; the query section holds (T - 2N) // 2 two-token slots and the
N queries take slots drawn without replacement with p(slot i) ~ i^(a - 1) (a = 0.01 by default), so most
queries sit soon after the pairs and a few far away.  Only the value after each query is scored.  Other
positions hold random tokens (``random_filler``) or 0.

As in Zoology, the answer is a label only: the input token after a query is filler like the rest of the query
section, so no later query sees earlier answers.  ``answers_in_input=True`` writes each answer into the input
as well (this library's MQAR before 2026-12-04; the committed results that predate that carry it): then the
answers given so far are visible, and "a pair value not yet given as an answer" is a shortcut that needs no
key lookup (see "remaining" below).

Each batch's ``meta`` holds two [B, T] tensors, nonzero only at scored positions: "distance", how many tokens
back the queried key sits in the pairs, and "remaining", how many pairs are still unqueried at this query (this
one included: N for the first query of a row, 1 for the last).  :meth:`MQAR.score` adds "by_distance" and
"by_remaining": accuracy per bucket of each.  The second exposes a shortcut: a model that answers "one of the
pair values not yet given as an answer", without looking the key up, scores 1/remaining on each query (H_N / N
over a row, H_N the harmonic number: 0.52 for 4 pairs, 0.21 for 16), highest on the last queries; a model that
looks keys up scores the same in every bucket.
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from .base import Batch, Task, finish_score


def distinct_randint(rows: int, n: int, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    """[rows, n] integers in [lo, hi), distinct within each row, uniformly among such draws."""
    if 8 * n > hi - lo:  # dense: a random permutation's prefix
        return torch.rand(rows, hi - lo, generator=g).argsort(dim=1)[:, :n] + lo
    out = torch.randint(lo, hi, (rows, n), generator=g)
    while True:  # sparse: redraw the later copy of any repeated value until none is left
        s, idx = out.sort(dim=1)
        dup = s[:, 1:] == s[:, :-1]
        if not bool(dup.any()):
            return out
        r, c = dup.nonzero(as_tuple=True)
        out[r, idx[r, c + 1]] = torch.randint(lo, hi, (r.numel(),), generator=g)


class MQAR(Task):
    name = "mqar"

    def __init__(self, seq_len: int = 256, seed: int = 0, vocab_size: int = 8192, num_kv_pairs: int | None = None,
                 power_a: float = 0.01, random_filler: bool = True, answers_in_input: bool = False):
        super().__init__(seq_len, seed)
        self.vocab_size = _checks.positive_int("vocab_size", vocab_size)
        if num_kv_pairs is None:
            num_kv_pairs = max(1, seq_len // 16)  # T = 256 -> 16 pairs, scaled with T (Zoology's ratio)
        n = _checks.positive_int("num_kv_pairs", num_kv_pairs)
        if 4 * n > seq_len:
            raise ValueError(f"num_kv_pairs must be at most seq_len / 4 = {seq_len // 4} (pairs plus query slots), "
                             f"got {n}")
        if vocab_size // 2 - 1 < n:
            raise ValueError(f"vocab_size must give at least num_kv_pairs={n} distinct keys in [1, vocab_size/2), "
                             f"got vocab_size={vocab_size}")
        if not isinstance(power_a, int | float) or not 0 < power_a <= 1:
            raise ValueError(f"power_a must be a number in (0, 1], got {power_a!r}")
        if not isinstance(answers_in_input, bool):
            raise ValueError(f"answers_in_input must be True or False, got {answers_in_input!r}")
        self.num_kv_pairs, self.power_a, self.random_filler = n, float(power_a), bool(random_filler)
        self.answers_in_input = answers_in_input
        self.options.update(vocab_size=vocab_size, num_kv_pairs=n, power_a=self.power_a,
                            random_filler=self.random_filler, answers_in_input=answers_in_input)
        slots = (seq_len - 2 * n) // 2
        i = torch.arange(1, slots + 1, dtype=torch.float64)
        self._slot_weights = i ** (self.power_a - 1)  # unnormalised p(slot i) ~ i^(a-1)

    def _seed_items(self) -> list:
        """With ``answers_in_input`` the batches are the ones drawn before the option existed (same seed)."""
        items = super()._seed_items()
        return [kv for kv in items if kv[0] != "answers_in_input"] if self.answers_in_input else items

    def _generate(self, rows: int, g: torch.Generator) -> Batch:
        n, t, v = self.num_kv_pairs, self.seq_len, self.vocab_size
        half = v // 2
        keys = distinct_randint(rows, n, 1, half, g)    # [rows, n] distinct per row
        values = distinct_randint(rows, n, half, v, g)
        if self.random_filler:
            ids = torch.randint(0, v, (rows, t), generator=g)
        else:
            ids = torch.zeros(rows, t, dtype=torch.long)
        ids[:, 0 : 2 * n : 2] = keys
        ids[:, 1 : 2 * n : 2] = values
        slots = torch.multinomial(self._slot_weights.expand(rows, -1), n, replacement=False, generator=g)
        order = torch.rand(rows, n, generator=g).argsort(dim=1)  # which pair each chosen slot queries
        qpos = 2 * n + 2 * slots                                  # [rows, n] position of each query key
        ids.scatter_(1, qpos, keys.gather(1, order))
        answers = values.gather(1, order)
        if self.answers_in_input:
            ids.scatter_(1, qpos + 1, answers)
        labels = torch.full_like(ids, -100)
        labels.scatter_(1, qpos + 1, answers)
        distance = torch.zeros_like(ids)
        distance.scatter_(1, qpos + 1, qpos - 2 * order)  # query key at qpos, its pair's key at 2 * order
        remaining = torch.zeros_like(ids)
        rank = slots.argsort(dim=1).argsort(dim=1)  # 0 for the query nearest the pairs
        remaining.scatter_(1, qpos + 1, n - rank)
        return Batch(ids, labels, meta={"distance": distance, "remaining": remaining})

    @property
    def distance_edges(self) -> list[int]:
        """Bucket edges of "by_distance": (0, 16], (16, 32], (32, 64], ... up to the first power of 2 >= T."""
        return [0] + [2**k for k in range(4, max(4, math.ceil(math.log2(self.seq_len))) + 1)]

    @property
    def remaining_edges(self) -> list[int]:
        """Bucket edges of "by_remaining": (0, 1], (1, 2], (2, 4], ... up to the first power of 2 >= N."""
        return [0] + [2**k for k in range(0, math.ceil(math.log2(self.num_kv_pairs)) + 1)]

    def score(self, logits: torch.Tensor, batch: Batch) -> dict:
        """As :meth:`Task.score`, plus, when the batch carries them (``meta``), "by_distance" and "by_remaining":
        token accuracy per bucket of query-to-key distance and of pairs still unqueried (lists of {"<x>_lo",
        "<x>_hi", "correct", "total", "accuracy"}; a bucket holds values v with lo < v <= hi)."""
        out = self._score_tokens(logits, batch)
        hit, scored = out["_hit"].cpu(), out["_scored"].cpu()
        for name, edges in (("distance", self.distance_edges), ("remaining", self.remaining_edges)):
            value = batch.meta.get(name)
            if value is None:
                continue
            v = value[:, 1:]  # aligned with _score_tokens' [B, T-1] (position t predicts labels[t + 1])
            out[f"by_{name}"] = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                sel = scored & (v > lo) & (v <= hi)
                c, n = int((hit & sel).sum()), int(sel.sum())
                out[f"by_{name}"].append({f"{name}_lo": lo, f"{name}_hi": hi, "correct": c, "total": n,
                                          "accuracy": c / n if n else float("nan")})
        return finish_score(out)
