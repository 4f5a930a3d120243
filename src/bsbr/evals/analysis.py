"""Fits and tables over the results of :func:`bsbr.evals.compare_models` / :func:`scaling_analysis`."""

from __future__ import annotations

import math

from .._files import is_number
from .results import validate_results


def fit_power_law(xs: list[float], ys: list[float]) -> dict:
    """Least-squares fit of y = a * x^k on log-log axes.

    Returns {"k", "a", "r2", "range": [min x, max x], "points"}.  Needs two or more positive points.
    """
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        raise ValueError(f"a power-law fit needs at least 2 positive points, got {len(pts)}")
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        raise ValueError("a power-law fit needs at least 2 distinct x values")
    k = sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / sxx
    b = my - k * mx
    ss_res = sum((y - (k * x + b)) ** 2 for x, y in zip(lx, ly, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ly)
    return {"k": k, "a": math.exp(b), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "range": [min(x for x, _ in pts), max(x for x, _ in pts)], "points": len(pts)}


def complexity_class(k: float) -> str:
    """The growth class an exponent supports (within 0.15 of 0, 1 or 2; otherwise the exponent itself)."""
    for name, centre in (("constant", 0.0), ("linear", 1.0), ("quadratic", 2.0)):
        if abs(k - centre) <= 0.15:
            return name
    return f"~n^{k:.2f}"


def crossovers(lengths: list[int], a: list[float], b: list[float]) -> list[dict]:
    """Where the faster of two series changes between consecutive measured lengths."""
    out = []
    for i in range(1, len(lengths)):
        if None in (a[i - 1], a[i], b[i - 1], b[i]):
            continue
        before, after = a[i - 1] < b[i - 1], a[i] < b[i]
        if before != after:
            out.append({"between": [lengths[i - 1], lengths[i]], "first_faster_after": after})
    return out


def analyze_results(results: dict, metric: str | None = None, baseline: str | None = None) -> dict:
    """Fit ``metric`` (default: the first timing metric present) = a n^k per model, classify it, find
    crossovers between every pair of models, and divide every value by ``baseline``'s (default Standard if
    present, else the first model).

    Returns {"metric", "baseline", "fits": {model: fit + "class"}, "crossovers": {"A vs B": [...]},
    "relative": {model: [value / baseline value per length]}}.
    """
    validate_results(results, "results", complete=False)
    models = results["models"]
    lengths = results["seq_lengths"]
    present = [m for m in ("inference_time", "time", "memory_usage", "memory", "flops")
               if m in results[models[0]]]
    metric = metric or (present[0] if present else None)
    if metric is None or metric not in results[models[0]]:
        raise ValueError(f"metric must be one of {present}, got {metric!r}")
    for m in models:
        if not isinstance(results[m].get(metric), list) or len(results[m][metric]) != len(lengths):
            raise ValueError(f"results: field {m!r}.{metric!r} is missing or not a list of {len(lengths)} value(s); "
                             f"every model needs {metric!r} at each of 'seq_lengths'")
        for j, v in enumerate(results[m][metric]):
            if v is not None and not is_number(v):
                raise ValueError(f"results: field {m!r}.{metric!r}[{j}] is {v!r}; expected a finite number or null")
    baseline = baseline or ("Standard" if "Standard" in models else models[0])
    if baseline not in models:
        raise ValueError(f"baseline must be one of {models}, got {baseline!r}")
    fits = {}
    for m in models:
        try:
            fit = fit_power_law(lengths, results[m][metric])
            fits[m] = {**fit, "class": complexity_class(fit["k"])}
        except ValueError as err:
            fits[m] = {"error": str(err)}
    cross = {}
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            found = crossovers(lengths, results[a][metric], results[b][metric])
            if found:
                cross[f"{a} vs {b}"] = found
    base = results[baseline][metric]
    relative = {m: [(v / bv if v is not None and bv else None) for v, bv in zip(results[m][metric], base, strict=True)]
                for m in models}
    return {"metric": metric, "baseline": baseline, "seq_lengths": lengths, "fits": fits, "crossovers": cross,
            "relative": relative}
