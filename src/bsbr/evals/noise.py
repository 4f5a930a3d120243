"""Is a timing run noise?  Load on the machine before and during the run, the run-queue wait of our own threads
per timed call, and an A/A control; the verdict and the warning that ``bsbr compare`` / ``bsbr scaling`` print.

Three measurements, all taken while the run goes on (Linux: from /proc; elsewhere only the load average and the
A/A control are available, and the record says so in ``"method"``):

- *other runnable threads*: ``procs_running`` of /proc/stat minus our own threads in state R, sampled before each
  timed call.  This is what the load average averages (runnable threads), without its one-minute memory: the
  1-minute load average still counts a job that ended 30 s ago and sees only a third of one that started 30 s
  ago, so it is recorded (``loadavg_before`` / ``loadavg_after``) but not used for the verdict.
- *run-queue wait*: per timed call, the share of the time our threads were ready to run that they spent waiting
  for a CPU (/proc/self/task/*/schedstat: wait / (wait + on-CPU time), summed over our threads): ~0 on an idle
  machine, ~0.5 when torch's two intra-op threads share two cores with two busy processes (then one preempted
  thread holds the others at the next barrier, the cause of the 10-30x slowdowns).  A cell whose median wait
  exceeds :data:`WAIT_LIMIT` is noisy.
- *A/A control*: one cell is timed twice in every round, once in each half of the round (the second time at a
  random place in the other half); on a steady machine its median timing over the first halves equals its median
  over the second halves.  How far they disagree (max / min - 1) is the noise floor: the resolution of the
  medians the report compares (:func:`control_floor`).

A run is noisy when any cell is noisy, when other runnable threads plus ours exceed the cores by more than
:data:`LOAD_MARGIN` on average in some round, or when the noise floor exceeds :data:`FLOOR_LIMIT`.
"""

from __future__ import annotations

import os
import statistics
import time

WAIT_LIMIT = 0.10  # median share of a cell's ready time spent waiting for a CPU (quiet: < 0.02; 2 hogs: ~0.5)
FLOOR_LIMIT = 0.25  # A/A noise floor above which a run is noisy (quiet: a few percent)
LOAD_MARGIN = 0.5  # runnable threads (others' + ours) may exceed the cores by this much on average
R2_LIMIT = 0.95  # in a noisy run, a fit with a lower R^2 is marked unreliable


class NoisyTimingWarning(RuntimeWarning):
    """compare_models / scaling_analysis measured on a busy machine: the message says which cells and what to do."""


def cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _own_tasks() -> tuple[int, int, int] | None:
    """(on-CPU ns, run-queue wait ns, threads in state R) summed over this process's threads; None without /proc."""
    run = wait = running = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                on_cpu, waited, _ = f.read().split()
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):  # a thread that ended between listdir and open
            continue
        run, wait = run + int(on_cpu), wait + int(waited)
        running += stat[stat.rindex(")") + 2] == "R"
    return run, wait, running


def _procs_running() -> int | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class Probe:
    """Reads the machine around each timed call: ``mark()`` before it, ``wait(mark)`` after it.

    ``method`` is "proc" where /proc gives run-queue waits and runnable counts, "loadavg" where only the load
    average exists (other runnable threads = load average minus our threads; no per-call waits), else "none".
    """

    def __init__(self, threads: int):
        self.threads = threads
        if _own_tasks() is not None and _procs_running() is not None:
            self.method = "proc"
        else:
            self.method = "loadavg" if loadavg() is not None else "none"

    def others(self) -> float | None:
        """Runnable threads of other processes now (the load-average method: averaged over the last minute)."""
        if self.method == "proc":
            own, total = _own_tasks(), _procs_running()
            return None if own is None or total is None else float(max(0, total - own[2]))
        if self.method == "loadavg":
            return max(0.0, loadavg()[0] - self.threads)
        return None

    def mark(self) -> tuple[int, int] | None:
        own = _own_tasks() if self.method == "proc" else None
        return None if own is None else own[:2]

    def wait(self, mark) -> float | None:
        """Share of the time our threads were ready to run since ``mark`` that they spent waiting for a CPU:
        run-queue wait / (wait + time on a CPU), summed over our threads; 0 on an idle machine."""
        now = self.mark()
        if mark is None or now is None:
            return None
        ran, waited = now[0] - mark[0], now[1] - mark[1]
        return round(waited / (ran + waited), 4) if ran + waited > 0 else None

    def sample_others(self, seconds: float = 0.3, every: float = 0.01) -> float | None:
        """Mean runnable threads of other processes over ``seconds`` (before a run: ours are idle)."""
        if self.method != "proc":
            return self.others()
        values, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            values.append(self.others())
            time.sleep(every)
        values = [v for v in values if v is not None]
        return round(statistics.fmean(values), 3) if values else None


def overloaded(others: float | None, threads: int, n_cores: int) -> bool:
    """Other runnable threads plus ours exceed the cores by more than :data:`LOAD_MARGIN`."""
    return others is not None and others + threads > n_cores + LOAD_MARGIN


def assess(cells: dict, control: dict | None, rounds_others: list, before: dict, threads: int, n_cores: int,
           method: str) -> dict:
    """The verdict over one interleaved run.

    ``cells``: {(model, T): {"times": [s, ...], "waits": [wait or None, ...]}}; ``control``: {"model",
    "seq_length", "ratios": [max/min per round]} or None; ``rounds_others``: mean other runnable threads per
    round; ``before``: {"others", "loadavg"} sampled before the first timed call.  Returns the ``"noise"``
    record of a results file (see :mod:`bsbr.evals.results`).
    """
    noisy_cells = []
    for (name, T), c in cells.items():
        waits = [w for w in c.get("waits", []) if w is not None]
        if waits and statistics.median(waits) > WAIT_LIMIT:
            noisy_cells.append([name, T])
    floor = control_floor(control)
    reasons = []
    if noisy_cells:
        reasons.append(f"{len(noisy_cells)} of {len(cells)} cells were timed while our threads waited for a CPU "
                       f"(more than {WAIT_LIMIT:.0%} of the time they were ready to run, median over the repeats)")
    busy_rounds = [i for i, o in enumerate(rounds_others) if overloaded(o, threads, n_cores)]
    if busy_rounds:
        worst = max(rounds_others[i] for i in busy_rounds)
        reasons.append(f"other processes kept up to {worst:.1f} threads runnable beside our {threads} on {n_cores} "
                       f"cores ({len(busy_rounds)} of {len(rounds_others)} rounds)")
    if floor is not None and floor > FLOOR_LIMIT:
        reasons.append(f"the A/A control (one cell timed twice per round) disagreed with itself by {floor:.0%} "
                       f"(median over rounds; above {FLOOR_LIMIT:.0%})")
    return {"method": method, "cores": n_cores, "threads": threads, "others_before": before.get("others"),
            "loadavg_before": before.get("loadavg"), "loadavg_after": loadavg(),
            "others_during": [None if o is None else round(o, 3) for o in rounds_others],
            "control": control, "noise_floor": floor, "noisy": bool(reasons), "reasons": reasons,
            "noisy_cells": noisy_cells}


def control_floor(control: dict | None) -> float | None:
    """The A/A noise floor: how far the control cell's median timing in the rounds' first halves and its median in
    their second halves disagree (max / min - 1), the same statistic as the medians the report compares; files
    written before the pairs were kept (``"ratios"`` only) get the median over rounds of max / min - 1, which
    reads high when each timing jitters: ``ratios`` 1.64 / 1.02 / 1.40 on a quiet 2-core CI machine."""
    if not control:
        return None
    pairs = control.get("pairs")
    if pairs:
        first, second = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        return round(max(first, second) / min(first, second) - 1, 4) if min(first, second) > 0 else None
    ratios = control.get("ratios")
    return round(statistics.median(ratios) - 1, 4) if ratios else None


def suggested_threads(noise: dict) -> int | None:
    """Threads that fit beside the other processes' load (None if ours already do or nothing is known)."""
    others = [o for o in [noise.get("others_before"), *noise.get("others_during", [])] if o is not None]
    n_cores, threads = noise.get("cores"), noise.get("threads")
    if not others or not n_cores or not threads:
        return None
    free = max(1, int(n_cores - round(statistics.median(others))))
    return free if threads > free else None


def cell_label(results: dict, name: str, T: int, key: str) -> str:
    """``DeltaNet at 512: 0.75 s (wait 98%)`` for the warning and the report."""
    i = results["seq_lengths"].index(T)
    row = results.get(name, {})
    value = (row.get(key) or [None] * (i + 1))[i]
    waits = (row.get(f"{key}_waits") or [None] * (i + 1))[i]
    text = f"{name} at {T}"
    if value is not None:
        text += f": {value:.3g} s"
    waits = [w for w in (waits or []) if w is not None]
    if waits:
        text += f" (wait {statistics.median(waits):.0%})"
    return text


def widest_cells(results: dict, key: str, n: int = 3) -> list[list]:
    """The ``n`` cells whose repeats disagree most (max / min), for runs flagged without per-cell waits."""
    spread = []
    for name in results["models"]:
        for T, reps in zip(results["seq_lengths"], results[name].get(f"{key}_repeats") or [], strict=False):
            if reps and min(reps) > 0:
                spread.append((max(reps) / min(reps), name, T))
    return [[name, T] for _, name, T in sorted(spread, reverse=True)[:n]]


def describe_control(noise: dict, digits: int = 2) -> str | None:
    """The A/A control in one phrase (its cell, the ratio of its two timings per round, the noise floor: its two
    medians' disagreement), or None where the record has none; ``digits`` decimals for the ratios (the floor, a
    percentage, gets two fewer)."""
    c = noise.get("control")
    if not (c and c.get("ratios")):
        return None
    floor = noise.get("noise_floor")
    return (f"A/A control ({c['model']} at {c['seq_length']}, timed twice per round): ratios "
            + ", ".join(f"{r:.{digits}f}" for r in c["ratios"])
            + (f" -> noise floor {floor:.{max(digits - 2, 0)}%}" if floor is not None else ""))


def noise_warning(results: dict) -> str | None:
    """The text ``bsbr compare`` / ``bsbr scaling`` print (and compare_models warns) for a noisy run, else None."""
    noise = results.get("noise")
    if not isinstance(noise, dict) or not noise.get("noisy"):
        return None
    key = "inference_time" if "inference_time" in results["metrics"] else "time"
    cells = noise.get("noisy_cells") or []
    lines = ["warning: this run's timings are noise, not findings: " + "; ".join(noise.get("reasons", [])) + "."]
    if cells:
        shown = ", ".join(cell_label(results, name, T, key) for name, T in cells[:8])
        lines.append(f"  noisy cells ({len(cells)}): {shown}" + (", ..." if len(cells) > 8 else ""))
    else:
        widest = widest_cells(results, key)
        if widest:
            lines.append("  no cell waited measurably for a CPU; the repeats that disagree most: "
                         + ", ".join(cell_label(results, name, T, key) for name, T in widest))
    control = describe_control(noise)
    if control:
        lines.append("  " + control)
    todo = []
    n = suggested_threads(noise)
    if n is not None:
        todo.append(f"--threads {n} (torch's {noise['threads']} intra-op threads share {noise['cores']} cores with "
                    "other processes' runnable threads)")
    todo += ["run at a quieter moment", "more --repeats (the median then outvotes bursts)"]
    lines.append("  what to do: " + "; or ".join(todo) + ".")
    lines.append("  The report opens with this warning and marks the fits and crossovers it makes unreliable.")
    return "\n".join(lines)


def busy_warning(others: float | None, threads: int, n_cores: int) -> str | None:
    """Said before a run when the machine is already busy (the run still goes on)."""
    if not overloaded(others, threads, n_cores):
        return None
    return (f"note: the machine is busy before the run ({others:.1f} runnable threads of other processes beside "
            f"our {threads} on {n_cores} cores); the timings may be noise (the run checks and says so at the end)")
