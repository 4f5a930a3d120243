"""Honesty checks of the evaluation harness: the timer, the fit, the memory meter, argument checking."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from bsbr.evals import activation_bytes, analyze_results, compare_models, fit_power_law, time_callable

from conftest import make_lm


def test_timer_measures_a_known_sleep_within_5_percent():
    t = time_callable(lambda: time.sleep(0.05), repeats=5)
    assert abs(t["median"] - 0.05) / 0.05 < 0.05
    assert t["p25"] <= t["median"] <= t["p75"] and len(t["times"]) == 5


def test_timer_quartiles_stay_within_the_measured_times_with_two_repeats():
    t = time_callable(lambda: time.sleep(0.001), repeats=2)  # "exclusive" quantiles would extrapolate beyond both
    assert t["min"] <= t["p25"] <= t["median"] <= t["p75"] <= t["max"]


def test_cli_output_into_a_closed_pipe_is_not_a_traceback():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    results = root / "docs" / "results" / "compare" / "results.json"
    # src/ on the path as pytest's own `pythonpath` setting puts it, so this runs without `pip install -e .` too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(f"{sys.executable} -m bsbr analyze {results} | head -c 10", shell=True, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert len(proc.stdout) == 10


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_fit_recovers_known_exponents(k):
    rng = random.Random(0)
    xs = [64, 128, 256, 512, 1024, 2048]
    ys = [3e-6 * x**k * (1 + rng.uniform(-0.03, 0.03)) for x in xs]
    fit = fit_power_law(xs, ys)
    assert abs(fit["k"] - k) < 0.05 and fit["r2"] > 0.99 and fit["range"] == [64, 2048]


def test_analyze_results_fits_classes_crossovers_and_relative_table():
    lengths = [100, 200, 400, 800]
    results = {"seq_lengths": lengths, "models": ["A", "Standard"],
               "A": {"inference_time": [4e-3 * n / 100 for n in lengths]},
               "Standard": {"inference_time": [1e-3 * (n / 100) ** 2 for n in lengths]}}
    a = analyze_results(results)
    assert a["fits"]["A"]["class"] == "linear" and a["fits"]["Standard"]["class"] == "quadratic"
    # A is slower at 100 and 200 (4e-3 vs 1e-3, 8e-3 vs 4e-3), equal at 400 (16e-3), faster at 800
    [c] = a["crossovers"]["A vs Standard"]
    assert c["between"] == [400, 800] and c["first_faster_after"] is True and c["ratios"] == pytest.approx([1.0, 0.5])
    assert c["resolved"] is None  # no spread in this dict: the crossover cannot be checked against the noise
    assert a["relative"]["Standard"] == [1.0] * 4 and a["relative"]["A"][0] == pytest.approx(4.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"models": ["NoSuchModel"]}, "NoSuchModel"),
    ({"metrics": ["speed"]}, "speed"),
    ({"seq_lengths": []}, "seq_lengths"),
    ({"seq_lengths": [64, 0]}, "seq_lengths"),
    ({"seq_lengths": [64, 128, 64]}, r"seq_lengths must be distinct, got \[64, 128, 64\]"),
    ({"metrics": []}, "metrics"),
])
def test_bad_arguments_fail_before_any_work(kwargs, match, monkeypatch):
    import bsbr.evals.compare as compare

    monkeypatch.setattr(compare, "_build", lambda *a, **k: pytest.fail("work started before validation"))
    with pytest.raises(ValueError, match=match):
        compare_models(**{"seq_lengths": [64], **kwargs})


def test_compare_models_aligned_results_with_settings():
    r = compare_models([32, 64], models=["BSBR", "Standard"], metrics=["inference_time", "memory_usage"],
                       hidden_dim=32, num_heads=2, repeats=2, progress=False)
    assert r["seq_lengths"] == [32, 64] and r["models"] == ["BSBR", "Standard"]
    for name in r["models"]:
        assert len(r[name]["inference_time"]) == 2 and all(v > 0 for v in r[name]["inference_time"])
        assert r[name]["memory_usage"][1] > r[name]["memory_usage"][0] > 0
        assert r[name]["parameters"] > 0
    for key in ("torch", "commit", "threads", "repeats", "memory_kind", "device"):
        assert key in r["settings"]


def test_activation_memory_grows_linearly_for_bsbr_and_quadratically_for_unfused_standard():
    lengths = [128, 256, 512, 1024]

    def series(name, **opts):
        lm = make_lm(name, dtype=torch.float32, **opts)
        if name == "Standard":
            lm.set_attention_impl("reference")  # explicit masked softmax: keeps the T x T weights for backward
        return [activation_bytes(lm, torch.randint(0, 50, (1, T)))["bytes"] for T in lengths]

    bsbr = series("BSBR", chunk_size=32)
    std = series("Standard")
    assert all(1.7 < b / a < 2.3 for a, b in zip(bsbr, bsbr[1:], strict=False))
    assert std[-1] / std[-2] > 3.0 and std[-1] / std[0] > 20


def test_cli_compare_analyze_report_and_ablate(tmp_path, capsys):
    from bsbr.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--lengths", "32", "64", "--models", "BSBR", "Standard", "--hidden-dim", "32",
                 "--num-heads", "2", "--repeats", "1", "--out", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "inference_time.csv").is_file()
    assert main(["analyze", str(out)]) == 0 and "k =" in capsys.readouterr().out
    assert main(["report", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.html").is_file()
    assert main(["ablate", "--length", "64", "--chunk-sizes", "16", "32", "--compression-factors", "0", "4",
                 "--hidden-dim", "32", "--num-heads", "2", "--repeats", "1", "--out", str(tmp_path / "abl")]) == 0
    rows = json.loads((tmp_path / "abl" / "ablation.json").read_text())["rows"]
    assert len(rows) == 4
    by = {(r["chunk_size"], r["compression_factor"]): r for r in rows}
    assert by[(16, 4)]["cache_bytes"] < by[(16, None)]["cache_bytes"]


class _FakeLibc:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


def _pretend_glibc(monkeypatch, libc):
    import ctypes
    import platform

    import bsbr.utils.memory as memory

    monkeypatch.setattr(memory, "_malloc_fixed", False)
    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    return memory


def test_fix_malloc_thresholds_sets_both_and_results_say_so(monkeypatch):
    libc = _FakeLibc()
    memory = _pretend_glibc(monkeypatch, libc)
    assert memory.malloc_setting() == "allocator defaults"
    assert memory.fix_malloc_thresholds() is True
    assert libc.calls == [(-3, 32 << 20), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    r = compare_models([16], models=["Linear"], metrics=["inference_time"], hidden_dim=16, num_heads=2, repeats=1,
                       progress=False)
    assert r["settings"]["malloc"] == memory.malloc_setting() == "fixed glibc thresholds (mmap 32 MiB, no trim)"


def test_fix_malloc_thresholds_without_glibc_or_when_refused(monkeypatch):
    import platform

    memory = _pretend_glibc(monkeypatch, _FakeLibc(answer=0))
    with pytest.raises(RuntimeError, match="mallopt refused parameter -3 = 33554432"):
        memory.fix_malloc_thresholds()
    assert memory.malloc_setting() == "allocator defaults"
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    assert memory.fix_malloc_thresholds() is False and memory.malloc_setting() == "allocator defaults"


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux")
                    or __import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_fix_malloc_thresholds_on_this_glibc(monkeypatch):
    import bsbr.utils.memory as memory

    monkeypatch.setattr(memory, "_malloc_fixed", False)
    assert memory.fix_malloc_thresholds() is True  # the real mallopt accepts both values


def test_cli_fixes_malloc_unless_told_not_to(monkeypatch, tmp_path):
    import bsbr.evals.cli as cli
    from bsbr.cli import main

    calls = []
    monkeypatch.setattr(cli, "fix_malloc_thresholds", lambda: calls.append("fixed") or True)
    small = ["--lengths", "16", "--models", "Linear", "--hidden-dim", "16", "--num-heads", "2", "--repeats", "1"]
    assert main(["compare", *small, "--default-malloc", "--out", str(tmp_path / "a")]) == 0
    assert calls == []
    assert main(["scaling", *small, "--out", str(tmp_path / "b")]) == 0
    assert calls == ["fixed"]


@pytest.mark.parametrize("flag,shown", [([], False), (["--mqar-answers-in-input"], True)])
def test_cli_compare_accuracy_task_with_or_without_answers_in_input(tmp_path, flag, shown):
    """The committed compare-accuracy report predates labels-only MQAR; the flag asks for that task again."""
    from bsbr.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--lengths", "32", "--models", "Standard", "--hidden-dim", "32", "--num-heads", "2",
                 "--repeats", "1", "--metrics", "accuracy", "--accuracy-steps", "1", *flag, "--out", str(out)]) == 0
    options = json.loads((out / "results.json").read_text())["settings"]["accuracy_task_options"]
    assert options.get("answers_in_input", False) is shown and options["vocab_size"] == 256
