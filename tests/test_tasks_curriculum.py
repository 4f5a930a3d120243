"""bsbr.tasks.curriculum: stages of shorter rows, then the final task; valid and test always the final task."""

from __future__ import annotations

import json

import pytest
import torch

from bsbr.tasks import Curriculum, curriculum, get_task


def test_curriculum_stages_then_final():
    task = curriculum("mqar", [{"steps": 3, "seq_len": 64, "num_kv_pairs": 4},
                               {"steps": 2, "seq_len": 128, "num_kv_pairs": 8}],
                      seq_len=256, num_kv_pairs=16, vocab_size=512)
    assert isinstance(task, Curriculum) and task.name == "mqar" and task.seq_len == 256
    assert task.curriculum_steps == 5
    lengths = [task.batch("train", 2, i).input_ids.shape[1] for i in range(7)]
    assert lengths == [64, 64, 64, 128, 128, 256, 256]
    pairs = [int((task.batch("train", 2, i).labels[0] != -100).sum()) for i in (0, 3, 5)]
    assert pairs == [4, 8, 16]
    for split in ("valid", "test"):  # always the final task
        assert torch.equal(task.batch(split, 2, 0).input_ids, get_task("mqar", seq_len=256, num_kv_pairs=16,
                                                                       vocab_size=512).batch(split, 2, 0).input_ids)
    assert torch.equal(task.batch("train", 2, 1).input_ids, task.batch("train", 2, 1).input_ids)  # deterministic
    json.dumps(task.options)  # goes into the run's config.json
    assert task.options["curriculum"][1] == {"steps": 2, "seq_len": 128, "seed": 0, "vocab_size": 512,
                                             "num_kv_pairs": 8, "power_a": 0.01, "random_filler": True,
                                             "answers_in_input": False}


def test_curriculum_rejects_bad_stages():
    with pytest.raises(ValueError, match="every stage must be the final task"):
        Curriculum([(3, get_task("passkey", seq_len=128))], get_task("mqar", seq_len=64))
    with pytest.raises(ValueError, match="stage 0 steps"):
        curriculum("mqar", [{"steps": 0, "seq_len": 64}], seq_len=128)
    with pytest.raises(ValueError, match="must be a dict with 'steps'"):
        curriculum("mqar", [{"seq_len": 64}], seq_len=128)
