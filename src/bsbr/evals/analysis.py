"""Fits and tables over the results of :func:`bsbr.evals.compare_models` / :func:`scaling_analysis`."""

from __future__ import annotations

import math

from .._files import is_number
from .noise import R2_LIMIT
from .results import validate_results

TIMED = ("inference_time", "time")  # metrics measured with a spread; the others are exact counts


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

    For a timing metric every fit and crossover also says whether it can be trusted: ``"reliable"`` (fits) and
    ``"resolved"`` (crossovers) are True, False or None (the file records too little to tell: no spread, or no
    ``"noise"`` record for fits), with ``"why"`` in words.  A fit is unreliable when the run was noisy and the
    fit's R^2 is below :data:`~bsbr.evals.noise.R2_LIMIT` or the model has noisy cells.  A crossover is
    resolved only if at both lengths around it neither cell is noisy, the two models' repeats (else their
    quartiles) do not overlap and their ratio exceeds 1 + the A/A noise floor.  Exact counts (memory, FLOPs)
    resolve every crossover.
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
    noise = results.get("noise") if isinstance(results.get("noise"), dict) and metric in TIMED else None
    if metric in TIMED:
        for m, fit in fits.items():
            if "k" in fit:
                fit.update(_fit_reliability(m, fit, noise, lengths))
    cross = {}
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            found = crossovers(lengths, results[a][metric], results[b][metric])
            for c in found:
                c.update(_crossover_reliability(results, metric, a, b, c["between"], noise))
            if found:
                cross[f"{a} vs {b}"] = found
    base = results[baseline][metric]
    relative = {m: [(v / bv if v is not None and bv else None) for v, bv in zip(results[m][metric], base, strict=True)]
                for m in models}
    return {"metric": metric, "baseline": baseline, "seq_lengths": lengths, "fits": fits, "crossovers": cross,
            "relative": relative}


def _fit_reliability(model: str, fit: dict, noise: dict | None, lengths: list[int]) -> dict:
    if noise is None:
        return {"reliable": None, "why": "no noise record (a results file from before schema 2)"}
    if not noise.get("noisy"):
        return {"reliable": True, "why": "quiet run"}
    bad = [T for m, T in noise.get("noisy_cells", []) if m == model and T in lengths]
    why = []
    if fit["r2"] < R2_LIMIT:
        why.append(f"R^2 {fit['r2']:.2f} < {R2_LIMIT}")
    if bad:
        why.append("noisy cells at " + ", ".join(str(T) for T in sorted(bad)))
    return {"reliable": not why, "why": "; ".join(why) if why else "noisy run, but no noisy cell of this model"}


def _cell_range(results: dict, model: str, metric: str, j: int) -> tuple[float, float, str] | None:
    """(lowest, highest, "repeats") of a cell's repeats, else (p25, p75, "quartiles"); None if the file keeps
    neither."""
    row = results[model]
    reps = row.get(f"{metric}_repeats")
    if isinstance(reps, list) and j < len(reps) and reps[j]:
        return min(reps[j]), max(reps[j]), "repeats"
    spread = row.get(f"{metric}_spread")
    if isinstance(spread, list) and j < len(spread) and spread[j]:
        return min(spread[j]), max(spread[j]), "quartiles"
    return None


def _separated(results, metric, a, b, j, noise) -> tuple[bool | None, str]:
    T = results["seq_lengths"][j]
    noisy = {(m, t) for m, t in (noise or {}).get("noisy_cells", [])}
    for m in (a, b):
        if (m, T) in noisy:
            return False, f"{m} at {T} is a noisy cell"
    va, vb = results[a][metric][j], results[b][metric][j]
    ratio = max(va, vb) / min(va, vb) if min(va, vb) > 0 else math.inf
    floor = (noise or {}).get("noise_floor")
    if floor is not None and ratio - 1 <= floor:
        return False, f"at {T} they differ by {ratio - 1:.0%}, within the A/A noise floor {floor:.0%}"
    ra, rb = _cell_range(results, a, metric, j), _cell_range(results, b, metric, j)
    if ra is None or rb is None:
        return None, f"no spread recorded at {T}"
    if ra[0] <= rb[1] and rb[0] <= ra[1]:
        what = "repeats" if ra[2] == rb[2] == "repeats" else "quartiles"
        return False, f"at {T} their {what} overlap ({a} {ra[0]:.3g}..{ra[1]:.3g}, {b} {rb[0]:.3g}..{rb[1]:.3g})"
    return True, f"separated at {T} ({ratio:.2f}x)"


def _crossover_reliability(results, metric, a, b, between, noise) -> dict:
    lengths = results["seq_lengths"]
    js = [lengths.index(T) for T in between]
    ratios = [results[a][metric][j] / results[b][metric][j] if results[b][metric][j] else None for j in js]
    if metric not in TIMED:
        return {"ratios": ratios, "resolved": True, "why": "exact counts"}
    checks = [_separated(results, metric, a, b, j, noise) for j in js]
    found = {ok for ok, _ in checks}
    resolved = False if False in found else (None if None in found else True)
    why = "; ".join(w for ok, w in checks if ok is resolved or (resolved is None and ok is None))
    return {"ratios": ratios, "resolved": resolved, "why": why}
