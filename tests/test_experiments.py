"""The experiment scripts (experiments/*.py) run end to end on tiny budgets and write their results, and an
interrupted grid resumes: a second run skips every finished key.  The long-document run uses a retrieval window
and checks that its cache stays bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, args: list[str], results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BSBR_EXP_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("name,args,out,keys", [
    ("recall_vs_length.py", ["--models", "BSBR", "Linear", "--lengths", "64", "--lrs", "0.003", "--steps", "3",
                             "--test-batches", "1"], "recall_vs_length", 2),
    ("convergence.py", ["--models", "BSBR", "--lengths", "128", "--steps", "3", "--batch-size", "2",
                        "--eval-every", "2"], "convergence_prose", 1),
    ("ablations.py", ["--seq-len", "64", "--chunks", "16", "--compress", "2", "--steps", "2", "--speed-len", "128"],
     "ablations_mqar", 2),
    ("long_document.py", ["--tokens", "8192", "--piece", "512", "--train-len", "128", "--steps", "2",
                          "--batch-size", "2", "--retrieval-window", "2"], "long_document", 1),
], ids=lambda v: v if isinstance(v, str) and v.endswith(".py") else "")
def test_experiment_script_runs_and_resumes(tmp_path, name, args, out, keys):
    run_script(name, args, tmp_path)
    data = json.loads((tmp_path / f"{out}.json").read_text())
    assert len(data["runs"]) == keys and data["environment"]["torch"]
    if out == "long_document":  # with a retrieval window of 2 chunks the cache stops growing
        run = next(iter(data["runs"].values()))
        sizes = [c["bytes"] for c in run["stream"]["cache_bytes"]]
        assert run["model_options"]["retrieval_window"] == 2
        assert max(sizes[2:]) <= 1.5 * min(sizes[2:])  # 8,192 tokens = 128 chunks, at most 2W + 1 states kept
    again = run_script(name, args, tmp_path)
    assert again.stderr.count("done earlier, skipped") == keys
