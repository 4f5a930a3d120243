"""MQAR bs128, seed 0: how the T = 512 cells' shared first 5,500 steps compare with the T = 256 cells', and the
seconds a training step at T = 512; for every T = 512 cell, the minutes its recorded time spent paused; for every
T = 256 and T = 512 cell, its test accuracy by query-to-key distance and its valid accuracy at each evaluation
(the report pools seeds; these are the per-seed numbers experiments/NOTES.md quotes in "T = 512 with the same
recipe").

A cell's recorded "seconds" is wall time, so a process stopped for a while (``kill -STOP`` while the test suite
ran) records the pause as training time.  The curve logs the elapsed seconds every 10 steps; an interval more
than ``STALL`` times its stage's median interval counts as a pause, and its excess over that median as paused
time.  That is a lower bound: a pause shorter than ``STALL - 1`` intervals of its stage goes unnoticed (under
2.5 minutes in GAU's T = 512 stage, whose 10 steps take about 37 s).

    python experiments/curve_drift.py
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "recall_curriculum_bs128.json"
SHARED = 5500  # the steps both cells train on the same batches (the T = 64 and T = 128 stages)
STAGE_ENDS = (5000, 5500)  # the bs128 curriculum's last steps at T = 64 and T = 128; later steps are at T = 512
STALL = 5


def stage_ends(run: dict) -> tuple[int, ...]:
    """The last step of each curriculum stage of a recorded run."""
    return tuple(itertools.accumulate(stage["steps"] for stage in run["task"]["curriculum"]))


def paused_seconds(curve: list[dict], ends: tuple[int, ...] = STAGE_ENDS) -> float:
    """Seconds of ``curve`` (entries with "step" and elapsed "seconds") spent in pauses: the excess over its
    stage's median (stages ending at steps ``ends``) of each logged interval longer than ``STALL`` times that
    median."""
    previous, intervals = 0.0, []  # (stage index, seconds) for each logged interval
    for e in curve:
        intervals.append((sum(e["step"] > end for end in ends), e["seconds"] - previous))
        previous = e["seconds"]
    medians = {k: statistics.median(x for j, x in intervals if j == k) for k, _ in intervals}
    return sum(x - medians[j] for j, x in intervals if x > STALL * medians[j])


def main() -> None:
    runs = json.loads(RESULTS.read_text())["runs"]
    print("model          s/step at T=512 (5600-6500)  first step |diff| > 1e-3  max |diff| (steps <= 5500)")
    for model in ("BSBR", "Linear", "Standard", "Hopfield", "DeltaNet", "SlidingWindow", "GAU"):
        long = {e["step"]: e for e in runs[f"{model}|T=512|h=64|lr=0.003|seed=0"]["curve"]}
        short = runs[f"{model}|T=256|h=64|lr=0.003|seed=0"]["curve"]
        diffs = [(e["step"], abs(e["loss"] - long[e["step"]]["loss"])) for e in short if e["step"] <= SHARED]
        per_step = (long[6500]["seconds"] - long[5600]["seconds"]) / 900
        first = next((step for step, d in diffs if d > 1e-3), "never")
        print(f"{model:14s} {per_step:27.2f}  {first!s:>27}  {max(d for _, d in diffs):.2g}")
    print("\ncell (T = 512)                             recorded min  paused min  stepping min")
    for key, run in runs.items():
        if "|T=512|" in key:
            paused = paused_seconds(run["curve"], stage_ends(run))
            print(f"{key:42s} {run['seconds'] / 60:12.1f}  {paused / 60:10.1f}  {(run['seconds'] - paused) / 60:12.1f}")
    print("\ncell: test accuracy by query-to-key distance; valid accuracy at step")
    for key, run in runs.items():
        if "|T=256|" in key or "|T=512|" in key:
            distance = " ".join(f"{b['distance_lo'] + 1}-{b['distance_hi']}:{b['accuracy']:.2f}"
                                for b in run["test"]["by_distance"] if b["total"])
            valid = " ".join(f"{e['step']}:{e['accuracy']:.2f}" for e in run.get("evals", []))
            print(f"{key}\n    distance {distance}\n    valid    {valid}")


if __name__ == "__main__":
    main()
