"""What the sections of experiments/report.py share: paths, reading a results file, tables, colours and the
MQAR breakdown tables.  The sections read the paths (``FIGS``, ``RESULTS``, ...) and ``load`` through this module
(``common.FIGS``), so a test points them elsewhere with one ``monkeypatch.setattr`` on it."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _report_index import results_commit  # noqa: E402

from bsbr.models import list_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOCS = ROOT / "docs"
FIGS = DOCS / "figures"
MiB = 2**20
RUN = "PYTHONPATH=src OMP_NUM_THREADS=1 flock /tmp/bsbr-cpu.lock python experiments/"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def env(data: dict) -> str:
    """Where and at which commit(s) a results file was measured (the last writer's machine and date)."""
    e = data.get("environment", {})
    commit, pinned = results_commit(data)
    return (f"Measured on {e.get('cpu', '?')}, {e.get('threads', '?')} torch thread(s), torch {e.get('torch', '?')}, "
            f"commit {commit}{'' if pinned else ' (not pinned: see the index)'}, {e.get('date', '?')}.")


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def answers_flag(runs) -> str:
    """The flag " --answers-in-input" when the MQAR runs predate 2026-12-04 (their task options lack the key or set it):
    the scripts' default task hides the answers since then, so the command must ask for the older task."""
    tasks = [r["task"] for r in runs if r["task"].get("name", "mqar") == "mqar"]
    return " --answers-in-input" if tasks and all(t.get("answers_in_input", True) for t in tasks) else ""


def model_color(model: str) -> str:
    """One colour per registered model, the same in every figure."""
    names = list_models()
    return plt.get_cmap("tab10")(names.index(model) % 10 if model in names else 9)


def breakdowns(runs: list[dict], group) -> list[str]:
    """Tables of MQAR test accuracy by pairs remaining (with what answering by elimination scores) and by
    query-to-key distance, one row per group of runs (``group(run)`` -> label; accuracy pooled over the group)."""
    out = []
    with_fields = [r for r in runs if "by_remaining" in r["test"]]
    if not with_fields:
        return out
    for field, what in (("remaining", "pairs not yet queried at the query (this one included)"),
                        ("distance", "tokens from the query back to its key")):
        lengths = sorted({r["task"]["seq_len"] for r in with_fields})
        for t in lengths:
            sel = [r for r in with_fields if r["task"]["seq_len"] == t]
            edges = [(x[f"{field}_lo"], x[f"{field}_hi"]) for x in sel[0]["test"][f"by_{field}"]]
            head = [f"{lo + 1}" if hi == lo + 1 else f"{lo + 1}-{hi}" for lo, hi in edges]
            rows = []
            for label in dict.fromkeys(group(r) for r in sel):
                part = [r for r in sel if group(r) == label]
                cells = []
                for i in range(len(edges)):
                    c = sum(r["test"][f"by_{field}"][i]["correct"] for r in part)
                    n = sum(r["test"][f"by_{field}"][i]["total"] for r in part)
                    cells.append(f"{c / n:.2f}" if n else "-")
                rows.append([label, *cells])
            if field == "remaining":  # one query per row at each count r, answered by elimination with p = 1/r
                rows.append(["*elimination (1/remaining)*",
                             *[f"{sum(1 / r for r in range(lo + 1, hi + 1)) / (hi - lo):.2f}" for lo, hi in edges]])
            out += [f"Test accuracy by {what}, T = {t}:", "", table(["", *head], rows), ""]
    return out
