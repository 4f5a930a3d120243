"""Issue 14: the curriculum task, passkey needles at an exact depth, the two new experiment scripts (tiny
budgets), a killed cell resuming to the same result as an uninterrupted one, and --device cuda refused clearly
where there is no GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bsbr.tasks import Curriculum, curriculum, get_task
from bsbr.tasks.passkey import QUESTION, Passkey

ROOT = Path(__file__).resolve().parents[1]


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


def _run(script: str, args: list[str], tmp: Path, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BSBR_EXP_RESULTS": str(tmp / "results"),
           "BSBR_EXP_RUNS": str(tmp / "runs"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "experiments" / script), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


PASSKEY = ["--models", "BSBR", "Standard", "--train-len", "128", "--stage-lengths", "96", "--stage-steps", "2",
           "--steps", "4", "--batch-size", "2", "--depths", "0", "1", "--lengths", "128", "256",
           "--long-lengths", "512", "--test-rows", "1", "--long-test-rows", "1"]
RECALL = ["--models", "Standard", "GAU", "--lengths", "64", "--stage-lengths", "32", "--stage-steps", "2",
          "--steps", "4", "--hiddens", "32", "--seeds", "0", "1", "--test-batches", "1", "--batch-size", "4"]


def test_passkey_script_grid(tmp_path, monkeypatch):
    proc = _run("passkey_depth.py", PASSKEY, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results" / "passkey_depth.json").read_text())["runs"]
    cells = {m: {(c["length"], c["depth"]) for c in r["depth_grid"]} for m, r in runs.items()}
    assert cells["BSBR"] == {(t, d) for t in (128, 256, 512) for d in (0.0, 1.0)}
    assert cells["Standard"] == {(t, d) for t in (128, 256) for d in (0.0, 1.0)}  # quadratic: no long lengths
    assert runs["BSBR"]["task"]["curriculum"][0]["seq_len"] == 96
    again = _run("passkey_depth.py", PASSKEY, tmp_path)
    assert again.stderr.count("done earlier, skipped") == 2
    lines = _report(tmp_path, monkeypatch).passkey_depth_section("passkey_depth")
    assert "| Standard |" in "\n".join(lines) and "not run" in "\n".join(lines)  # quadratic: no 512 column value
    assert (tmp_path / "figures" / "passkey_depth.png").stat().st_size > 0


def _load_experiment(script: str):
    """experiments/<script>, loaded fresh as a module (experiments/ on sys.path while it loads, for ``_exp``)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec = importlib.util.spec_from_file_location(f"exp_{script[:-3]}", ROOT / "experiments" / script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return mod


def _report(tmp: Path, monkeypatch):
    """experiments/report.py reading tmp/results and drawing into tmp/figures."""
    mod = _load_experiment("report.py")
    monkeypatch.setattr(mod.common, "RESULTS", tmp / "results")
    monkeypatch.setattr(mod.common, "FIGS", tmp / "figures")
    mod.common.FIGS.mkdir(exist_ok=True)

    class Sections:
        def passkey_depth_section(self, name):
            lines = []
            mod.passkey_depth(lines, name)
            return lines

        def recall_section(self, name):
            lines = []
            mod.recall_curriculum(lines, name)
            return lines

    return Sections()


def test_recall_curriculum_script_grid(tmp_path, monkeypatch):
    proc = _run("recall_curriculum.py", RECALL, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results" / "recall_curriculum.json").read_text())["runs"]
    assert sorted(runs) == [f"{m}|T=64|h=32|lr=0.003|seed={s}" for m in ("GAU", "Standard") for s in (0, 1)]
    r = runs["Standard|T=64|h=32|lr=0.003|seed=1"]
    assert r["train"]["seed"] == 1 and r["task"]["curriculum"] == [
        {"steps": 2, "seq_len": 32, "seed": 0, "vocab_size": 256, "num_kv_pairs": 2, "power_a": 0.01,
         "random_filler": False, "answers_in_input": False}]
    assert runs["GAU|T=64|h=32|lr=0.003|seed=0"]["model_options"]["qk_scale_init"] == 0.5
    text = "\n".join(_report(tmp_path, monkeypatch).recall_section("recall_curriculum"))
    assert "(n=2)" in text and "--seeds 0 1" in text and "--stage-steps 2" in text
    assert "| Standard (2 seeds pooled) |" in text and "*elimination (1/remaining)*" in text
    assert "--answers-in-input" not in text and "answers as labels only" in text


def test_killed_cell_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGTERM mid-training: the loop checkpoints; the rerun continues from there and ends where a run that
    was never stopped ends (same test loss to the bit)."""
    args = ["--models", "Standard", "--lengths", "64", "--stage-lengths", "32", "--stage-steps", "20",
            "--steps", "400", "--hiddens", "32", "--seeds", "0", "--test-batches", "1", "--batch-size", "4",
            "--checkpoint-every", "10"]
    ref = _run("recall_curriculum.py", args, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = _run("recall_curriculum.py", args, tmp_path / "cut", wait=False)
    state = next(iter((tmp_path / "cut" / "runs").glob("*/*/")), None)
    deadline = time.time() + 120
    while time.time() < deadline and (state is None or not (state / "checkpoint" / "state.json").exists()):
        time.sleep(0.05)
        state = next(iter((tmp_path / "cut" / "runs").glob("*/*/")), None)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    step = json.loads((state / "checkpoint" / "state.json").read_text())["step"]
    assert 0 < step < 400 and not (tmp_path / "cut" / "results" / "recall_curriculum.json").exists()
    again = _run("recall_curriculum.py", args, tmp_path / "cut")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (next(iter(json.loads((tmp_path / d / "results" / "recall_curriculum.json").read_text())["runs"]
                      .values())) for d in ("ref", "cut"))
    assert b["steps"] == 400 and [c["step"] for c in b["curve"]] == [c["step"] for c in a["curve"]]
    assert b["test"]["loss"] == a["test"]["loss"] and b["valid"]["loss"] == a["valid"]["loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("script", ["passkey_depth.py", "recall_curriculum.py"])
def test_device_cuda_refused_without_gpu(tmp_path, script):
    proc = _run(script, ["--device", "cuda"], tmp_path)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_passkey_train_all_bytes_labels_train_rows_only():
    task = get_task("passkey", seq_len=200, train_all_bytes=True)
    train = task.batch("train", 2, 0)
    assert torch.equal(train.labels[:, 1:], train.input_ids[:, 1:]) and bool((train.labels[:, 0] == -100).all())
    test = task.batch("test", 2, 0)
    assert int((test.labels != -100).sum()) == 2 * 5  # the digits only
    assert "train_all_bytes" not in get_task("passkey", seq_len=200).options  # old runs' batches unchanged
    with pytest.raises(TypeError, match="train_all_bytes"):
        get_task("passkey", train_all_bytes="yes")


def _exp_module(tmp_path, monkeypatch):
    """experiments/_exp.py, loaded fresh, writing its results under ``tmp_path``."""
    exp = _load_experiment("_exp.py")
    monkeypatch.setattr(exp, "RESULTS", tmp_path)
    monkeypatch.setattr(exp, "environment", lambda: {"threads": 1})
    return exp


def test_run_grid_keeps_cells_another_process_saved(tmp_path, monkeypatch):
    """Two processes filling one results file: each save re-reads the file, so neither drops the other's cells,
    and a cell the other one finished meanwhile is skipped rather than trained twice."""
    exp = _exp_module(tmp_path, monkeypatch)
    trained = []

    def fn(key):
        trained.append(key)
        if key == "a":  # meanwhile, "another process" finishes cells x and c
            exp.run_grid("grid", {"who": "other"}, [("x", {}), ("c", {})], lambda key: {"by": "other"}, pass_key=True)
        return {"by": "this"}

    data = exp.run_grid("grid", {"who": "this"}, [("a", {}), ("b", {}), ("c", {})], fn, pass_key=True)
    assert trained == ["a", "b"]  # c was done by the other process before this one reached it
    on_disk = json.loads((tmp_path / "grid.json").read_text())
    assert on_disk == data
    assert {k: r["by"] for k, r in on_disk["runs"].items()} == {"x": "other", "c": "other", "a": "this", "b": "this"}


def test_run_grid_records_each_runs_environment(tmp_path, monkeypatch):
    """Every run keeps the environment (commit included) of the process that trained it: the file-level one is the
    last writer's, so a file filled by several invocations would otherwise lose which commit made which run."""
    exp = _exp_module(tmp_path, monkeypatch)
    monkeypatch.setattr(exp, "environment", lambda: {"threads": 1, "commit": "aaa"})
    exp.run_grid("grid", {}, [("a", {})], lambda: {"ok": 1})
    monkeypatch.setattr(exp, "environment", lambda: {"threads": 1, "commit": "bbb+dirty", "dirty_paths": ["src/x.py"]})
    data = exp.run_grid("grid", {}, [("a", {}), ("b", {})], lambda: {"ok": 1})
    assert data["runs"]["a"]["environment"]["commit"] == "aaa"
    assert data["runs"]["b"]["environment"]["commit"] == "bbb+dirty"
    assert data["runs"]["b"]["environment"]["dirty_paths"] == ["src/x.py"]
    assert data["environment"]["commit"] == "bbb+dirty"  # the last writer's


def test_code_state_names_uncommitted_source(tmp_path, capsys):
    """A change to tracked code makes the commit "<sha>+dirty" with the paths and a warning; a changed results file
    (an output every grid rewrites) does not."""
    import subprocess

    bench = _load_experiment("_exp.py")._bench  # benchmarks/common.py

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "r.json").write_text("{}")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (tmp_path / "experiments" / "results" / "r.json").write_text('{"runs": {}}')
    clean = bench.code_state(tmp_path)
    assert "+dirty" not in clean["commit"] and "dirty_paths" not in clean
    (tmp_path / "src" / "m.py").write_text("x = 2\n")
    dirty = bench.code_state(tmp_path)
    assert dirty["commit"] == clean["commit"] + "+dirty" and dirty["dirty_paths"] == ["src/m.py"]
    assert "src/m.py" in capsys.readouterr().err


def test_run_grid_refuses_a_done_cell_trained_with_other_settings(tmp_path, monkeypatch):
    """A key already in the file but recorded with another job stops the grid, naming the difference, instead of
    being skipped as done; the same job is skipped, and a change of checkpoint_every alone does not count."""
    exp = _exp_module(tmp_path, monkeypatch)
    job = {"model": "Standard", "train_opts": {"steps": 10, "batch_size": 32, "checkpoint_every": 5}}
    exp.run_grid("grid", {}, [("a", job)], lambda **j: {"ok": 1})
    trained = []
    same = {**job, "train_opts": {**job["train_opts"], "checkpoint_every": 50}}
    exp.run_grid("grid", {}, [("a", same)], lambda **j: trained.append(j))
    assert trained == []
    other = {**job, "train_opts": {**job["train_opts"], "batch_size": 128}}
    with pytest.raises(SystemExit, match=r"cell 'a', trained with other settings \(recorded -> now: "
                                         r"train_opts\.batch_size: 32 -> 128\); give this grid its own --tag"):
        exp.run_grid("grid", {}, [("a", other)], lambda **j: trained.append(j))
    assert trained == [] and json.loads((tmp_path / "grid.json").read_text())["runs"]["a"]["ok"] == 1


def test_recall_sweep_with_evals_draws_its_curve(tmp_path, monkeypatch):
    i = RECALL.index("--seeds")
    args = RECALL[: i + 2] + RECALL[i + 3:] + ["--eval-every", "2", "--tag", "probe"]  # seed 0 only
    proc = _run("recall_curriculum.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results" / "recall_curriculum_probe.json").read_text())["runs"]
    assert all([e["step"] for e in r["evals"]] == [2] and r["valid"]["step"] == 4 for r in runs.values())
    text = "\n".join(_report(tmp_path, monkeypatch).recall_section("recall_curriculum_probe"))
    assert "| seed |" in text and "figures/recall_curriculum_probe_curves.png" in text
    assert "Test accuracy by tokens from the query back to its key, T = 64:" in text
    assert (tmp_path / "figures" / "recall_curriculum_probe_curves.png").stat().st_size > 0


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


def test_report_commands_ask_for_the_earlier_task_where_runs_used_it(tmp_path):
    """Runs recorded before answers_in_input existed (no key) or with it set reproduce only with the flag."""
    mod = _load_experiment("_report_common.py")
    old, shown, hidden = ({"name": "mqar", "seq_len": 64}, {"name": "mqar", "answers_in_input": True},
                          {"name": "mqar", "answers_in_input": False})
    assert mod.answers_flag([{"task": old}, {"task": shown}]) == " --answers-in-input"
    assert mod.answers_flag([{"task": hidden}]) == "" and mod.answers_flag([{"task": {"name": "lm"}}]) == ""


def test_report_pools_seeds_but_never_two_settings(tmp_path, monkeypatch):
    """A results file with Standard at two learning rates (one seed and two seeds) and BSBR at one: the report's
    mean +- spread rows pool only seeds of one configuration (lr 1e-3's single run is not averaged into lr 3e-3)."""
    report = _load_experiment("_report_mqar.py")

    def run(model, lr, seed, acc):
        return {"model": model, "model_options": {"hidden_dim": 64, "chunk_size": 32}, "seconds": 60.0, "evals": [],
                "task": {"seq_len": 256, "num_kv_pairs": 16, "curriculum": []},
                "train": {"lr": lr, "seed": seed}, "test": {"accuracy": acc, "loss": 1.0}}

    runs = [run("Standard", 1e-3, 0, 0.10), run("Standard", 3e-3, 0, 0.90), run("Standard", 3e-3, 1, 0.80),
            run("BSBR", 3e-3, 0, 0.40)]
    budget = {"stage_steps": [1], "stage_lengths": [512], "steps": 2, "batch_size": 8, "warmup": 0, "vocab_size": 256,
              "layers": 2, "head_dim": 32, "chunk_size": 32, "test_batches": 1, "zero_filler": True}
    data = {"budget": budget, "runs": {str(i): r for i, r in enumerate(runs)}}
    monkeypatch.setattr(report.common, "load", lambda name: data)
    monkeypatch.setattr(report.common, "FIGS", tmp_path)
    lines = []
    report.recall_curriculum(lines, "recall_curriculum_t")
    rows = {line.split(" | ")[0].strip("| "): line for line in "\n".join(lines).splitlines()
            if line.startswith("| ") and " | 256 | 16 | " in line}
    assert set(rows) == {"BSBR h=64 lr=0.003", "Standard h=64 lr=0.001", "Standard h=64 lr=0.003"}
    assert "0.900 / 0.800" in rows["Standard h=64 lr=0.003"] and "| 0 1 |" in rows["Standard h=64 lr=0.003"]
    assert "0.850" in rows["Standard h=64 lr=0.003"] and "0.100" in rows["Standard h=64 lr=0.001"]
    assert (tmp_path / "recall_curriculum_t.png").is_file()
    # one command per setting, each naming only what ran with it: lr 1e-3 was Standard seed 0 alone
    cmds = [line for line in lines if line.startswith("- hidden ")]
    assert len(cmds) == 2, cmds
    slow = next(c for c in cmds if c.startswith("- hidden 64, lr 0.001:"))
    assert "--models Standard --lengths 256 --hiddens 64 --lrs 0.001 --seeds 0 " in slow and "cells" not in slow
    fast = next(c for c in cmds if c.startswith("- hidden 64, lr 0.003:"))
    assert "--models BSBR Standard " in fast and "--lrs 0.003 --seeds 0 1 " in fast and "--tag t`" in fast
    assert "(3 of the 4 cells it trains are in the file;" in fast


def test_report_refuses_a_file_whose_runs_one_command_would_not_reproduce(monkeypatch):
    """The printed command is built from the file's budget (its last writer's arguments): a run recorded with another
    batch size or curriculum stops the report with the run and the field named, not a command that would not
    reproduce it; runs that agree with the budget pass."""
    report = _load_experiment("_report_mqar.py")
    budget = {"stage_steps": [200], "stage_lengths": [64, 128], "steps": 300, "batch_size": 8, "warmup": 10,
              "vocab_size": 256, "layers": 2, "head_dim": 32, "chunk_size": 32, "test_batches": 1,
              "zero_filler": True, "eval_every": 0}

    def run(seq_len, batch, stages):
        return {"model": "Standard", "seconds": 1.0, "evals": [], "steps": 300,
                "model_options": {"hidden_dim": 64, "num_layers": 2, "num_heads": 2},
                "task": {"seq_len": seq_len, "num_kv_pairs": seq_len // 16, "vocab_size": 256,
                         "random_filler": False, "curriculum": [{"steps": 200, "seq_len": s,
                                                                 "num_kv_pairs": s // 16} for s in stages]},
                "train": {"lr": 3e-3, "seed": 0, "steps": 300, "batch_size": batch, "warmup_steps": 10,
                          "eval_every": 0}, "test": {"accuracy": 0.5, "loss": 1.0}}

    good = [run(128, 8, [64]), run(256, 8, [64, 128])]
    assert report._budget_differences(good, budget) == []
    for bad, field in ((run(256, 16, [64, 128]), "batch size 16 != 8"),
                       (run(256, 8, [64]), "curriculum [(64, 200)] != [(64, 200), (128, 200)]")):
        monkeypatch.setattr(report.common, "load", lambda name, bad=bad: {"budget": budget, "runs": {"a": bad}})
        with pytest.raises(SystemExit, match=re.escape(f"Standard T=256 h=64 lr=0.003 seed 0: {field}")):
            report.recall_curriculum([], "recall_curriculum_x")


def test_report_stage_losses_show_where_a_run_stopped_learning():
    """The stage table averages the curve over each stage's last 100 steps and finds the first logged step of the
    first stage below 0.5 nats; a run that never got there says "never", and a run of another curriculum is left out."""
    report = _load_experiment("_report_mqar.py")
    stage = {"steps": 200, "seq_len": 64, "num_kv_pairs": 4}

    def run(seed, loss_at, stages=(stage,)):
        return {"model": "Standard", "steps": 300, "train": {"seed": seed}, "test": {"accuracy": 0.5},
                "task": {"seq_len": 256, "num_kv_pairs": 16, "curriculum": list(stages)},
                "curve": [{"step": k, "loss": loss_at(k)} for k in range(10, 301, 10)]}

    learns = run(0, lambda k: 2.0 if k < 150 else 0.25)  # falls below 0.5 at step 150, in the first stage
    stuck = run(1, lambda k: 1.5 if k <= 200 else 3.0)
    other = run(2, lambda k: 0.1, stages=({**stage, "seq_len": 32},))
    lines = report._stage_losses([learns, stuck, other], lambda r: r["model"])
    rows = [line for line in "\n".join(lines).splitlines() if line.startswith("| Standard")]
    assert len(rows) == 2, lines
    # stage 1 = steps 1-200: its last 100 steps are logged at 110..200 (four at 2.0, six at 0.25 -> 0.95)
    assert rows[0] == "| Standard | 0 | 0.95 | 0.25 | 150 | 0.500 |"
    assert rows[1] == "| Standard | 1 | 1.50 | 3.00 | never | 0.500 |"
    assert "| loss at end of T = 64 (guess 1.39) | loss at end of T = 256 (guess 2.77) |" in "\n".join(lines)
    assert report._stage_losses([{**learns, "task": {**learns["task"], "curriculum": []}}], str) == []


def test_report_stage_losses_and_curves_keep_each_final_length_apart(tmp_path, monkeypatch):
    """Runs of one curriculum ending at T = 256 and at T = 512 get a stage table each, headed by their own final T
    (a T = 512 row under a "T = 256" column misread the untagged grid before), and a curve panel each."""
    report = _load_experiment("_report_mqar.py")
    monkeypatch.setattr(report.common, "FIGS", tmp_path)
    stage = {"steps": 200, "seq_len": 64, "num_kv_pairs": 4}

    def run(final, seed, loss):
        return {"model": "Standard", "steps": 300, "train": {"seed": seed, "lr": 3e-3}, "test": {"accuracy": 0.5},
                "model_options": {"hidden_dim": 64}, "task": {"seq_len": final, "num_kv_pairs": final // 16,
                                                              "curriculum": [stage]},
                "curve": [{"step": k, "loss": loss} for k in range(10, 301, 10)],
                "evals": [{"step": 100, "accuracy": 0.1}], "valid": {"step": 300, "accuracy": 0.5}}

    lines = report._stage_losses([run(256, 0, 1.0), run(512, 0, 2.0), run(256, 1, 3.0)], lambda r: r["model"])
    text = "\n".join(lines)
    heads = [line for line in text.splitlines() if line.startswith("| run |")]
    assert len(heads) == 2 and "T = 256 (guess 2.77)" in heads[0] and "T = 512 (guess 3.47)" in heads[1], heads
    first, second = text.split(heads[1])
    assert "| Standard | 0 | 1.00 | 1.00 |" in first and "| Standard | 1 | 3.00 | 3.00 |" in first
    assert "| Standard | 0 | 2.00 | 2.00 |" in second and "3.00" not in second
    import matplotlib.pyplot as plt

    drawn, subplots = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: drawn.append(a) or subplots(*a, **k))
    assert report._curves([run(256, 0, 1.0), run(512, 0, 2.0)], "c", lambda r: "x")
    assert drawn == [(1, 2)] and (tmp_path / "c_curves.png").stat().st_size > 0


def test_gau_rows_reads_init_and_trained_attention(tmp_path):
    """gau_rows.py on a tiny GAU cell of recall_curriculum.py: its "init" rows are those of a model freshly built
    with the run's seed, its "final" rows those of the checkpoint (not the same), and no run is a clear error."""

    args = ["--models", "GAU", "--lengths", "64", "--stage-lengths", "32", "--stage-steps", "2", "--steps", "6",
            "--hiddens", "32", "--seeds", "1", "--test-batches", "1", "--batch-size", "4", "--lrs", "0.05",
            "--no-zero-filler", "--tag", "g"]
    assert _run("recall_curriculum.py", args, tmp_path).returncode == 0
    none = _run("gau_rows.py", ["--tag", "nothing"], tmp_path)
    assert none.returncode == 2 and "no GAU run with a checkpoint" in none.stderr
    proc = _run("gau_rows.py", ["--tag", "g", "--rows", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "results" / "gau_rows_g.json").read_text())
    (run,) = got["probes"]
    assert run["seed"] == 1 and run["test_accuracy"] is not None and len(run["init"]) == 2  # two layers
    assert run["init"] != run["final"]
    for x in run["init"] + run["final"]:
        assert 0.0 <= x["share_positive"] <= 1.0 and 0.0 <= x["row_sum_median"] <= x["row_sum_max"]

    mod = _load_experiment("gau_rows.py")
    from bsbr.models import build_model

    torch.manual_seed(1)  # the seed build_run uses: the run's initial weights
    lm = build_model("GAU", vocab_size=256, causal_lm=True, hidden_dim=32, num_layers=2, num_heads=1, ff_dim=128,
                     dropout=0.0, qk_scale_init=0.5)
    ids = get_task("mqar", seq_len=64, num_kv_pairs=4, vocab_size=256, random_filler=True).batch("test", 3, 0)
    fresh = mod.row_stats(lm.eval(), ids.input_ids)
    assert len(fresh) == 2 and all(a == pytest.approx(b, rel=1e-5) for a, b in zip(fresh, run["init"], strict=True))
    with torch.no_grad():  # scales and offsets at zero: every score is 0, relu^2 of it too: a silent attention
        for m in lm.modules():
            if hasattr(m, "gamma"):
                m.gamma.zero_()
                m.beta.zero_()
    silent = mod.row_stats(lm, ids.input_ids)
    assert len(silent) == 2 and all(x == {"row_sum_median": 0.0, "row_sum_max": 0.0, "share_positive": 0.0}
                                    for x in silent)


def test_curve_drift_counts_a_pause_once_and_only_the_pause():
    """A 10-step interval that took 300 s in a stage whose steps take 1 s each is a pause: 290 s of it is paused
    time; the slower steps of a later, longer stage are not pauses."""
    drift = _load_experiment("curve_drift.py")
    curve, t = [], 0.0
    for step in range(10, 6501, 10):
        t += 10.0 if step <= 5500 else 60.0  # 1 s a step at T = 64 and 128, 6 s a step at T = 512
        if step == 3000:
            t += 290.0
        curve.append({"step": step, "seconds": t})
    assert drift.paused_seconds(curve) == pytest.approx(290.0)
    assert drift.paused_seconds([{**e, "seconds": e["seconds"] - (290.0 if e["step"] >= 3000 else 0)}
                                 for e in curve]) == 0.0
