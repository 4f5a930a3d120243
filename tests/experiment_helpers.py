"""Helpers for the tests of experiments/*.py: run a script on tiny budgets with its results and checkpoints in a
temporary directory, load a script as a module, and the report's sections on such results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_exp_script(script: str, args: list[str], tmp: Path, wait: bool = True):
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


def load_experiment(script: str):
    """experiments/<script>, loaded fresh as a module (experiments/ on sys.path while it loads, for ``_exp``)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec = importlib.util.spec_from_file_location(f"exp_{script[:-3]}", ROOT / "experiments" / script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # (dataclasses look their module up there)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return mod


def report_sections(tmp: Path, monkeypatch):
    """experiments/report.py reading tmp/results and drawing into tmp/figures."""
    mod = load_experiment("report.py")
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
