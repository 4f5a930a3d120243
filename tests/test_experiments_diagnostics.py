"""The diagnostic scripts beside the grids: experiments/gau_rows.py (GAU attention row statistics from a cell's
checkpoints) and experiments/curve_drift.py (pauses and drift in recorded curves)."""

from __future__ import annotations

import json

import pytest
import torch

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
