"""MQAR and passkey details the experiments rely on: the needle at an exact depth, passkey rows scored on every
byte or on the digits, MQAR's query-to-key distances and their score buckets, and answers as labels only."""

from __future__ import annotations

import pytest
import torch

from bsbr.tasks import get_task
from bsbr.tasks.passkey import QUESTION, Passkey


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.6, 1.0])
def test_passkey_needle_sits_at_depth_and_is_scored(depth):
    task = get_task("passkey", seq_len=400, depth=depth, depth_buckets=1)
    batch = task.batch("test", 3, 0)
    haystack = 400 - task._tail_len - task._needle_len
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        text, number = bytes(ids), bytes(y for y in labels if y != -100)
        start = text.index(Passkey._needle(number))
        assert start == round(depth * haystack)  # exactly depth of the filler before the needle
        assert text.endswith(QUESTION + number) and text.count(number) == 2
    logits = torch.zeros(3, 400, 256)
    rows, cols = (batch.labels[:, 1:] != -100).nonzero(as_tuple=True)
    logits[rows, cols, batch.labels[rows, cols + 1]] = 5.0
    assert task.score(logits, batch)["examples_correct"] == 3
    wrong = logits.clone()
    wrong[0, 400 - 3] = 0.0
    wrong[0, 400 - 3, ord("0") + (int(batch.labels[0, -2]) - ord("0") + 1) % 10] = 5.0  # one digit off in row 0
    out = task.score(wrong, batch)
    assert out["examples_correct"] == 2 and out["correct"] == out["total"] - 1
    assert out["by_depth"][0]["correct"] == 2


def test_passkey_train_all_bytes_labels_train_rows_only():
    task = get_task("passkey", seq_len=200, train_all_bytes=True)
    train = task.batch("train", 2, 0)
    assert torch.equal(train.labels[:, 1:], train.input_ids[:, 1:]) and bool((train.labels[:, 0] == -100).all())
    test = task.batch("test", 2, 0)
    assert int((test.labels != -100).sum()) == 2 * 5  # the digits only
    assert "train_all_bytes" not in get_task("passkey", seq_len=200).options  # old runs' batches unchanged
    with pytest.raises(TypeError, match="train_all_bytes"):
        get_task("passkey", train_all_bytes="yes")


@pytest.mark.parametrize("seq_len,random_filler", [(64, False), (256, True)])
def test_mqar_distance_points_at_the_queried_key(seq_len, random_filler):
    task = get_task("mqar", seq_len=seq_len, vocab_size=256, random_filler=random_filler)
    b = task.batch("test", 16, 3)
    dist, ids, labels = b.meta["distance"], b.input_ids, b.labels
    scored = labels != -100
    assert bool(((dist > 0) == scored).all())  # a distance exactly where a value is scored
    r, t = scored.nonzero(as_tuple=True)
    key_pos = t - 1 - dist[r, t]
    assert bool((key_pos >= 0).all() and (key_pos < 2 * task.num_kv_pairs).all() and (key_pos % 2 == 0).all())
    assert torch.equal(ids[r, key_pos], ids[r, t - 1])  # the queried key, in the pairs
    assert torch.equal(ids[r, key_pos + 1], labels[r, t])  # followed there by the scored value
    rem = b.meta["remaining"]
    assert bool(((rem > 0) == scored).all())
    for row in range(16):  # in position order the queries count down from N unqueried pairs to 1
        assert rem[row][scored[row]].tolist() == list(range(task.num_kv_pairs, 0, -1))


def test_mqar_score_by_distance_buckets():
    task = get_task("mqar", seq_len=256, vocab_size=256)
    b = task.batch("test", 8, 0)
    logits = torch.zeros(*b.labels.shape, 256)
    nxt = b.labels[:, 1:]
    far = b.meta["distance"][:, 1:] > 64  # an oracle that answers only the queries at most 64 tokens away
    logits[:, :-1].scatter_(2, torch.where(far, 0, nxt.clamp(min=0)).unsqueeze(-1), 1.0)
    out = task.score(logits, b)
    edges = [(x["distance_lo"], x["distance_hi"]) for x in out["by_distance"]]
    assert edges == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256)]
    assert sum(x["total"] for x in out["by_distance"]) == out["total"] == 8 * 16
    assert all(x["accuracy"] == (1.0 if x["distance_hi"] <= 64 else 0.0) for x in out["by_distance"] if x["total"])
    assert [(x["remaining_lo"], x["remaining_hi"]) for x in out["by_remaining"]] == [(0, 1), (1, 2), (2, 4), (4, 8),
                                                                                      (8, 16)]
    assert [x["total"] for x in out["by_remaining"]] == [8, 8, 16, 32, 64]
    last = b.meta["remaining"][:, 1:] == 1  # an oracle right only on each row's last query
    logits = torch.zeros(*b.labels.shape, 256)
    logits[:, :-1].scatter_(2, torch.where(last, nxt.clamp(min=0), 0).unsqueeze(-1), 1.0)
    assert [x["accuracy"] for x in task.score(logits, b)["by_remaining"]] == [1.0, 0.0, 0.0, 0.0, 0.0]
    from bsbr.train.evaluate import merge_scores

    merged = merge_scores([out, out])
    assert [x["total"] for x in merged["by_distance"]] == [2 * x["total"] for x in out["by_distance"]]


def test_mqar_answers_are_labels_only_unless_asked():
    """Zoology's MQAR: the token after a query is filler in the input, so no query sees earlier answers (which
    would let a model answer by elimination); answers_in_input=True is the earlier task, batch for batch."""
    import hashlib

    hidden = get_task("mqar", seq_len=256, vocab_size=256, random_filler=False).batch("test", 4, 2)
    scored = hidden.labels != -100
    assert bool((hidden.input_ids[scored] == 0).all()) and bool((hidden.labels[scored] >= 128).all())
    shown = get_task("mqar", seq_len=256, vocab_size=256, random_filler=False, answers_in_input=True)
    b = shown.batch("test", 4, 2)
    assert torch.equal(b.input_ids[b.labels != -100], b.labels[b.labels != -100])
    # sha256 of this batch's ids and labels as drawn before the option existed (commit d2f926a)
    digest = hashlib.sha256(b.input_ids.numpy().tobytes() + b.labels.numpy().tobytes()).hexdigest()
    assert digest == "d7aafc980822ec112be4f9335d359e3656e2c7aa82d687c81114215a071fbb2e"
    assert shown.options["answers_in_input"] is True and "answers_in_input" in get_task("mqar").options
    with pytest.raises(ValueError, match="answers_in_input must be True or False, got 'yes'"):
        get_task("mqar", answers_in_input="yes")
