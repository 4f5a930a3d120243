"""Tasks: seeded generators and offline corpora, each with a batch iterator and a scorer.

    task = get_task("mqar", seq_len=256, num_kv_pairs=16)
    batch = task.batch("train", batch_size=32, index=0)   # Batch(input_ids, labels, attention_mask)
    metrics = task.score(logits, batch)                    # {"correct", "total", "accuracy", ...}
"""

from __future__ import annotations

import inspect

from .base import SPLITS, Batch, Task
from .curriculum import Curriculum, curriculum
from .language_modeling import LanguageModeling
from .listops import ListOps
from .mqar import MQAR
from .passkey import Passkey
from .selective_copy import SelectiveCopy

_TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, Passkey, SelectiveCopy, ListOps, LanguageModeling)}


def list_tasks() -> list[str]:
    """Names accepted by :func:`get_task`."""
    return list(_TASKS)


def get_task(name: str, seq_len: int | None = None, **options) -> Task:
    """Build task ``name`` (see :func:`list_tasks`) for rows of ``seq_len`` tokens (the task's default if None).
    ``options`` are the task's keyword arguments (e.g. ``num_kv_pairs`` for "mqar"); unknown ones are rejected."""
    if not isinstance(name, str) or name.lower().replace("-", "_") not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks are {list_tasks()}")
    cls = _TASKS[name.lower().replace("-", "_")]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "seq_len"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for task {cls.name!r}; it accepts {sorted(accepted)}")
    if seq_len is not None:
        options["seq_len"] = seq_len
    return cls(**options)


__all__ = ["SPLITS", "Batch", "Curriculum", "LanguageModeling", "ListOps", "MQAR", "Passkey", "SelectiveCopy", "Task",
           "curriculum", "get_task", "list_tasks"]
