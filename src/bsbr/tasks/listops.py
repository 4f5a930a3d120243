"""ListOps (Nangia & Bowman 2018; Long Range Arena): evaluate a nested expression, 10-way classification.

Expressions are generated here: operators MIN, MAX, MED (median, lower middle for even counts) and SM (sum
mod 10) over digits 0-9 and sub-expressions, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9.  One token per
symbol; the row is ``expression = answer`` followed by padding (attention_mask 0).  Only the answer is
scored, and the prediction is the argmax over the ten digit tokens.

Token ids: 0 padding, 1..10 digits 0..9, 11 ``[MIN``, 12 ``[MAX``, 13 ``[MED``, 14 ``[SM``, 15 ``]``, 16 ``=``.
"""

from __future__ import annotations

import random

import torch

from .. import _checks
from .base import Batch, Task

OPS = ("MIN", "MAX", "MED", "SM")
DIGIT0, OP0, CLOSE, EQUALS = 1, 11, 15, 16


def apply_op(op: str, args: list[int]) -> int:
    """The value of ``op`` over ``args`` (digits 0-9)."""
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "MED":
        return sorted(args)[(len(args) - 1) // 2]
    if op == "SM":
        return sum(args) % 10
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def evaluate_tokens(tokens: list[int]) -> int:
    """Evaluate an expression given as token ids (no ``=``/answer/padding): the reference interpreter."""
    stack: list[tuple[str, list[int]]] = []
    result = None
    for tok in tokens:
        if OP0 <= tok < OP0 + len(OPS):
            stack.append((OPS[tok - OP0], []))
        elif tok == CLOSE:
            op, args = stack.pop()
            value = apply_op(op, args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif DIGIT0 <= tok < DIGIT0 + 10:
            if stack:
                stack[-1][1].append(tok - DIGIT0)
            else:
                result = tok - DIGIT0
        else:
            raise ValueError(f"token {tok} is not part of a ListOps expression")
    if stack or result is None:
        raise ValueError("unbalanced ListOps expression")
    return result


def to_text(tokens: list[int]) -> str:
    names = {CLOSE: "]", EQUALS: "=", 0: "_"}
    names.update({DIGIT0 + d: str(d) for d in range(10)})
    names.update({OP0 + i: "[" + op for i, op in enumerate(OPS)})
    return " ".join(names[t] for t in tokens)


class ListOps(Task):
    name = "listops"
    vocab_size = 17

    def __init__(self, seq_len: int = 512, seed: int = 0, max_depth: int = 6, max_args: int = 5,
                 min_length: int | None = None):
        super().__init__(seq_len, seed)
        if seq_len < 8:
            raise ValueError(f"seq_len must be at least 8 for listops, got {seq_len}")
        self.max_depth = _checks.positive_int("max_depth", max_depth)
        self.max_args = _checks.positive_int("max_args", max_args)
        if max_args < 2:
            raise ValueError(f"max_args must be at least 2, got {max_args}")
        self.min_length = seq_len // 4 if min_length is None else _checks.non_negative_int("min_length", min_length)
        if self.min_length > seq_len - 2:
            raise ValueError(f"min_length must be at most seq_len - 2 = {seq_len - 2}, got {self.min_length}")
        self.options.update(max_depth=self.max_depth, max_args=self.max_args, min_length=self.min_length)
        self.answer_tokens = torch.arange(DIGIT0, DIGIT0 + 10)

    def _expr(self, rng: random.Random, depth: int, budget: int) -> tuple[list[int], int]:
        """A random expression of at most ``budget`` tokens: (tokens, value)."""
        if depth >= self.max_depth or budget < 4 or (depth > 0 and rng.random() < 0.25):
            d = rng.randrange(10)
            return [DIGIT0 + d], d
        op = rng.randrange(len(OPS))
        nargs = rng.randint(2, min(self.max_args, budget - 2))
        tokens, values = [OP0 + op], []
        left = budget - 2  # room for the arguments (the operator and the closing bracket are counted)
        for i in range(nargs):
            reserve = nargs - i - 1  # every later argument needs at least one token
            sub, value = self._expr(rng, depth + 1, left - reserve)
            tokens += sub
            values.append(value)
            left -= len(sub)
        tokens.append(CLOSE)
        return tokens, apply_op(OPS[op], values)

    def _generate(self, rows: int, g: torch.Generator) -> Batch:
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
        t = self.seq_len
        ids = torch.zeros(rows, t, dtype=torch.long)
        labels = torch.full((rows, t), -100, dtype=torch.long)
        mask = torch.zeros(rows, t, dtype=torch.long)
        for r in range(rows):
            for _ in range(100):
                tokens, value = self._expr(rng, 0, t - 2)
                if len(tokens) >= self.min_length:
                    break
            n = len(tokens)
            ids[r, :n] = torch.tensor(tokens)
            ids[r, n] = EQUALS
            ids[r, n + 1] = DIGIT0 + value
            labels[r, n + 1] = DIGIT0 + value
            mask[r, : n + 2] = 1
        return Batch(ids, labels, mask)
