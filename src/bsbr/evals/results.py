"""The results file that compare_models / scaling_analysis return and ``bsbr compare`` writes, and its one check.

Schema (version :data:`RESULTS_SCHEMA`; files written before the ``"schema"`` field existed are version 0 and
have the same layout as 1; version 2 added every repeat, the waits and the ``"noise"`` record, all optional to
the reader, so files of 0 and 1 load as they are)::

    {"schema": 2, "seq_lengths": [T, ...], "models": [name, ...], "metrics": [metric, ...], "settings": {...},
     "noise": {"noisy": bool, "reasons": [str], "noisy_cells": [[name, T], ...], "noise_floor": float or null,
               "control": {"model", "seq_length", "ratios": [max/min per round], "pairs": [[first-half timing,
                           second-half timing] per round] (since 2026-12-07)} or null, "cores", "threads",
               "others_before", "others_during": [per round], "loadavg_before", "loadavg_after", "method"},
     name: {metric: [value or null per length], "<metric>_spread": [[p25, p75] or null per length],
            "<metric>_min": [fastest repeat or null per length], "<metric>_repeats": [[s, ...] or null per length],
            "<metric>_waits": [[run-queue wait per repeat] or null per length],
            "<metric>_calls": [calls per timing (a fast cell is called several times per timing) or null],
            "parameters": int or null, "errors": {"T": message}, "flops_counted": [...], "flops_parts": [...]}}

Times are seconds; a wait is the share of the time our threads were ready to run during that repeat that they
spent waiting for a CPU (:mod:`bsbr.evals.noise`).  :func:`load_results` reads and checks a file;
:func:`validate_results` checks a dict (analyze_results and write_report call it).  Both raise ``ValueError``
naming the file, the field, the value and what was expected.
"""

from __future__ import annotations

from pathlib import Path

from .. import _files as F

RESULTS_SCHEMA = 2  # the version compare_models / scaling_analysis write
_WHAT = "a results.json as bsbr compare / bsbr scaling write it"
_SIZES = ("hidden_dim", "num_layers", "num_heads", "ff_dim")  # settings the report rebuilds models from
_PER_LENGTH = ("flops_counted",)  # optional per-length numbers beside the metrics
_KNOWN_METRICS = ("inference_time", "memory_usage", "accuracy", "time", "memory", "flops")
# what each metric is, its unit and the factor from the stored value to that unit (tables, CSV headers, plot axes)
METRIC_UNITS = {"inference_time": ("forward time", "s", 1.0), "time": ("forward time", "s", 1.0),
                "memory_usage": ("activation memory", "MiB", 2**-20), "memory": ("activation memory", "MiB", 2**-20),
                "flops": ("forward FLOPs", "GFLOP", 1e-9), "flops_counted": ("forward FLOPs counted", "GFLOP", 1e-9),
                "accuracy": ("held-out accuracy", "fraction correct", 1.0)}


def validate_results(results: object, source: str | Path = "results", complete: bool = True) -> dict:
    """Check ``results`` (a dict as compare_models / scaling_analysis return it) and return it.

    ``source`` names where it came from in the messages (the file path for :func:`load_results`).  With
    ``complete=False`` (what analyze_results needs) "metrics" and "settings" may be absent; every model's
    metric lists present are still checked.
    Raises ``ValueError``: ``<source>: field 'seq_lengths'[1] is 'x'; expected a positive integer``.
    """
    p = source
    r = F.mapping(p, results, (), f"an object {{...}}: {_WHAT}")
    schema = r.get("schema", 0)
    if not F.is_int(schema) or schema < 0:
        F.fail(p, ("schema",), schema, f"a version number 0..{RESULTS_SCHEMA}")
    if schema > RESULTS_SCHEMA:
        raise ValueError(f"{p}: was written with results schema {schema}, by a newer bsbr; this version reads "
                         f"schema 0..{RESULTS_SCHEMA}: upgrade bsbr to read it")
    lengths = F.list_of(p, F.get(p, r, "seq_lengths", (), "a non-empty list of positive integers"),
                        ("seq_lengths",), expected="a non-empty list of positive integers")
    if not lengths:
        F.fail(p, ("seq_lengths",), lengths, "a non-empty list of positive integers")
    for i, t in enumerate(lengths):
        F.int_at_least(p, t, ("seq_lengths", i))
    n = len(lengths)
    models = F.list_of(p, F.get(p, r, "models", (), "a non-empty list of model names"), ("models",),
                       expected="a non-empty list of model names")
    if not models:
        F.fail(p, ("models",), models, "a non-empty list of model names")
    if not complete and "metrics" not in r:  # a hand-made dict: check the metric lists it holds
        metrics = sorted({k for name in models if isinstance(name, str) and isinstance(r.get(name), dict)
                          for k in r[name] if k in _KNOWN_METRICS})
    else:
        metrics = F.list_of(p, F.get(p, r, "metrics", (), "a non-empty list of metric names"), ("metrics",),
                            expected="a non-empty list of metric names")
    if not metrics and (complete or "metrics" in r):
        F.fail(p, ("metrics",), metrics, "a non-empty list of metric names")
    for i, m in enumerate(metrics):
        F.string(p, m, ("metrics", i))
        if m in metrics[:i]:
            F.fail(p, ("metrics", i), m, "a metric named once")
    settings = F.mapping(p, F.get(p, r, "settings", (), "an object of measurement settings"), ("settings",)) \
        if complete or "settings" in r else {}
    for key in _SIZES:
        if key in settings:
            F.int_at_least(p, settings[key], ("settings", key))
    if isinstance(settings.get("hidden_dim"), int) and isinstance(settings.get("num_heads"), int) \
            and settings["hidden_dim"] % settings["num_heads"]:
        F.fail(p, ("settings", "num_heads"), settings["num_heads"],
               f"a divisor of settings.hidden_dim = {settings['hidden_dim']}")
    for i, name in enumerate(models):
        F.string(p, name, ("models", i))
        if name in models[:i]:
            F.fail(p, ("models", i), name, "a model named once")
        if name in ("schema", "seq_lengths", "models", "metrics", "settings", "noise"):
            F.fail(p, ("models", i), name, "a model name, not one of the file's own fields")
        row = F.mapping(p, F.get(p, r, name, (), f"an object with {name}'s measurements"), (name,))
        for m in metrics:
            values = F.list_of(p, F.get(p, row, m, (name,), f"a list of {n} value(s), one per sequence length"),
                               (name, m), n, "a list")
            for j, v in enumerate(values):
                F.number_at_least(p, v, (name, m, j), none=True)
        for key in _PER_LENGTH:
            if key in row:
                for j, v in enumerate(F.list_of(p, row[key], (name, key), n, "a list")):
                    F.number_at_least(p, v, (name, key, j), none=True)
        if "flops_parts" in row:
            for j, v in enumerate(F.list_of(p, row["flops_parts"], (name, "flops_parts"), n, "a list")):
                F.mapping(p, v, (name, "flops_parts", j))
        for key, value in row.items():
            if key.endswith("_spread"):
                _check_spread(p, value, (name, key), n, schema)
            elif key.endswith("_min"):
                for j, v in enumerate(F.list_of(p, value, (name, key), n, "a list")):
                    F.number_at_least(p, v, (name, key, j), none=True)
            elif key.endswith("_calls"):
                for j, v in enumerate(F.list_of(p, value, (name, key), n, "a list")):
                    F.int_at_least(p, v, (name, key, j), 1, none=True)
            elif key.endswith(("_repeats", "_waits")):
                _check_per_repeat(p, value, (name, key), n, none_inside=key.endswith("_waits"))
        F.int_at_least(p, row.get("parameters"), (name, "parameters"), 0, none=True)
        if "errors" in row:
            for length, message in F.mapping(p, row["errors"], (name, "errors")).items():
                F.string(p, message, (name, "errors", length))
    if "noise" in r:
        _check_noise(p, r["noise"], models, lengths)
    return r


def _check_per_repeat(p, value, keys, n, none_inside) -> None:
    for j, reps in enumerate(F.list_of(p, value, keys, n, "a list")):
        if reps is None:
            continue
        if not isinstance(reps, list) or not reps:
            F.fail(p, (*keys, j), reps, "a non-empty list of numbers (one per repeat) or null")
        for k, v in enumerate(reps):
            F.number_at_least(p, v, (*keys, j, k), none=none_inside)


def _check_noise(p, noise, models, lengths) -> None:
    """The fields of the ``"noise"`` record that the analysis and the report read."""
    keys = ("noise",)
    noise = F.mapping(p, noise, keys)
    if not isinstance(noise.get("noisy"), bool):
        F.fail(p, (*keys, "noisy"), noise.get("noisy"), "true or false")
    for i, reason in enumerate(F.list_of(p, noise.get("reasons", []), (*keys, "reasons"), expected="a list")):
        F.string(p, reason, (*keys, "reasons", i))
    for i, cell in enumerate(F.list_of(p, noise.get("noisy_cells", []), (*keys, "noisy_cells"), expected="a list")):
        if not (isinstance(cell, list) and len(cell) == 2 and cell[0] in models and F.is_int(cell[1])
                and cell[1] in lengths):
            F.fail(p, (*keys, "noisy_cells", i), cell, "a [model, length] pair of 'models' and 'seq_lengths'")
    F.number_at_least(p, noise.get("noise_floor"), (*keys, "noise_floor"), none=True)
    for key in ("cores", "threads"):
        F.int_at_least(p, noise.get(key), (*keys, key), none=True)
    F.number_at_least(p, noise.get("others_before"), (*keys, "others_before"), none=True)
    for i, v in enumerate(F.list_of(p, noise.get("others_during", []), (*keys, "others_during"), expected="a list")):
        F.number_at_least(p, v, (*keys, "others_during", i), none=True)
    for key in ("loadavg_before", "loadavg_after"):
        if noise.get(key) is not None:
            for i, v in enumerate(F.list_of(p, noise[key], (*keys, key), expected="a list or null")):
                F.number_at_least(p, v, (*keys, key, i))
    F.string(p, noise.get("method", "unknown"), (*keys, "method"))
    control = noise.get("control")
    if control is not None:
        F.mapping(p, control, (*keys, "control"), "an object {model, seq_length, ratios} or null")
        F.string(p, control.get("model"), (*keys, "control", "model"))
        F.int_at_least(p, control.get("seq_length"), (*keys, "control", "seq_length"))
        for i, v in enumerate(F.list_of(p, control.get("ratios"), (*keys, "control", "ratios"), expected="a list")):
            F.number_at_least(p, v, (*keys, "control", "ratios", i), low=1.0)
        for i, pair in enumerate(F.list_of(p, control.get("pairs", []), (*keys, "control", "pairs"),
                                           expected="a list")):
            if not (isinstance(pair, list) and len(pair) == 2):
                F.fail(p, (*keys, "control", "pairs", i), pair, "a [first-half, second-half] pair of timings")
            for k, v in enumerate(pair):
                F.number_at_least(p, v, (*keys, "control", "pairs", i, k), low=0.0)


def _check_spread(p, spread, keys, n, schema) -> None:
    # Before schema 1 a failed cell appended no spread, so old files may hold fewer spreads than lengths.
    spread = F.list_of(p, spread, keys, None, "a list of [p25, p75] pairs")
    if len(spread) != n and (schema >= 1 or len(spread) > n):
        F.fail(p, keys, spread, f"a list of {n} [p25, p75] pair(s), one per entry of 'seq_lengths'")
    for j, pair in enumerate(spread):
        if pair is None:
            continue
        if not isinstance(pair, list) or len(pair) != 2:
            F.fail(p, (*keys, j), pair, "a [p25, p75] pair of numbers or null")
        for k, v in enumerate(pair):  # any finite number: time_callable's p25 of 2 repeats can fall below 0
            if not F.is_number(v):
                F.fail(p, (*keys, j, k), v, "a finite number")


def results_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/results.json`` when ``path`` is a directory."""
    p = Path(path)
    return p / "results.json" if p.is_dir() else p


def load_results(path: str | Path) -> dict:
    """Read and check a results file (or a directory holding ``results.json``) that ``bsbr compare`` /
    ``bsbr scaling`` / :func:`compare_models` + :func:`write_report` wrote; returns the results dict.

    Raises ``FileNotFoundError`` if there is no such file and ``ValueError`` naming the file and what is wrong
    with it otherwise (not JSON, not UTF-8, a field missing or of the wrong type, lists of unequal lengths,
    a schema newer than this version reads).  Files of schema 0 (before the field existed) load as they are.
    """
    p = results_path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: does not exist; expected {_WHAT} (or a directory holding one)")
    return validate_results(F.read_json(p, _WHAT), p)
