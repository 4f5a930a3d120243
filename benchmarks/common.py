"""Shared pieces of the benchmark scripts: environment header, warmed-up median timing, log-log fits, JSON."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from bsbr.evals.analysis import fit_power_law

RESULTS = Path(__file__).resolve().parent / "results"


# The code a number depends on: a tracked change under these paths makes a result unpinned.  Results files,
# docs and figures are outputs: writing them (as every grid does after each cell) does not unpin the code.
CODE_PATHS = ("src", "experiments/*.py", "benchmarks/*.py", "pyproject.toml")


def code_state(root: Path | None = None) -> dict:
    """{"commit": short sha} when the code (``CODE_PATHS``) matches the commit, else
    {"commit": "<sha>+dirty", "dirty_paths": [the changed files]}; "unknown" outside a git checkout.

    A dirty state is also printed to stderr, since a result recorded with it cannot be reproduced from the commit."""
    root = root or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, check=False).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    except OSError:
        return {"commit": "unknown"}
    paths = sorted(line[3:] for line in changed.splitlines() if line.strip())  # "XY path"
    if not paths:
        return {"commit": commit}
    print(f"warning: uncommitted changes to {', '.join(paths)}: results will record commit {commit}+dirty and "
          "cannot be reproduced from it; commit first to pin them", file=sys.stderr)
    return {"commit": f"{commit}+dirty", "dirty_paths": paths}


def environment() -> dict:
    """What the numbers were measured on: recorded beside every result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    state = code_state()
    return {"cpu": cpu, "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu", **state,
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def header(env: dict) -> str:
    return (f"{env['cpu']} | {env['threads']} threads | torch {env['torch']} | commit {env['commit']} | "
            f"{env['date']}")


def time_fn(fn: Callable[[], object], min_time: float = 1.0, min_runs: int = 3, warmup: int = 1) -> dict:
    """Median wall time of ``fn`` after ``warmup`` calls, over at least ``min_runs`` runs and ``min_time`` s."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "runs": len(times)}


def interleaved(fns: list, rounds: int) -> list[dict]:
    """Time each fn once per round, alternating (noise falls on all alike), the order reversed every other round
    (so no fn always runs right after another's cache traffic): min and median seconds."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(enumerate(fns))
        for i, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [{"min": min(t), "median": statistics.median(t), "runs": len(t)} for t in times]


def loglog_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares fit of y = a * x^k on log-log axes: k, a, R^2 and the x range (bsbr.evals.fit_power_law)."""
    return fit_power_law(xs, ys)


def matmul_peak(sizes=(2048, 4096)) -> dict:
    """This machine's fp32 matmul throughput (GFLOP/s), best over square sizes."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_fn(lambda a=a, b=b: a @ b, min_time=1.0)["median"]
        best[n] = 2 * n**3 / t / 1e9
    return {"gflops": max(best.values()), "by_size": best}


def write_with_command(out: str | Path, script: str, argv: list[str] | None, **data) -> Path:
    """Write ``{"environment": ..., **data}`` to ``out``, the environment holding the command that reproduces it
    (``PYTHONPATH=src python benchmarks/<script> <argv>``; ``argv`` None: this process's arguments)."""
    env = {**environment(), "command": f"PYTHONPATH=src python benchmarks/{script} " + " ".join(
        argv if argv is not None else sys.argv[1:])}
    Path(out).write_text(json.dumps({"environment": env, **data}, indent=1))
    print(f"written to {out}")
    return Path(out)


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2))
    return path
