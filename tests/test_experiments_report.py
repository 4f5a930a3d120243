"""experiments/report.py and its section modules: commands that reproduce each results file, seeds pooled but never
two settings, the curriculum tables and curves."""

from __future__ import annotations

import re

import pytest

from experiment_helpers import ROOT, load_experiment


def test_report_commands_ask_for_the_earlier_task_where_runs_used_it(tmp_path):
    """Runs recorded before answers_in_input existed (no key) or with it set reproduce only with the flag."""
    mod = load_experiment("_report_common.py")
    old, shown, hidden = ({"name": "mqar", "seq_len": 64}, {"name": "mqar", "answers_in_input": True},
                          {"name": "mqar", "answers_in_input": False})
    assert mod.answers_flag([{"task": old}, {"task": shown}]) == " --answers-in-input"
    assert mod.answers_flag([{"task": hidden}]) == "" and mod.answers_flag([{"task": {"name": "lm"}}]) == ""


def test_report_pools_seeds_but_never_two_settings(tmp_path, monkeypatch):
    """A results file with Standard at two learning rates (one seed and two seeds) and BSBR at one: the report's
    mean +- spread rows pool only seeds of one configuration (lr 1e-3's single run is not averaged into lr 3e-3)."""
    report = load_experiment("_report_mqar.py")

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
    report = load_experiment("_report_mqar.py")
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
    report = load_experiment("_report_mqar.py")
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
    report = load_experiment("_report_mqar.py")
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


def test_results_commit_counts_each_runs_commit_and_flags_what_is_not_pinned():
    """A file whose runs record their own commits is pinned unless one is +dirty; an older file (one environment for
    the file) names the last writer's commit and says the earlier runs' are not recorded; none is not pinned."""
    index = load_experiment("_report_index.py")
    own = {"runs": {"a": {"environment": {"commit": "aaa"}}, "b": {"environment": {"commit": "aaa"}}}}
    assert index.results_commit(own) == ("aaa", True)
    mixed = {"runs": {"a": {"environment": {"commit": "aaa"}}, "b": {"environment": {"commit": "bbb+dirty"}}}}
    assert index.results_commit(mixed) == ("aaa (1 runs), bbb+dirty (1 runs)", False)
    old = {"environment": {"commit": "ccc"}, "runs": {"a": {}, "b": {}}}
    text, pinned = index.results_commit(old)
    assert pinned and text.startswith("ccc (the last of 2 runs")
    assert index.results_commit({"environment": {"commit": "ddd+dirty"}, "runs": {"a": {}}}) == ("ddd+dirty", False)
    assert index.results_commit({"rows": []}) == ("none recorded", False)


def test_experiments_doc_opens_with_the_results_of_record_and_their_commands():
    """docs/experiments.md (generated) shows the index of current results, each file's command, before any section,
    within its first 150 lines; the superseded ones are in the archive, each with a reason."""
    index = load_experiment("_report_index.py")
    head = (ROOT / "docs" / "experiments.md").read_text().splitlines()[:150]
    text = "\n".join(head)
    assert "## Results of record" in text and "### Commands of record" in text
    for rec in index.RECORD:
        for stem in rec.stems:
            if rec.kind != "doc" and (ROOT / "experiments" / "results" / f"{stem}.json").exists():
                assert f"`{stem}.json`" in text and f"- `{stem}`: `PYTHONPATH=src" in text, stem
    archive = (ROOT / "docs" / "experiments-archive.md").read_text()
    for stem, why in index.ARCHIVE.items():
        if (ROOT / "experiments" / "results" / f"{stem}.json").exists():
            assert f"`{stem}.json`" in archive and why in archive, stem
