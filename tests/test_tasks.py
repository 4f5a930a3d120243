"""Tasks: deterministic generators, disjoint splits, correct layouts, scorers checked on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from bsbr.tasks import SPLITS, get_task, list_tasks
from bsbr.tasks.base import Batch, split_of_rows
from bsbr.tasks.corpora import load_corpus, stdlib_root, wikitext_corpus
from bsbr.tasks.listops import CLOSE, DIGIT0, EQUALS, OP0, evaluate_tokens
from bsbr.train.evaluate import merge_scores

SMALL = {
    "mqar": {"seq_len": 64, "vocab_size": 64, "num_kv_pairs": 4},
    "passkey": {"seq_len": 128},
    "selective_copy": {"seq_len": 40, "num_tokens": 6, "num_symbols": 8},
    "listops": {"seq_len": 64, "max_depth": 3},
    "lm": {"seq_len": 64, "corpus": "prose"},
}


def perfect_logits(batch: Batch, vocab: int) -> torch.Tensor:
    """Logits whose argmax at t - 1 is labels[t] wherever labels[t] is scored (HF shift)."""
    b, t = batch.labels.shape
    logits = torch.zeros(b, t, vocab)
    rows, cols = (batch.labels[:, 1:] != -100).nonzero(as_tuple=True)
    logits[rows, cols, batch.labels[rows, cols + 1]] = 10.0
    return logits


def test_list_tasks():
    assert list_tasks() == ["mqar", "passkey", "selective_copy", "listops", "lm"]


@pytest.mark.parametrize("name", list(SMALL))
def test_deterministic_and_seeded(name):
    task = get_task(name, **SMALL[name])
    a, b = task.batch("train", 6, 3), task.batch("train", 6, 3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    again = get_task(name, **SMALL[name]).batch("train", 6, 3)  # a fresh object gives the same batch
    assert torch.equal(a.input_ids, again.input_ids)
    assert not torch.equal(a.input_ids, task.batch("train", 6, 4).input_ids)
    if name != "lm":  # the corpus is fixed; synthetic data follows the seed
        other = get_task(name, **SMALL[name], seed=1).batch("train", 6, 3)
        assert not torch.equal(a.input_ids, other.input_ids)
    assert a.input_ids.shape == (6, task.seq_len) and a.input_ids.dtype == torch.long
    assert int(a.input_ids.max()) < task.vocab_size and int(a.input_ids.min()) >= 0
    assert bool((a.labels[:, 1:] != -100).any()) and bool((a.labels[:, 0] == -100).all() or name == "lm")


@pytest.mark.parametrize("name", ["mqar", "passkey", "selective_copy", "listops"])
def test_synthetic_splits_disjoint(name):
    task = get_task(name, **SMALL[name])
    rows = {}
    for split in SPLITS:
        ids = torch.cat([task.batch(split, 16, i).input_ids for i in range(3)])
        assert split_of_rows(ids) == [split] * ids.shape[0]  # each row hashes to the split it was drawn for
        rows[split] = {tuple(r) for r in ids.tolist()}
    assert not rows["train"] & rows["valid"] and not rows["train"] & rows["test"] and not rows["valid"] & rows["test"]


def test_mqar_layout():
    task = get_task("mqar", seq_len=128, vocab_size=100, num_kv_pairs=8)
    batch = task.batch("train", 32, 0)
    half = 50
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        keys, values = ids[0:16:2], ids[1:16:2]
        assert all(1 <= k < half for k in keys) and len(set(keys)) == 8
        assert all(half <= v < 100 for v in values) and len(set(values)) == 8
        pairs = dict(zip(keys, values, strict=True))
        scored = [t for t, y in enumerate(labels) if y != -100]
        assert len(scored) == 8 and all(t >= 17 for t in scored)
        assert sorted(ids[t - 1] for t in scored) == sorted(keys)  # every key queried once
        assert all(labels[t] == pairs[ids[t - 1]] for t in scored)
    assert not torch.equal(batch.input_ids[batch.labels != -100], batch.labels[batch.labels != -100])  # labels only


def test_mqar_power_law_places_queries_early():
    task = get_task("mqar", seq_len=256, vocab_size=512, num_kv_pairs=16)
    labels = torch.cat([task.batch("train", 64, i).labels for i in range(2)])
    slots = ((labels[:, 32:] != -100).nonzero()[:, 1] - 1) // 2  # query slot index in the query section
    early = (slots < 11).float().mean().item()  # first 10% of the 112 slots
    assert early > 0.3, f"power-law placement should favour early slots, got {early:.2f} in the first 10%"
    assert int(slots.max()) > 50  # ... with a tail far away


def test_passkey_layout_and_depth_scoring():
    task = get_task("passkey", seq_len=300, digits=4, depth=0.5)
    batch = task.batch("test", 4, 0)
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        text = bytes(ids)
        number = bytes(y for y in labels if y != -100)
        assert len(number) == 4 and number.isdigit() and text.endswith(number)
        pos = text.index(b"hidden number is " + number)
        assert 0.3 < pos / len(text) < 0.7
    rnd = get_task("passkey", seq_len=300, depth_buckets=2)
    batch = rnd.batch("valid", 8, 0)
    logits = perfect_logits(batch, 256)
    deep = batch.meta["depth"] >= 0.5
    logits[deep, 300 - 2] = 0.0  # wreck the last digit (predicted at T - 2) of every deep example
    out = rnd.score(logits, batch)
    shallow_n, deep_n = int((~deep).sum()), int(deep.sum())
    assert [d["total"] for d in out["by_depth"]] == [shallow_n, deep_n]
    assert [d["correct"] for d in out["by_depth"]] == [shallow_n, 0]
    assert out["total"] == 8 * 4 + 8 and out["correct"] == out["total"] - deep_n  # 5 digits by default


def test_selective_copy_layout():
    task = get_task("selective_copy", seq_len=30, num_tokens=5, num_symbols=4)
    batch = task.batch("train", 8, 0)
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        context, tail = ids[:24], ids[25:]
        assert ids[24] == task.marker
        assert [t for t in context if t != 0] == tail == [y for y in labels if y != -100]
        assert all(1 <= t <= 4 for t in tail)


def test_listops_interpreter_hand_made():
    tok = {"[MIN": OP0, "[MAX": OP0 + 1, "[MED": OP0 + 2, "[SM": OP0 + 3, "]": CLOSE}
    tok.update({str(d): DIGIT0 + d for d in range(10)})
    cases = {"[MAX 2 9 [MIN 4 7 ] 0 ]": 9, "[MIN 3 [MAX 8 1 ] 5 ]": 3, "[MED 1 7 3 9 ]": 3, "[MED 4 2 8 ]": 4,
             "[SM 9 8 7 ]": 4, "[SM [MAX 5 6 ] [MIN 9 9 ] ]": 5, "7": 7}
    for text, value in cases.items():
        assert evaluate_tokens([tok[s] for s in text.split()]) == value, text
    with pytest.raises(ValueError, match="unbalanced"):
        evaluate_tokens([tok["[MAX"], tok["1"]])


def test_listops_labels_match_interpreter_and_scorer_is_10_way():
    task = get_task("listops", seq_len=96, max_depth=4)
    batch = task.batch("train", 16, 0)
    for ids, labels, mask in zip(batch.input_ids.tolist(), batch.labels.tolist(), batch.attention_mask.tolist(),
                                 strict=True):
        n = sum(mask)
        assert ids[n - 2] == EQUALS and labels[n - 1] == ids[n - 1] and sum(y != -100 for y in labels) == 1
        assert evaluate_tokens(ids[: n - 2]) == ids[n - 1] - DIGIT0
        assert all(t == 0 for t in ids[n:])
    logits = perfect_logits(batch, task.vocab_size)
    logits[:, :, EQUALS] = 100.0  # a non-digit token scores highest everywhere; the 10-way argmax ignores it
    assert task.score(logits, batch)["accuracy"] == 1.0


@pytest.mark.parametrize("name", list(SMALL))
def test_scorer_hand_made(name):
    task = get_task(name, **SMALL[name])
    batch = task.batch("valid", 4, 0)
    logits = perfect_logits(batch, task.vocab_size)
    out = task.score(logits, batch)
    n = int((batch.labels[:, 1:] != -100).sum())
    assert out["correct"] == out["total"] == n and out["accuracy"] == 1.0 and out["examples_correct"] == 4
    rows, cols = (batch.labels[:, 1:] != -100).nonzero(as_tuple=True)
    logits[rows[0], cols[0]] = 0.0
    logits[rows[0], cols[0], (batch.labels[rows[0], cols[0] + 1] + 1) % task.vocab_size] = 10.0
    out = task.score(logits, batch)
    assert out["correct"] == n - 1 and out["examples_correct"] == 3
    uniform = task.score(torch.zeros_like(logits), batch)
    assert math.isclose(uniform["nll_sum"], n * math.log(task.vocab_size), rel_tol=1e-5)
    with pytest.raises(ValueError, match="logits must have shape"):
        task.score(logits[:, :-1], batch)


def test_lm_python_corpus_found_and_split():
    data = load_corpus("python")
    assert all(len(data[s]) > 100_000 for s in SPLITS)
    assert b"def " in data["train"] and stdlib_root().is_dir()
    task = get_task("lm", seq_len=128, corpus="python")
    assert task.options["corpus"] == "python" and task.vocab_size == 256


def test_lm_valid_windows_tile_the_split_and_buckets_add_up():
    task = get_task("lm", seq_len=100, corpus="prose", position_buckets=4)
    n = task.split_bytes("valid") // 100
    a, b = task.batch("valid", 3, 0), task.batch("valid", 3, 1)
    joined = torch.cat([a.input_ids.flatten(), b.input_ids.flatten()])
    assert torch.equal(joined, task._data["valid"][:600].long())  # consecutive, non-overlapping windows
    assert task.num_batches("valid", 3) == math.ceil(n / 3)
    last = task.batch("valid", 3, task.num_batches("valid", 3) - 1)  # rows past the end are not scored twice
    assert int((last.labels != -100).any(dim=1).sum()) == n - 3 * (task.num_batches("valid", 3) - 1)
    logits = torch.randn(3, 100, 256)
    out = task.score(logits, a)
    assert sum(out["bucket_total"]) == out["total"] == 3 * 99
    assert math.isclose(sum(out["bucket_nll_sum"]), out["nll_sum"], rel_tol=1e-5)
    merged = merge_scores([out])
    assert math.isclose(merged["bits_per_token"], out["nll_sum"] / out["total"] / math.log(2), rel_tol=1e-9)


def test_lm_directory_corpus_and_bad_paths(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    (tmp_path / "skip.bin").write_bytes(b"\x01\x02")
    task = get_task("lm", seq_len=32, corpus="dir", path=str(tmp_path))
    data = {s: bytes(task._data[s].tolist()) for s in SPLITS}
    assert all(data.values()) and b"\x01\x02" not in b"".join(data.values())
    for i in range(40):  # each document lands in exactly one split
        assert sum(f"document {i} ".encode() * 50 in d for d in data.values()) == 1
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        get_task("lm", corpus="dir", path=str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="holds no files"):
        get_task("lm", corpus="dir", path=str(tmp_path), extensions=[".nope"])
    with pytest.raises(ValueError, match="corpus must be one of"):
        get_task("lm", corpus="novels")


def test_wikitext_loader_on_local_files(tmp_path):
    lines = {"train": [" = Heading = \n", " Some training text about rivers .\n"] * 50,
             "validation": [" Validation words here .\n"] * 20, "test": [" Test words here .\n"] * 20}
    for split, text in lines.items():
        (tmp_path / f"wiki.{split}.raw").write_text("".join(text))
    data = wikitext_corpus(str(tmp_path))
    assert data["train"].count(b"training text about rivers") == 50
    assert b"Validation words" in data["valid"] and b"Test words" in data["test"]
    task = get_task("lm", seq_len=16, corpus="wikitext", path=str(tmp_path))
    assert task.batch("test", 2, 0).input_ids.shape == (2, 16)
    with pytest.raises(FileNotFoundError, match="no file for split"):
        (tmp_path / "wiki.test.raw").unlink()
        wikitext_corpus.cache_clear()
        wikitext_corpus(str(tmp_path))


def test_get_task_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_pairs'\]"):
        get_task("mqar", num_pairs=3)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        get_task("mqar", seq_len=0)
    with pytest.raises(ValueError, match="num_kv_pairs must be at most"):
        get_task("mqar", seq_len=32, num_kv_pairs=9)
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("mqar", **SMALL["mqar"]).batch("validation", 2, 0)
    with pytest.raises(ValueError, match="depth must be"):
        get_task("passkey", depth=1.5)
