"""The experiment grids (experiments/_exp.py run_grid and the scripts on it) on tiny budgets: results written cell by
cell and resumed, a killed cell resuming to the result of an uninterrupted one, two processes filling one file, a
cell recorded with other settings refused, each run's commit recorded (and uncommitted code marked), and
--device cuda refused clearly where there is no GPU."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from experiment_helpers import PASSKEY, RECALL, load_experiment, report_sections, run_exp_script


def test_passkey_script_grid(tmp_path, monkeypatch):
    proc = run_exp_script("passkey_depth.py", PASSKEY, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results" / "passkey_depth.json").read_text())["runs"]
    cells = {m: {(c["length"], c["depth"]) for c in r["depth_grid"]} for m, r in runs.items()}
    assert cells["BSBR"] == {(t, d) for t in (128, 256, 512) for d in (0.0, 1.0)}
    assert cells["Standard"] == {(t, d) for t in (128, 256) for d in (0.0, 1.0)}  # quadratic: no long lengths
    assert runs["BSBR"]["task"]["curriculum"][0]["seq_len"] == 96
    again = run_exp_script("passkey_depth.py", PASSKEY, tmp_path)
    assert again.stderr.count("done earlier, skipped") == 2
    lines = report_sections(tmp_path, monkeypatch).passkey_depth_section("passkey_depth")
    assert "| Standard |" in "\n".join(lines) and "not run" in "\n".join(lines)  # quadratic: no 512 column value
    assert (tmp_path / "figures" / "passkey_depth.png").stat().st_size > 0


def test_recall_curriculum_script_grid(tmp_path, monkeypatch):
    proc = run_exp_script("recall_curriculum.py", RECALL, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results" / "recall_curriculum.json").read_text())["runs"]
    assert sorted(runs) == [f"{m}|T=64|h=32|lr=0.003|seed={s}" for m in ("GAU", "Standard") for s in (0, 1)]
    r = runs["Standard|T=64|h=32|lr=0.003|seed=1"]
    assert r["train"]["seed"] == 1 and r["task"]["curriculum"] == [
        {"steps": 2, "seq_len": 32, "seed": 0, "vocab_size": 256, "num_kv_pairs": 2, "power_a": 0.01,
         "random_filler": False, "answers_in_input": False}]
    assert runs["GAU|T=64|h=32|lr=0.003|seed=0"]["model_options"]["qk_scale_init"] == 0.5
    text = "\n".join(report_sections(tmp_path, monkeypatch).recall_section("recall_curriculum"))
    assert "(n=2)" in text and "--seeds 0 1" in text and "--stage-steps 2" in text
    assert "| Standard (2 seeds pooled) |" in text and "*elimination (1/remaining)*" in text
    assert "--answers-in-input" not in text and "answers as labels only" in text


def test_killed_cell_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGTERM mid-training: the loop checkpoints; the rerun continues from there and ends where a run that
    was never stopped ends (same test loss to the bit)."""
    args = ["--models", "Standard", "--lengths", "64", "--stage-lengths", "32", "--stage-steps", "20",
            "--steps", "400", "--hiddens", "32", "--seeds", "0", "--test-batches", "1", "--batch-size", "4",
            "--checkpoint-every", "10"]
    ref = run_exp_script("recall_curriculum.py", args, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = run_exp_script("recall_curriculum.py", args, tmp_path / "cut", wait=False)
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
    again = run_exp_script("recall_curriculum.py", args, tmp_path / "cut")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (next(iter(json.loads((tmp_path / d / "results" / "recall_curriculum.json").read_text())["runs"]
                      .values())) for d in ("ref", "cut"))
    assert b["steps"] == 400 and [c["step"] for c in b["curve"]] == [c["step"] for c in a["curve"]]
    assert b["test"]["loss"] == a["test"]["loss"] and b["valid"]["loss"] == a["valid"]["loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("script", ["passkey_depth.py", "recall_curriculum.py"])
def test_device_cuda_refused_without_gpu(tmp_path, script):
    proc = run_exp_script(script, ["--device", "cuda"], tmp_path)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "results").exists()


def _exp_module(tmp_path, monkeypatch):
    """experiments/_exp.py, loaded fresh, writing its results under ``tmp_path``."""
    exp = load_experiment("_exp.py")
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

    bench = load_experiment("_exp.py")._bench  # benchmarks/common.py

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
    proc = run_exp_script("recall_curriculum.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results" / "recall_curriculum_probe.json").read_text())["runs"]
    assert all([e["step"] for e in r["evals"]] == [2] and r["valid"]["step"] == 4 for r in runs.values())
    text = "\n".join(report_sections(tmp_path, monkeypatch).recall_section("recall_curriculum_probe"))
    assert "| seed |" in text and "figures/recall_curriculum_probe_curves.png" in text
    assert "Test accuracy by tokens from the query back to its key, T = 64:" in text
    assert (tmp_path / "figures" / "recall_curriculum_probe_curves.png").stat().st_size > 0
