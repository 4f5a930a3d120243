"""Write results, analyses, plots and a Markdown + HTML report into one directory."""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path

from .analysis import TIMED, analyze_results
from .noise import WAIT_LIMIT, describe_control, noise_warning
from .results import METRIC_UNITS, validate_results


def _noisy_cells(results: dict) -> set:
    noise = results.get("noise")
    return {(m, T) for m, T in noise.get("noisy_cells", [])} if isinstance(noise, dict) else set()


def _table(results: dict, metric: str) -> list[str]:
    """One row per model; a timed metric shows "median (p25-p75)" and marks noisy cells with "!"."""
    label, unit, scale = METRIC_UNITS.get(metric, (metric, "", 1.0))
    lengths = results["seq_lengths"]
    noisy = _noisy_cells(results) if metric in TIMED else set()
    rows = [f"| model | params | {' | '.join(str(t) for t in lengths)} |", "|---" * (len(lengths) + 2) + "|"]
    for name in results["models"]:
        spread = results[name].get(f"{metric}_spread") or []
        vals = []
        for j, v in enumerate(results[name][metric]):
            text = "-" if v is None else f"{v * scale:.4g}"
            if v is not None and j < len(spread) and spread[j]:
                text += f" ({spread[j][0] * scale:.3g}–{spread[j][1] * scale:.3g})"
            vals.append(text + (" !" if (name, lengths[j]) in noisy else ""))
        params = results[name].get("parameters")
        rows.append(f"| {name} | {params:,} | " if params else f"| {name} | - | ")
        rows[-1] += " | ".join(vals) + " |"
    title = f"**{metric}**: {label}" + (f" ({unit})" if unit else "")
    if metric in TIMED and any(results[n].get(f"{metric}_spread") for n in results["models"]):
        title += ", median (quartiles) of the repeats"
    notes = [f"! = noisy cell: our threads waited for a CPU more than {WAIT_LIMIT:.0%} of the time they were ready "
             "to run (median over the repeats)."] \
        if noisy & {(n, T) for n in results["models"] for T in lengths} else []
    return [title, "", *rows, "", *notes, *([""] if notes else [])]


def _banner(results: dict) -> list[str]:
    """The warning that opens the report of a noisy run."""
    text = noise_warning(results)
    if not text:
        return []
    lines = text.splitlines()
    out = ["> **Warning: this run was noisy; read its timings as noise, not findings.** "
           + lines[0].removeprefix("warning: this run's timings are noise, not findings: ")]
    out += ["> " + line.strip() for line in lines[1:-1]]
    out.append("> Fits and crossovers that the noise can explain are marked unreliable below.")
    return [*out, ""]


def _noise_line(results: dict) -> list[str]:
    """What the run measured about the machine, or that the file predates these measurements."""
    noise = results.get("noise")
    if not isinstance(noise, dict):
        if any(m in TIMED for m in results["metrics"]):
            return [f"Noise: not recorded (results schema {results.get('schema', 0)}, from before the load checks "
                    "and the A/A control); crossovers are judged by the quartiles alone.", ""]
        return []
    parts = [f"{noise.get('threads')} threads on {noise.get('cores')} cores"]
    if noise.get("others_before") is not None:
        during = [o for o in noise.get("others_during", []) if o is not None]
        parts.append(f"other processes' runnable threads {noise['others_before']:.1f} before the run"
                     + (f", {min(during):.1f}..{max(during):.1f} per round during it" if during else ""))
    if noise.get("loadavg_before"):
        parts.append(f"1-min load average {noise['loadavg_before'][0]} before, "
                     f"{(noise.get('loadavg_after') or ['?'])[0]} after")
    control = describe_control(noise, digits=3)
    if control:
        parts.append(control)
    verdict = "noisy" if noise.get("noisy") else "quiet"
    return [f"Noise ({noise.get('method')}): " + "; ".join(parts) + f". Verdict: {verdict}.", ""]


def _crossover_lines(crossovers: dict) -> list[str]:
    """Crossovers larger than the noise as findings; the others listed apart, each with its reason."""
    stated, unreliable = [], []
    for pair, found in crossovers.items():
        for c in found:
            first = pair.split(" vs ")[0 if c["first_faster_after"] else 1]
            where = f"between {c['between'][0]} and {c['between'][1]}"
            if c.get("resolved") is False:
                unreliable.append(f"- {pair}, {where}: {c['why']}")
            elif c.get("resolved") is None and "resolved" in c:
                stated += [f"Crossover {pair}: {first} becomes the smaller {where} ({c['why']}: not checked "
                           "against the noise).", ""]
            else:
                stated += [f"Crossover {pair}: {first} becomes the smaller {where}.", ""]
    if unreliable:
        unreliable = [f"Unreliable, not findings: {len(unreliable)} swap(s) of order within the noise", "",
                      *unreliable, ""]
    return stated + unreliable


def _repeats_csv(results: dict, metric: str) -> str:
    """Long form: one row per (model, length) with min, quartiles, median, max, each repeat and its wait."""
    rows = ["model,seq_length,min,p25,median,p75,max,repeats,waits"]
    for name in results["models"]:
        row = results[name]
        for j, T in enumerate(results["seq_lengths"]):
            reps = (row.get(f"{metric}_repeats") or [None] * (j + 1))[j]
            waits = (row.get(f"{metric}_waits") or [None] * (j + 1))[j]
            spread = (row.get(f"{metric}_spread") or [])
            p25, p75 = spread[j] if j < len(spread) and spread[j] else (None, None)
            cols = [min(reps) if reps else None, p25, row[metric][j], p75, max(reps) if reps else None]
            rows.append(",".join([name, str(T), *("" if v is None else repr(v) for v in cols),
                                  " ".join(repr(v) for v in reps or []),
                                  " ".join("" if w is None else repr(w) for w in waits or [])]))
    return "\n".join(rows) + "\n"


def _attention_section(results: dict, out: Path, T: int = 320) -> list[str]:
    """Heatmaps of each model's effective token-to-token weights (layer 0, first heads) on T random tokens,
    with the fraction of exactly-zero weights; models without token-to-token weights are listed as such."""
    import matplotlib.pyplot as plt
    import torch

    from ..models import build_model, list_models
    from ..utils.visualization import visualize_attention

    s = results["settings"]
    lines = ["## Attention maps", "", f"Layer 0 of each model (hidden {s.get('hidden_dim')}, random weights, "
             f"{T} random tokens); sparsity = fraction of exactly-zero weights over all layers and heads.", ""]
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0))
    for name in results["models"]:
        if name not in list_models():
            lines += [f"- {name}: not a registered model here, so no attention map", ""]
            continue
        torch.manual_seed(0)
        model = build_model(name, vocab_size=256, hidden_dim=s.get("hidden_dim", 128),
                            num_layers=s.get("num_layers", 2), num_heads=s.get("num_heads", 4),
                            ff_dim=s.get("ff_dim", 512), dropout=0.0)
        try:
            w = model.get_attention_weights(ids)
        except (NotImplementedError, AttributeError) as err:
            lines += [f"- {name}: no token-to-token weights ({err})", ""]
            continue
        fig = plt.figure(figsize=(12, 3.2))
        visualize_attention(w, fig=fig)
        fig.suptitle(f"{name}: sparsity {(w == 0).float().mean():.1%}")
        fig.savefig(out / f"attention_{name}.png", dpi=90)
        plt.close(fig)
        lines += [f"![{name} attention](attention_{name}.png)", ""]
    return lines


def write_report(results: dict, out_dir: str | Path, source: str | Path = "results") -> Path:
    """Analyse ``results`` and write results.json, analysis.json, one CSV per metric, PNG plots and
    report.md / report.html into ``out_dir``.  Returns the path of report.md.

    ``results`` is checked first (:func:`~bsbr.evals.results.validate_results`; ``source`` names it in the
    messages) and every file is written to a temporary folder and moved into ``out_dir`` only once all are
    done, so a failure leaves ``out_dir`` as it was.  A results.json already there with the same content is
    left untouched."""
    validate_results(results, source)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; the report needs a directory to write into")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as tmp:
        _write_all(results, Path(tmp))
        old = out / "results.json"
        if old.is_file() and _same_json(old, Path(tmp) / "results.json"):
            os.remove(Path(tmp) / "results.json")
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)
    return out / "report.md"


def _same_json(a: Path, b: Path) -> bool:
    try:
        return json.loads(a.read_text()) == json.loads(b.read_text())
    except (OSError, ValueError):
        return False


def _write_all(results: dict, out: Path) -> None:
    from ..utils.visualization import plot_metric, plot_relative_heatmap

    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    s = results["settings"]
    lines = ["# bsbr comparison report", "", *_banner(results),
             f"Machine: {s.get('processor')} ({s.get('machine')}), {s.get('threads')} threads, torch {s.get('torch')}, "
             f"commit {s.get('commit')}, device {s.get('device')}, {s.get('dtype')}.", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()
                                      if k not in ("processor", "machine", "threads", "torch", "commit")), "",
             "Times are medians of warm repeats"
             + (f" ({s.get('repeats')} per cell), timed in interleaved rounds: every round times every (model, "
             "length) cell once, in a new random order, so that background load falls on "
             "all cells alike; in brackets the quartiles; the fastest and each repeat are in "
             + ", ".join(f"{m}_repeats.csv" for m in results["metrics"] if m in TIMED)
             if s.get("timing") == "interleaved rounds" else "") + "; memory is "
             + str(s.get("memory_kind", "activation bytes")) + ".", "", *_noise_line(results)]
    analyses = {}
    for metric in results["metrics"]:
        lines += [f"## {metric}", ""] + _table(results, metric)
        if metric == "flops" and all("flops_counted" in results[n] for n in results["models"]):
            lines += ["Analytic counts (bsbr.evals.flops: every matmul of the fast path, full blocks). "
                      "FlopCounterMode's count of the same forward, for comparison (it misses the fused CPU SDPA "
                      "kernel, in-place baddbmm_ and triangular solves):", "", *_table(results, "flops_counted")]
        csv = ["model," + ",".join(str(t) for t in results["seq_lengths"])]
        csv += [name + "," + ",".join("" if v is None else repr(v) for v in results[name][metric])
                for name in results["models"]]
        (out / f"{metric}.csv").write_text("\n".join(csv) + "\n")
        if metric in TIMED and any(results[n].get(f"{metric}_spread") for n in results["models"]):
            (out / f"{metric}_repeats.csv").write_text(_repeats_csv(results, metric))
        if metric == "accuracy":
            plot_metric(results, metric, str(out / f"{metric}.png"))
            lines += [f"![{metric}]({metric}.png)", ""]
            continue
        a = analyses[metric] = analyze_results(results, metric)
        lines += ["| model | k (fit) | R^2 | class | range |", "|---|---|---|---|---|"]
        for name, fit in a["fits"].items():
            if "k" in fit:
                cls = fit["class"] if fit.get("reliable") is not False else f"**unreliable** ({fit['why']})"
                lines.append(f"| {name} | {fit['k']:.3f} | {fit['r2']:.4f} | {cls} | "
                             f"{fit['range'][0]}..{fit['range'][1]} |")
        lines += ["", *_crossover_lines(a["crossovers"])]
        plot_metric(results, metric, str(out / f"{metric}.png"))
        plot_relative_heatmap(a, str(out / f"{metric}_relative.png"))
        lines += ["", f"![{metric}]({metric}.png)", "", f"![{metric} relative]({metric}_relative.png)", ""]
    lines += _attention_section(results, out)
    (out / "analysis.json").write_text(json.dumps(analyses, indent=2))
    md = "\n".join(lines) + "\n"
    (out / "report.md").write_text(md)
    body = []
    for line in md.splitlines():
        if line.startswith("![") and "](" in line:
            src = line[line.index("](") + 2 : -1]
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(src)}">')
        else:
            body.append(f"<pre>{html.escape(line)}</pre>" if line else "")
    (out / "report.html").write_text("<!doctype html><meta charset='utf-8'><title>bsbr report</title>\n"
                                     + "\n".join(body) + "\n")
