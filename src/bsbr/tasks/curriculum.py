"""Curriculum: train on easier versions of a task first (shorter rows, fewer pairs), test on the final one.

    task = curriculum("mqar", [{"steps": 1000, "seq_len": 64, "num_kv_pairs": 4},
                               {"steps": 1000, "seq_len": 128, "num_kv_pairs": 8}],
                      seq_len=256, num_kv_pairs=16, vocab_size=8192)

Train batch ``index`` comes from the stage that step ``index`` falls in (the first stage's ``steps`` steps,
then the next stage's, ...; after the last listed stage, the final task).  The valid and test splits are
always the final task's, so a curriculum run is scored exactly like a run without one.  A batch depends only
on (stages, final options, split, index), so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

from .. import _checks
from .base import Batch, Task


class Curriculum(Task):
    """Stages of train batches from ``stages`` [(steps, task)], then ``final``; valid / test from ``final``."""

    name = "curriculum"

    def __init__(self, stages: list[tuple[int, Task]], final: Task):
        if not isinstance(final, Task):
            raise TypeError(f"final must be a Task, got {type(final).__name__}")
        super().__init__(final.seq_len, final.seed)
        self.stages: list[tuple[int, Task]] = []
        for i, stage in enumerate(stages):
            if not (isinstance(stage, tuple | list) and len(stage) == 2 and isinstance(stage[1], Task)):
                raise TypeError(f"stage {i} must be a (steps, task) pair, got {stage!r}")
            steps = _checks.positive_int(f"stage {i} steps", stage[0])
            if stage[1].name != final.name:
                raise ValueError(f"stage {i} is task {stage[1].name!r}; every stage must be the final task "
                                 f"{final.name!r} with other options")
            self.stages.append((steps, stage[1]))
        self.final = final
        self.name = final.name  # scored, logged and reported as the final task
        self.vocab_size = max([final.vocab_size] + [t.vocab_size for _, t in self.stages])
        self.answer_tokens = final.answer_tokens
        self.options = {**final.options, "curriculum": [{"steps": s, **t.options} for s, t in self.stages]}

    @property
    def curriculum_steps(self) -> int:
        """Train steps spent in the stages before the final task."""
        return sum(s for s, _ in self.stages)

    def task_at(self, index: int) -> Task:
        """The task that train batch ``index`` comes from."""
        end = 0
        for steps, task in self.stages:
            end += steps
            if index < end:
                return task
        return self.final

    def batch(self, split: str, batch_size: int, index: int) -> Batch:
        if split == "train":
            _checks.non_negative_int("index", index)
            return self.task_at(index).batch(split, batch_size, index)
        return self.final.batch(split, batch_size, index)

    def score(self, logits, batch: Batch) -> dict:
        return self.final.score(logits, batch)


def curriculum(name: str, stages: list[dict], **final_options) -> Curriculum:
    """A :class:`Curriculum` of task ``name``: each stage a dict of that task's options plus ``steps``;
    ``final_options`` build the final task (unset stage options default to the final task's)."""
    from . import get_task

    final = get_task(name, **final_options)
    built = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or "steps" not in stage:
            raise ValueError(f"curriculum stage {i} must be a dict with 'steps' and task options, got {stage!r}")
        opts = {**final_options, **{k: v for k, v in stage.items() if k != "steps"}}
        built.append((stage["steps"], get_task(name, **opts)))
    return Curriculum(built, final)
