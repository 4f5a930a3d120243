"""evaluate(): a model's loss and task metrics on held-out batches."""

from __future__ import annotations

import math

import torch

from .. import _checks
from ..tasks import SPLITS, Task

_SUMMED = ("correct", "total", "nll_sum", "examples_correct", "examples")


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def merge_scores(parts: list[dict]) -> dict:
    """Combine per-batch ``task.score`` dicts into totals and derived metrics.

    Returns {"loss" (mean nll per scored token, nats), "perplexity", "bits_per_token" (bits per byte for
    byte-level tasks), "accuracy", "correct", "total", "example_accuracy", ...} plus, when the task reports
    them, "loss_by_position" / "perplexity_by_position" with "position_edges", "by_depth" (passkey) and
    "by_distance" / "by_remaining" (MQAR)."""
    out: dict = {k: sum(p[k] for p in parts) for k in _SUMMED if k in parts[0]}
    total = out.get("total", 0)
    out["loss"] = out["nll_sum"] / total if total else float("nan")
    out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 700 else float("inf")
    out["bits_per_token"] = out["loss"] / math.log(2)
    out["accuracy"] = out["correct"] / total if total else float("nan")
    if out.get("examples"):
        out["example_accuracy"] = out["examples_correct"] / out["examples"]
    if "bucket_nll_sum" in parts[0]:
        nll = [sum(x) for x in zip(*(p["bucket_nll_sum"] for p in parts), strict=True)]
        cnt = [sum(x) for x in zip(*(p["bucket_total"] for p in parts), strict=True)]
        out["position_edges"] = parts[0]["bucket_edges"]
        out["loss_by_position"] = [a / b if b else float("nan") for a, b in zip(nll, cnt, strict=True)]
        out["perplexity_by_position"] = [math.exp(x) if x == x and x < 700 else float("nan")
                                         for x in out["loss_by_position"]]
    for name, lo, hi in (("by_depth", "depth_lo", "depth_hi"), ("by_distance", "distance_lo", "distance_hi"),
                         ("by_remaining", "remaining_lo", "remaining_hi")):
        if name in parts[0]:
            rows = []
            for i, first in enumerate(parts[0][name]):
                c = sum(p[name][i]["correct"] for p in parts)
                n = sum(p[name][i]["total"] for p in parts)
                rows.append({lo: first[lo], hi: first[hi], "correct": c, "total": n,
                             "accuracy": c / n if n else float("nan")})
            out[name] = rows
    return out


@torch.no_grad()
def evaluate(lm: torch.nn.Module, task: Task, split: str = "test", batch_size: int = 32,
             num_batches: int | None = None, device: str | torch.device | None = None, bf16: bool = False,
             start_index: int = 0) -> dict:
    """Score ``lm`` on batches ``start_index ..`` of ``split`` (each [batch_size, task.seq_len]).

    ``num_batches``: how many; None means the whole split for tasks that can say (``task.num_batches``,
    e.g. "lm") and 8 otherwise.  Returns :func:`merge_scores`' dict plus "split", "batches" and
    "batch_size".  The model is put in eval mode and restored to its previous mode afterwards.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a bsbr.tasks.Task (from get_task), got {type(task).__name__}")
    _checks.one_of("split", split, SPLITS)
    _checks.positive_int("batch_size", batch_size)
    if num_batches is None:
        num_batches = task.num_batches(split, batch_size) if hasattr(task, "num_batches") else 8
    _checks.positive_int("num_batches", num_batches)
    if device is None:
        device = next(lm.parameters()).device
    device = torch.device(device)
    vocab = getattr(getattr(lm, "config", None), "vocab_size", None)
    if vocab is not None and vocab < task.vocab_size:
        raise ValueError(f"model vocab_size={vocab} is smaller than task {task.name!r} vocab_size={task.vocab_size}")
    was_training = lm.training
    lm.eval()
    try:
        parts = []
        for i in range(start_index, start_index + num_batches):
            batch = task.batch(split, batch_size, i).to(device)
            with _autocast(device, bf16):
                logits = lm(batch.input_ids, attention_mask=batch.attention_mask).logits
            parts.append(task.score(logits.float(), batch))
    finally:
        lm.train(was_training)
    return {"split": split, "batches": num_batches, "batch_size": batch_size, **merge_scores(parts)}
