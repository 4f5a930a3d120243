"""The diagnostic scripts beside the grids: experiments/gau_rows.py (GAU attention row statistics from a cell's
checkpoints) and experiments/curve_drift.py (pauses and drift in recorded curves)."""

from __future__ import annotations

import json

import pytest
import torch

from bsbr.models import build_model
from bsbr.tasks import get_task
from experiment_helpers import load_experiment, run_exp_script


def test_gau_rows_reads_init_and_trained_attention(tmp_path):
    """gau_rows.py on a tiny GAU cell of recall_curriculum.py: its "init" rows are those of a model freshly built
    with the run's seed, its "final" rows those of the checkpoint (not the same), and no run is a clear error."""

    args = ["--models", "GAU", "--lengths", "64", "--stage-lengths", "32", "--stage-steps", "2", "--steps", "6",
            "--hiddens", "32", "--seeds", "1", "--test-batches", "1", "--batch-size", "4", "--lrs", "0.05",
            "--no-zero-filler", "--tag", "g"]
    assert run_exp_script("recall_curriculum.py", args, tmp_path).returncode == 0
    none = run_exp_script("gau_rows.py", ["--tag", "nothing"], tmp_path)
    assert none.returncode == 2 and "no GAU run with a checkpoint" in none.stderr
    proc = run_exp_script("gau_rows.py", ["--tag", "g", "--rows", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "results" / "gau_rows_g.json").read_text())
    (run,) = got["probes"]
    assert run["seed"] == 1 and run["test_accuracy"] is not None and len(run["init"]) == 2  # two layers
    assert run["init"] != run["final"]
    for x in run["init"] + run["final"]:
        assert 0.0 <= x["share_positive"] <= 1.0 and 0.0 <= x["row_sum_median"] <= x["row_sum_max"]

    mod = load_experiment("gau_rows.py")
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
    drift = load_experiment("curve_drift.py")
    curve, t = [], 0.0
    for step in range(10, 6501, 10):
        t += 10.0 if step <= 5500 else 60.0  # 1 s a step at T = 64 and 128, 6 s a step at T = 512
        if step == 3000:
            t += 290.0
        curve.append({"step": step, "seconds": t})
    assert drift.paused_seconds(curve) == pytest.approx(290.0)
    assert drift.paused_seconds([{**e, "seconds": e["seconds"] - (290.0 if e["step"] >= 3000 else 0)}
                                 for e in curve]) == 0.0


def test_blocks_selection_reads_a_run_back_with_its_test_accuracy(tmp_path):
    """experiments/blocks_selection.py on a tiny BSBRBlocks MQAR cell: with the grid's test rows (--batches and
    --batch-size of the grid) its accuracy is the grid's test accuracy, and the chunk and top_k overrides apply."""
    args = ["--models", "BSBRBlocks", "--lengths", "64", "--stage-lengths", "32", "--stage-steps", "2", "--steps",
            "4", "--hiddens", "32", "--seeds", "0", "--test-batches", "2", "--batch-size", "4",
            "--blocks-chunk-size", "4", "--top-k", "2", "--train-top-k", "16", "--train-top-k-until", "3",
            "--block-summary", "minmax", "--vocab-size", "16", "--tag", "sel"]  # 8 values: a guess is often right
    done = run_exp_script("recall_curriculum.py", args, tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results" / "recall_curriculum_sel.json").read_text())
    run = results["runs"]
    (cell,) = run.values()
    assert cell["train_top_k_until"] == 3 and next(iter(results["jobs"].values()))["train_top_k_until"] == 3
    cell_dir = next((tmp_path / "runs").rglob("config.json")).parent
    out = run_exp_script("blocks_selection.py", [str(cell_dir), "--batches", "2", "--batch-size", "4"], tmp_path)
    assert out.returncode == 0, out.stderr
    head = out.stdout.splitlines()[0]
    assert "chunk 4, top_k 2, summary minmax" in head, head
    test = cell["test"]
    assert test["correct"] > 0 and f"{test['total']} scored queries" in head, (head, test)
    assert f"accuracy {test['correct'] / test['total']:.3f}" in head, (head, test)
    other = run_exp_script("blocks_selection.py", [str(cell_dir), "--chunk-size", "8", "--top-k", "1"], tmp_path)
    assert other.returncode == 0, other.stderr
    assert "chunk 8, top_k 1," in other.stdout.splitlines()[0]
    every = run_exp_script("blocks_selection.py", [str(cell_dir), "--top-k", "16"], tmp_path)  # the dense route
    assert every.returncode == 0, every.stderr
    assert "layer 2: the queried key's chunk in view for 1.000" in every.stdout, every.stdout


def test_train_top_k_schedule_is_dense_then_sparse_by_step():
    """_exp.train_top_k_schedule: train_top_k for the steps before ``until``, top_k from it on, by step index (a
    resumed run may call it at any step), and a clear error for a model with no train_top_k."""
    exp = load_experiment("_exp.py")
    lm = build_model("BSBRBlocks", vocab_size=16, hidden_dim=16, num_layers=2, num_heads=2, ff_dim=32,
                     causal_lm=True, chunk_size=4, top_k=1, train_top_k=8)
    layers = [m for m in lm.modules() if hasattr(m, "train_top_k")]
    assert len(layers) == 2
    before_step = exp.train_top_k_schedule(lm, 3)
    for index, expected in [(0, 8), (2, 8), (3, None), (7, None), (1, 8)]:
        before_step(index)
        assert [m.train_top_k for m in layers] == [expected, expected], index
    with pytest.raises(ValueError, match=r"train_top_k_until=3 needs layers with a train_top_k"):
        exp.train_top_k_schedule(build_model("BSBRBlocks", vocab_size=16, hidden_dim=16, num_layers=1, num_heads=2,
                                             ff_dim=32, causal_lm=True, chunk_size=4, top_k=1), 3)


def test_indexer_probe_trains_only_the_indexers_and_leaves_the_run(tmp_path):
    """experiments/indexer_probe.py on a tiny BSBRBlocks cell with an indexer: its first reading is
    blocks_selection.py's (the grid's test accuracy), the run's checkpoint is unchanged, and a run without an
    indexer is a clear error."""
    base = ["--models", "BSBRBlocks", "--lengths", "64", "--stage-lengths", "32", "--stage-steps", "2", "--steps",
            "4", "--hiddens", "32", "--seeds", "0", "--test-batches", "2", "--batch-size", "4",
            "--blocks-chunk-size", "4", "--top-k", "2", "--vocab-size", "16"]
    done = run_exp_script("recall_curriculum.py", [*base, "--selection-grad", "distill", "--indexer-dim", "8",
                                                   "--block-summary", "max", "--tag", "idx"], tmp_path)
    assert done.returncode == 0, done.stderr
    cell_dir = next((tmp_path / "runs").rglob("config.json")).parent
    before = {p.name: p.read_bytes() for p in (cell_dir / "checkpoint").rglob("*") if p.is_file()}
    probe = run_exp_script("indexer_probe.py", [str(cell_dir), "--steps", "2", "--batch-size", "4", "--eval-batches",
                                                "2", "--eval-batch-size", "4", "--report-every", "1"], tmp_path)
    assert probe.returncode == 0, probe.stderr
    sel = run_exp_script("blocks_selection.py", [str(cell_dir), "--batches", "2", "--batch-size", "4"], tmp_path)
    readings = probe.stdout.split("\n" + cell_dir.name)
    assert len(readings) == 3, probe.stdout  # as trained, after step 1, after step 2
    assert readings[0].split(": ", 1)[1] == sel.stdout.strip().split(": ", 1)[1], (readings[0], sel.stdout)
    assert {p.name: p.read_bytes() for p in (cell_dir / "checkpoint").rglob("*") if p.is_file()} == before
    every = run_exp_script("indexer_probe.py", [str(cell_dir), "--steps", "1", "--batch-size", "4", "--eval-batches",
                                                "2", "--eval-batch-size", "4", "--all-weights"], tmp_path)
    assert every.returncode == 0, every.stderr
    assert "+ 1 all-weight steps at top_k" in every.stdout.split("\n" + cell_dir.name)[-1], every.stdout
    assert {p.name: p.read_bytes() for p in (cell_dir / "checkpoint").rglob("*") if p.is_file()} == before
    plain = run_exp_script("recall_curriculum.py", [*base, "--tag", "plain"], tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    plain_dir = next((tmp_path / "plain" / "runs").rglob("config.json")).parent
    refused = run_exp_script("indexer_probe.py", [str(plain_dir)], tmp_path)
    assert refused.returncode != 0 and "has no indexer" in refused.stderr
