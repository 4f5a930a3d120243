"""The harness knows when its timings are noise (issue 29): interleaved rounds, every repeat kept, the load and
the A/A control checked, and a noisy run flagged in the results, the CLI's output, the report and the plots."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from bsbr.evals import analyze_results, load_results
from bsbr.evals.measure import time_interleaved
from bsbr.evals.noise import FLOOR_LIMIT, WAIT_LIMIT, NoisyTimingWarning, Probe, assess, cores, noise_warning
from bsbr.evals.report import write_report

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "tests" / "data" / "compare-schema0" / "results.json"  # the default run as committed before schema 1


# --- interleaved rounds ------------------------------------------------------------------------------------------

def test_rounds_visit_every_cell_once_in_a_new_order_with_the_control_in_both_halves():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abcdefgh"}
    run = time_interleaved(fns, rounds=6, control="c", seed=3)
    per_round = len(fns) + 1  # every cell once, the control twice (round 0, the warm-up, has no second control)
    assert len(calls) == len(fns) + 6 * per_round
    rounds = [calls[len(fns) + r * per_round: len(fns) + (r + 1) * per_round] for r in range(6)]
    for order in [calls[:len(fns)], *rounds]:
        assert sorted(set(order)) == sorted(fns)  # no cell repeats before every cell has run
    for order in rounds:
        first, second = [i for i, k in enumerate(order) if k == "c"]
        assert (first < per_round // 2) != (second < per_round // 2)  # one timing in each half of the round
    orders = [tuple(k for k in order if k != "c") for order in [calls[:len(fns)], *rounds]]
    assert len(set(orders)) == len(orders)  # the order changes from round to round
    assert all(len(run["cells"][k]["times"]) == 6 for k in fns) and len(run["control_ratios"]) == 6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_burst_of_load_falls_on_every_cell_and_shows_in_the_control(monkeypatch, seed):
    """A slowdown over the second half of a round hits the cells of that round alike and makes the control's two
    timings (one in each half) disagree; the steady rounds leave both alone.  (A fake clock: each call takes 1
    unit, 10 during the burst.)"""
    import bsbr.evals.measure as measure

    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])
    n_cells = 4

    def cell():
        clock["calls"] += 1
        burst = 4 + 5 + 3 <= clock["calls"] <= 4 + 10  # round 2 (calls 10..14) is slow from its third call on
        clock["now"] += 10.0 if burst else 1.0

    run = time_interleaved(dict.fromkeys(range(n_cells), cell), rounds=3, control=0, seed=seed)
    assert run["control_ratios"] == [1.0, 10.0, 1.0]  # steady rounds agree; the burst caught one of the two
    slow = [k for k in range(n_cells) if max(run["cells"][k]["times"]) == 10.0]
    assert len(slow) >= 2  # the burst fell on several cells, not on one model's row
    assert all(sorted(run["cells"][k]["times"])[1] == 1.0 for k in range(n_cells))  # the median outvotes it


def test_a_cell_faster_than_min_time_is_called_in_a_row_and_timed_per_call(monkeypatch):
    """A fast cell is called on in the warm-up round until min_time has passed, then min_time / (time per call)
    times per timing, and its time is the mean per call; a slow one stays at one call.  (A fake clock in exact
    binary fractions: "fast" takes 1/16 s a call, "slow" 1 s; min_time 0.5 s.)"""
    import bsbr.evals.measure as measure

    clock = {"now": 0.0}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])
    calls = {"fast": 0, "slow": 0}

    def cell(key, dt):
        def fn():
            calls[key] += 1
            clock["now"] += dt
        return fn

    run = time_interleaved({"fast": cell("fast", 1 / 16), "slow": cell("slow", 1.0)}, rounds=3, control="fast",
                           min_time=0.5)
    assert run["cells"]["fast"]["calls"] == 8 and run["cells"]["slow"]["calls"] == 1
    # warm-up: one call, then 8 more to measure the rate; then 3 rounds in which the control is timed twice
    assert calls == {"fast": 1 + 8 + 3 * 2 * 8, "slow": 1 + 3}
    assert run["cells"]["fast"]["times"] == [1 / 16] * 3 and run["cells"]["slow"]["times"] == [1.0] * 3
    assert run["control_ratios"] == [1.0] * 3 and run["control_pairs"] == [[1 / 16, 1 / 16]] * 3


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.02"])
def test_min_time_must_be_a_non_negative_number(bad):
    with pytest.raises((TypeError, ValueError), match="min_time"):
        time_interleaved({"a": lambda: None}, rounds=1, min_time=bad)


def test_a_failing_cell_is_dropped_from_later_rounds_and_its_message_kept():
    calls = []

    def oom():
        calls.append("x")
        raise RuntimeError("out of memory\nmore")

    run = time_interleaved({"ok": lambda: calls.append("ok"), "x": oom}, rounds=3, control="ok")
    assert run["errors"] == {"x": "out of memory"} and calls.count("x") == 1
    assert len(run["cells"]["ok"]["times"]) == 3 and run["cells"]["x"]["times"] == []


# --- the verdict -------------------------------------------------------------------------------------------------

def _cells(wait):
    return {("A", 64): {"times": [1.0, 1.0, 1.0], "waits": [wait] * 3},
            ("B", 64): {"times": [1.0, 1.0, 1.0], "waits": [0.0] * 3}}


@pytest.mark.parametrize(("wait", "others", "ratios", "noisy", "reason"), [
    (0.01, [0.0, 0.2], [1.02, 1.05, 1.01], False, None),
    (WAIT_LIMIT + 0.01, [0.0, 0.0], [1.0, 1.0, 1.0], True, "waited for a CPU"),
    (0.0, [0.0, 0.6], [1.0, 1.0, 1.0], True, "other processes kept up to 0.6 threads runnable"),
    (0.0, [0.0, 0.0], [1.0, 1.0 + FLOOR_LIMIT + 0.1, 1.0 + FLOOR_LIMIT + 0.2], True, "A/A control"),
])
def test_assess_flags_each_cause_and_only_then(wait, others, ratios, noisy, reason):
    control = {"model": "A", "seq_length": 64, "ratios": ratios}
    noise = assess(_cells(wait), control, others, {"others": 0.0, "loadavg": None}, threads=2, n_cores=2,
                   method="proc")
    assert noise["noisy"] is noisy
    assert noise["noisy_cells"] == ([["A", 64]] if wait > WAIT_LIMIT else [])
    assert (reason is None and not noise["reasons"]) or any(reason in r for r in noise["reasons"])
    assert noise["noise_floor"] == pytest.approx(sorted(ratios)[1] - 1, abs=1e-4)


@pytest.mark.parametrize(("pairs", "floor"), [
    ([[1.0, 1.0], [1.0, 10.0], [1.0, 1.0]], 0.0),  # a burst in one round: the medians outvote it, as they do a cell's
    ([[1.0, 1.5], [1.0, 1.5], [1.0, 1.0]], 0.5),  # the second halves slower in most rounds: the medians differ
    ([[1.2, 1.0], [1.0, 1.2], [1.1, 1.1]], 0.0),  # jitter both ways: per-round ratios 1.2, but equal medians
])
def test_the_noise_floor_is_how_far_the_controls_two_medians_disagree(pairs, floor):
    ratios = [max(p) / min(p) for p in pairs]
    noise = assess(_cells(0.0), {"model": "A", "seq_length": 64, "ratios": ratios, "pairs": pairs}, [0.0] * 3,
                   {"others": 0.0, "loadavg": None}, threads=2, n_cores=2, method="proc")
    assert noise["noise_floor"] == pytest.approx(floor, abs=1e-4)
    assert noise["noisy"] is (floor > FLOOR_LIMIT)


def test_compare_records_the_controls_pairs_and_the_calls_per_timing():
    from bsbr.evals import compare_models, validate_results

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyTimingWarning)
        r = compare_models([32], models=["Standard"], metrics=["inference_time"], hidden_dim=16, num_heads=2,
                           repeats=2, threads=1, progress=False, min_time=0.05)
    validate_results(r)
    control = r["noise"]["control"]
    assert len(control["pairs"]) == 2
    assert control["ratios"] == pytest.approx([max(p) / min(p) for p in control["pairs"]], abs=2e-4)  # (rounded)
    calls = r["Standard"]["inference_time_calls"][0]
    # a 32-token forward of this model takes well under min_time (~0.3 ms; a preempted call ~10 ms): several calls
    # per timing, and the time kept is per call (a total over the calls would be at least min_time)
    assert calls > 1 and r["Standard"]["inference_time"][0] < 0.05
    assert r["settings"]["min_time"] == 0.05
    with pytest.raises(ValueError, match="min_time"):
        compare_models([32], models=["Standard"], metrics=["inference_time"], min_time=-1, progress=False)


def _results(noise=None, a_reps=None, b_reps=None):
    """Two models at three lengths; A is slower at 100 and faster from 200 on (the medians cross)."""
    a_reps = a_reps or [[2.0, 2.1, 2.2], [3.0, 3.1, 3.2], [5.0, 5.1, 5.2]]
    b_reps = b_reps or [[1.0, 1.1, 1.2], [4.0, 4.1, 4.2], [8.0, 8.1, 8.2]]
    r = {"schema": 2, "seq_lengths": [100, 200, 400], "models": ["A", "B"], "metrics": ["inference_time"],
         "settings": {"threads": 2}}
    for name, reps in (("A", a_reps), ("B", b_reps)):
        r[name] = {"inference_time": [sorted(x)[1] for x in reps], "inference_time_repeats": reps,
                   "inference_time_spread": [[min(x), max(x)] for x in reps],
                   "inference_time_min": [min(x) for x in reps], "parameters": 10}
    if noise is not None:
        r["noise"] = noise
    return r


QUIET = {"noisy": False, "reasons": [], "noisy_cells": [], "noise_floor": 0.02, "cores": 2, "threads": 2,
         "control": {"model": "A", "seq_length": 200, "ratios": [1.01, 1.02, 1.03]}, "others_during": [0.0]}


def test_a_crossover_is_stated_only_when_larger_than_the_noise():
    [c] = analyze_results(_results(QUIET))["crossovers"]["A vs B"]
    assert c["resolved"] is True and c["between"] == [100, 200]
    # the repeats of A and B overlap at 200: the same medians no longer resolve the crossover
    overlap = _results(QUIET, b_reps=[[1.0, 1.1, 1.2], [3.05, 4.1, 4.2], [8.0, 8.1, 8.2]])
    [c] = analyze_results(overlap)["crossovers"]["A vs B"]
    assert c["resolved"] is False and "overlap" in c["why"]
    # separated repeats, but a noise floor as large as the difference (3.1 vs 4.1: 32%)
    [c] = analyze_results(_results({**QUIET, "noise_floor": 0.4}))["crossovers"]["A vs B"]
    assert c["resolved"] is False and "noise floor 40%" in c["why"]
    # a noisy cell on either side
    noisy = {**QUIET, "noisy": True, "reasons": ["x"], "noisy_cells": [["B", 100]]}
    a = analyze_results(_results(noisy))
    assert a["crossovers"]["A vs B"][0]["resolved"] is False and "B at 100 is a noisy cell" in a["crossovers"][
        "A vs B"][0]["why"]
    assert a["fits"]["B"]["reliable"] is False and a["fits"]["A"]["reliable"] is True


def test_a_low_r2_fit_is_unreliable_in_a_noisy_run_only():
    zigzag = [[1.0, 1.0, 1.0], [4.0, 4.0, 4.0], [1.5, 1.5, 1.5]]  # R^2 far below 0.95
    for noise, reliable in ((QUIET, True), ({**QUIET, "noisy": True, "reasons": ["x"]}, False), (None, None)):
        fit = analyze_results(_results(noise, a_reps=zigzag))["fits"]["A"]
        assert fit["r2"] < 0.5 and fit["reliable"] is reliable, (noise, fit)


def test_memory_crossovers_are_exact():
    r = _results(QUIET)
    for name in ("A", "B"):
        r[name]["memory_usage"] = [v * 1000 for v in r[name]["inference_time"]]
    r["metrics"].append("memory_usage")
    [c] = analyze_results(r, "memory_usage")["crossovers"]["A vs B"]
    assert c["resolved"] is True


def test_scaling_analysis_keeps_the_repeats_waits_and_noise_record():
    from bsbr.evals import scaling_analysis, validate_results

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyTimingWarning)  # this test reads the record, whatever the load
        r = scaling_analysis([32, 64], models=["Linear", "BSBR"], metrics=["time", "flops"], hidden_dim=16,
                             num_heads=2, repeats=3, progress=False)
    validate_results(r)
    assert r["schema"] == 2 and isinstance(r["noise"]["noisy"], bool) and len(r["noise"]["control"]["ratios"]) == 3
    for name in ("Linear", "BSBR"):
        row = r[name]
        for j in range(2):
            reps = row["time_repeats"][j]
            assert len(reps) == len(row["time_waits"][j]) == 3
            assert row["time_min"][j] == min(reps) <= row["time_spread"][j][0] <= row["time"][j] == sorted(reps)[1]
            assert row["time_spread"][j][1] <= max(reps)


def test_the_control_is_standard_at_the_middle_length_when_measured():
    """A model whose time depends on its place in the round would read as machine noise; Standard is the
    steadiest cell (docs/harness.md), so it is the control whenever it is measured."""
    from bsbr.evals.compare import _control_cell

    fns = {(m, T): None for m in ("BSBR", "Linear", "Standard") for T in (64, 128, 256)}
    assert _control_cell(["BSBR", "Linear", "Standard"], [64, 128, 256], fns) == ("Standard", 128)
    fns.pop(("Standard", 128))  # failed at that length: the first model there
    assert _control_cell(["BSBR", "Linear", "Standard"], [64, 128, 256], fns) == ("BSBR", 128)
    assert _control_cell(["Linear"], [64, 128], {("Linear", 64): None}) == ("Linear", 64)
    assert _control_cell(["Linear"], [64], {}) is None


# --- old files, report, plots --------------------------------------------------------------------------------------

def test_committed_schema_0_file_still_loads_analyses_and_reports(tmp_path):
    results = load_results(COMMITTED)
    assert "noise" not in results and "schema" not in results
    a = analyze_results(results)
    assert all(fit["reliable"] is None for fit in a["fits"].values())  # too little recorded to judge a fit
    # crossovers are judged by the quartiles the file has: Linear and SlidingWindow swap three times, the first two
    # within them
    flips = a["crossovers"]["Linear vs SlidingWindow"]
    assert [c["resolved"] for c in flips] == [False, False, True] and "quartiles overlap" in flips[0]["why"]
    # the report of the same file (its attention maps rebuilt at a small width, to stay quick)
    small = {**results, "models": ["BSBR", "Linear"],
             "settings": {**results["settings"], "hidden_dim": 32, "num_heads": 2, "ff_dim": 64}}
    report = write_report(small, tmp_path).read_text()
    assert "Noise: not recorded (results schema 0" in report and "Warning" not in report
    assert "| BSBR | 1,905,664 | 0.01736 (0.0171–0.0176) |" in report


def test_plot_has_units_on_both_axes_and_quartile_error_bars(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    import bsbr.utils.visualization as vis

    figs = []
    monkeypatch.setattr(vis.plt, "close", lambda fig=None: figs.append(fig))
    r = _results({**QUIET, "noisy": True, "reasons": ["x"], "noisy_cells": [["B", 400]]})
    vis.plot_metric(r, "inference_time", str(tmp_path / "t.png"))
    ax = figs[-1].axes[0]
    assert ax.get_xlabel() == "sequence length (tokens)" and ax.get_ylabel() == "forward time (s)"
    assert "NOISY" in ax.get_title()
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2
    segments = bars[0].lines[2][0].get_segments()  # A's bars: from p25 to p75 of its repeats at each length
    ends = [y for s in segments for y in (s[0][1], s[1][1])]  # flat: pytest >= 9.2 refuses nested approx
    assert ends == pytest.approx([2.0, 2.2, 3.0, 3.2, 5.0, 5.2])
    plt.close("all")
    r["metrics"].append("memory_usage")
    for name in ("A", "B"):
        r[name]["memory_usage"] = [2**20, 2**21, 2**22]
    vis.plot_metric(r, "memory_usage", str(tmp_path / "m.png"))
    ax = figs[-1].axes[0]
    assert ax.get_ylabel() == "activation memory (MiB)" and ax.lines[0].get_ydata().tolist() == [1.0, 2.0, 4.0]
    plt.close("all")


def test_noise_record_is_checked_when_loaded(tmp_path):
    f = tmp_path / "r.json"
    bad = _results({**QUIET, "noisy_cells": [["C", 100]]})
    f.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"'noise'.'noisy_cells'\[0\] is a list of 2 item\(s\); expected a "
                                         r"\[model, length\] pair"):
        load_results(f)
    f.write_text(json.dumps(_results({**QUIET, "noisy": "yes"})))
    with pytest.raises(ValueError, match=r"'noise'.'noisy' is 'yes'; expected true or false"):
        load_results(f)
    f.write_text(json.dumps(_results(QUIET)))
    assert load_results(f)["noise"] == QUIET


# --- the whole command, quiet and under a CPU hog ------------------------------------------------------------------

# 7 rounds: on a shared VM the control's two medians of these millisecond cells disagree by more than FLOOR_LIMIT in
# about 1 run of 12 even with nothing else runnable (benchmarks/bench_aa_floor.py; 3 rounds: 1-3 of 12).
SMALL = ["--lengths", "64", "128", "--models", "BSBR", "Standard", "--hidden-dim", "32", "--num-heads", "2",
         "--repeats", "7"]
HOG = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"  # bounded even if never killed


def _run_compare(out: Path, threads: int, capsys) -> tuple[dict, str, str]:
    from bsbr.cli import main

    assert main(["compare", *SMALL, "--threads", str(threads), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    return json.loads((out / "results.json").read_text()), err, (out / "report.md").read_text()


class _Hog:
    """One busy Python process per core for the length of a ``with`` block (each also ends itself after 60 s)."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(cores())]
        time.sleep(0.5)  # started and spinning
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(timeout=10)


def test_compare_models_under_a_cpu_hog_warns_and_records_the_noisy_cells():
    """One torch thread (quick: no thread waits at a barrier for a preempted sibling) beside one busy process
    per core still has to wait for a CPU, and the runnable count sees the hogs."""
    import torch

    from bsbr.evals import compare_models

    before = torch.get_num_threads()
    with _Hog(), pytest.warns(NoisyTimingWarning) as caught:
        r = compare_models([32, 64], models=["Linear"], metrics=["inference_time"], hidden_dim=16, num_heads=2,
                           repeats=2, threads=1, progress=False)
    assert torch.get_num_threads() == before and r["settings"]["threads"] == r["noise"]["threads"] == 1
    noise = r["noise"]
    assert noise["noisy"] and noise["reasons"], noise
    text = "\n".join(str(w.message) for w in caught)
    for name, T in noise["noisy_cells"]:
        assert f"{name} at {T}" in text
    assert "what to do:" in text and noise_warning(r) in text


@pytest.mark.slow
def test_a_run_under_a_cpu_hog_is_flagged_in_the_output_the_report_and_the_results(tmp_path, capsys):
    n = cores()
    with _Hog():  # one busy process per core
        results, err, report = _run_compare(tmp_path / "cmp", n, capsys)
    noise = results["noise"]
    assert noise["noisy"] and noise["noisy_cells"], noise
    assert "warning: this run's timings are noise, not findings" in err
    name, T = noise["noisy_cells"][0]
    assert f"{name} at {T}" in err and "what to do:" in err and "quieter moment" in err and "--repeats" in err
    assert report.startswith("# bsbr comparison report\n\n> **Warning: this run was noisy")
    analysis = json.loads((tmp_path / "cmp" / "analysis.json").read_text())["inference_time"]
    for pair in analysis["crossovers"].values():  # nothing measured in a noisy cell is stated as a finding
        assert all(c["resolved"] is False for c in pair), pair
    assert results["schema"] == 2
    for model in ("BSBR", "Standard"):
        assert all(len(reps) == 7 for reps in results[model]["inference_time_repeats"])


def test_a_quiet_run_is_not_flagged(tmp_path, capsys):
    """With no other process runnable beside ours (checked before and during), nothing is flagged; on a machine
    that is busy the test cannot say anything and skips, naming the load."""
    threads = max(1, cores() - 1)  # leaves a core for the shell and pytest's own helpers
    probe = Probe(threads)
    others = probe.sample_others(0.5)
    if probe.method != "proc":
        pytest.skip("no /proc: the run-queue waits and runnable counts are Linux-only")
    if others is None or others > 0.3:
        pytest.skip(f"the machine is busy ({others} runnable threads of other processes): not a quiet run")
    results, err, report = _run_compare(tmp_path / "cmp", threads, capsys)
    noise = results["noise"]
    if max([noise["others_before"], *noise["others_during"]]) > 0.3:
        pytest.skip(f"other processes became runnable during the run ({noise['others_during']})")
    assert noise["noisy_cells"] == [] and not any("threads runnable" in r for r in noise["reasons"]), noise
    if noise["noisy"]:  # what is left is the A/A control: the machine's own timing noise, which no test controls
        assert len(noise["reasons"]) == 1 and "A/A control" in noise["reasons"][0], noise
        assert "warning" in err and "A/A control" in err
        pytest.skip(f"nothing else ran, yet the A/A control's medians disagreed by {noise['noise_floor']:.0%} "
                    f"(above {FLOOR_LIMIT:.0%}): this host's own timing noise, flagged as it should be")
    assert "warning" not in err and noise_warning(results) is None
    assert "Warning" not in report and "Verdict: quiet." in report


def test_hog_helper_processes_end_on_their_own():
    """The hog bounds itself (60 s) even if a test run is interrupted before its finally kills it."""
    p = subprocess.Popen([sys.executable, "-c", HOG.replace("60", "0.2")])
    assert p.wait(timeout=30) == 0
