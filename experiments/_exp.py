"""Shared pieces of the experiment scripts: one training run from a spec, results saved as each run finishes.

A results file ``results/<experiment>.json`` holds {"environment", "budget", "runs": {key: summary}, "jobs"}; it is
rewritten after every run, and a run whose key is already there is skipped, so an interrupted experiment
resumes where it stopped (a key recorded with other settings stops the grid instead: run it under another --tag).
Run from the repository root: ``PYTHONPATH=src python experiments/<script>.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

from bsbr._files import json_differences
from bsbr.models import build_model
from bsbr.tasks import curriculum, get_task
from bsbr.train import TrainConfig, evaluate, train
from bsbr.utils.cells import run_cells

_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).resolve().parents[1] / "benchmarks" /
                                               "common.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
environment = _bench.environment  # cpu, threads, torch version, commit (+dirty and dirty_paths), date

# BSBR_EXP_RESULTS redirects results (smoke tests write elsewhere than the committed ones)
RESULTS = Path(os.environ.get("BSBR_EXP_RESULTS", Path(__file__).resolve().parent / "results"))
# Checkpoints of unfinished cells (gitignored); BSBR_EXP_RUNS redirects them like BSBR_EXP_RESULTS.
RUNS = Path(os.environ.get("BSBR_EXP_RUNS", Path(__file__).resolve().parents[1] / "runs" / "experiments"))


def run_dir(name: str, key: str) -> str:
    """The checkpoint directory of grid cell ``key`` of results/<name>.json: a killed cell resumes from it."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)
    return str(RUNS / name / safe)


def check_device(device: str) -> str:
    """``device`` ("cpu", "cuda", "cuda:N" or "auto"), refused clearly when it names CUDA and there is none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"cuda build {torch.version.cuda}); use --device cpu")
    return device


def cpu_flush_denormals() -> None:
    """Flush denormal floats to zero on CPU (issue 14's scripts call it before training).

    After a few thousand MQAR steps a Standard model's CPU training step was 5x slower (1.55 s against 0.31 s
    at T = 256, batch 32, hidden 64, one thread; the same checkpoint, timed with and without) because tiny
    values had become denormal.  Flushing them changes results only below ~1e-38.  The older experiment
    scripts do not call it, so their recorded runs still reproduce bit for bit."""
    torch.set_flush_denormal(True)


def make_task(task_spec: dict):
    """A task from a spec {"name", options...}; a "curriculum" entry (list of stage dicts with "steps") makes
    a :class:`~bsbr.tasks.Curriculum` whose final task is the rest of the spec."""
    opts = dict(task_spec)
    name, stages = opts.pop("name"), opts.pop("curriculum", None)
    return curriculum(name, stages, **opts) if stages else get_task(name, **opts)


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f"{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS / f"{name}.json")


def build(model: str, vocab_size: int, hidden_dim: int = 128, num_layers: int = 2, num_heads: int = 4,
          seed: int = 0, **options):
    torch.manual_seed(seed)
    return build_model(model, vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers,
                       num_heads=num_heads, ff_dim=4 * hidden_dim, dropout=0.0, causal_lm=True, **options)


def train_run(model: str, model_opts: dict, task_spec: dict, train_opts: dict, test_batches: int | None = None,
              keep_every: int = 1, out_dir: str | None = None,
              train_top_k_until: int | None = None) -> tuple[dict, torch.nn.Module]:
    """Train ``model`` on ``task_spec`` and evaluate on the test split; returns (summary, trained model).

    The summary holds the settings, parameters, seconds, peak memory, the loss curve (every ``keep_every``
    steps: step, loss, seconds), the periodic valid evaluations, and final valid / test metrics.  With ``out_dir``
    the run keeps its log and checkpoints there and resumes from them if it was interrupted.  With
    ``train_top_k_until`` (BSBRBlocks with ``train_top_k``) the layers select ``train_top_k`` chunks while training
    for the steps before that step and their ``top_k`` from it on (dense warm-up, then sparse training)."""
    task = make_task(task_spec)
    cfg = TrainConfig(**{"progress": True, **train_opts, "out_dir": out_dir})
    lm = build(model, task.vocab_size, seed=cfg.seed, **model_opts)
    result = train(lm, task, cfg, before_step=None if train_top_k_until is None else
                   train_top_k_schedule(lm, train_top_k_until))
    test = evaluate(lm, task, "test", cfg.batch_size, test_batches)
    curve = [{k: h[k] for k in ("step", "loss", "seconds")} for h in result.history
             if h["step"] % keep_every == 0 or h["step"] == result.steps]
    summary = {"model": model, "model_options": model_opts, "task": task.options | {"name": task.name},
               "train": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "out_dir", "device")},
               "parameters": lm.num_parameters(), "seconds": result.seconds, "steps": result.steps,
               "peak_memory_bytes": result.peak_memory_bytes, "memory_kind": result.memory_kind,
               "tokens_per_second": cfg.batch_size * _row_tokens(task, result.steps) / result.seconds,
               "curve": curve, "evals": result.evals, "valid": result.final, "test": test,
               "steps_to_target": result.steps_to_target, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if train_top_k_until is not None:
        summary["train_top_k_until"] = train_top_k_until
    return summary, lm


def train_top_k_schedule(lm: torch.nn.Module, until: int):
    """A ``before_step`` for :func:`bsbr.train.train`: every layer with a ``train_top_k`` keeps it for the steps
    before ``until`` and drops it (training at its ``top_k``) from step ``until`` on.  Raises ValueError when no
    layer of ``lm`` has a ``train_top_k`` set."""
    layers = {m: m.train_top_k for m in lm.modules() if getattr(m, "train_top_k", None) is not None}
    if not layers:
        raise ValueError(f"train_top_k_until={until} needs layers with a train_top_k (BSBRBlocks' --train-top-k); "
                         f"{type(lm).__name__} has none")

    def before_step(index: int) -> None:
        for layer, k in layers.items():
            layer.train_top_k = k if index < until else None

    return before_step


def _row_tokens(task, steps: int) -> int:
    """Tokens per batch row summed over ``steps`` train steps (a curriculum's rows change length by stage)."""
    task_at = getattr(task, "task_at", lambda i: task)
    return sum(task_at(i).seq_len for i in range(steps))


def run_grid(name: str, budget: dict, jobs: list[tuple[str, dict]], fn, pass_key: bool = False) -> dict:
    """Run ``fn(**job)`` (``fn(key=key, **job)`` with ``pass_key``) for every (key, job) not yet in
    results/<name>.json, saving after each (the loop is :func:`bsbr.utils.cells.run_cells`, the one
    ExperimentRunner uses; the store is the results file, :class:`ResultsFile`).

    Each save re-reads the file and adds this run under a lock, so two processes given disjoint cells (e.g.
    ``--models`` split between them, one thread each) can fill one results file side by side.  The file also
    records each cell's job ("jobs"); a cell whose key is there but whose job differs (another --steps, batch
    size, curriculum...) stops the grid with the differences rather than being skipped as done.

    Each run records its own "environment" (machine, threads, torch, and the commit of the code this process
    imported, taken when the grid starts; ``<sha>+dirty`` with "dirty_paths" and a printed warning when src/ or the
    scripts had uncommitted changes).  The file-level "environment" and "budget" are the last writer's, so in a
    file filled by several invocations only the runs' own records say which commit produced which run."""
    store = ResultsFile(name, budget, dict(jobs), environment())  # the code this process runs is imported now

    def announce(i: int, key: str, what) -> None:
        note = f": {what:.0f} s" if isinstance(what, float) else {"skipped": ": done earlier, skipped"}.get(what, "")
        print(f"[{i + 1}/{len(jobs)}] {key}{note}", file=sys.stderr)

    run_cells([(key, partial(fn, key=key, **job) if pass_key else partial(fn, **job)) for key, job in jobs], store,
              announce)
    return load(name)


class ResultsFile:
    """results/<name>.json as a cell store for :func:`bsbr.utils.cells.run_cells`: a cell is finished when its key
    is in "runs" (recorded with the same job: another job stops the grid); saving adds the run, its job and its
    environment under a lock, re-reading the file first so that another process's cells are kept."""

    def __init__(self, name: str, budget: dict, jobs: dict[str, dict], started: dict):
        self.name, self.budget, self.jobs, self.started = name, budget, jobs, started

    def finished(self, key: str) -> dict | None:
        done = load(self.name)
        if key not in done["runs"]:
            return None
        earlier = done.get("jobs", {}).get(key)  # files written before 2026-12-04 do not record it
        if earlier is not None and (diff := json_differences(earlier, _settings(self.jobs[key]))):
            raise SystemExit(f"results/{self.name}.json already holds cell {key!r}, trained with other settings "
                             f"(recorded -> now: {'; '.join(diff)}); give this grid its own --tag rather than "
                             f"skipping the cell as done")
        return done["runs"][key]

    def save(self, key: str, result: dict) -> None:
        run_env = {**self.started, "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
        with _locked(self.name):
            data = load(self.name)
            data["budget"], data["environment"] = self.budget, run_env
            data["runs"][key] = {**result, "environment": run_env}
            data.setdefault("jobs", {})[key] = _settings(self.jobs[key])
            save(self.name, data)


def _settings(job: dict) -> dict:
    """What a grid cell was trained with, as JSON: the job minus settings that do not change its numbers."""
    out = json.loads(json.dumps(job, default=str))
    if isinstance(out.get("train_opts"), dict):
        out["train_opts"].pop("checkpoint_every", None)
    return out


@contextlib.contextmanager
def _locked(name: str):
    """An exclusive lock on results/<name>.json.lock, held for a read-modify-write of the results file."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.json.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
