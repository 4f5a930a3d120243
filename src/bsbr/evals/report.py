"""Write results, analyses, plots and a Markdown + HTML report into one directory."""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path

from .analysis import analyze_results
from .results import validate_results

UNITS = {"inference_time": ("s", 1.0), "time": ("s", 1.0), "memory_usage": ("MiB", 2**-20), "memory": ("MiB", 2**-20),
         "flops": ("GFLOP", 1e-9), "flops_counted": ("GFLOP", 1e-9), "accuracy": ("", 1.0)}


def _table(results: dict, metric: str) -> list[str]:
    unit, scale = UNITS.get(metric, ("", 1.0))
    lengths = results["seq_lengths"]
    rows = [f"| model | params | {' | '.join(str(t) for t in lengths)} |", "|---" * (len(lengths) + 2) + "|"]
    for name in results["models"]:
        vals = [("-" if v is None else f"{v * scale:.4g}") for v in results[name][metric]]
        params = results[name].get("parameters")
        rows.append(f"| {name} | {params:,} | " if params else f"| {name} | - | ")
        rows[-1] += " | ".join(vals) + " |"
    return [f"**{metric}** ({unit})" if unit else f"**{metric}**", "", *rows, ""]


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
    lines = ["# bsbr comparison report", "",
             f"Machine: {s.get('processor')} ({s.get('machine')}), {s.get('threads')} threads, torch {s.get('torch')}, "
             f"commit {s.get('commit')}, device {s.get('device')}, {s.get('dtype')}.", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()
                                      if k not in ("processor", "machine", "threads", "torch", "commit")), "",
             "Times are medians of warm repeats; memory is " + str(s.get("memory_kind", "activation bytes")) + ".", ""]
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
        if metric == "accuracy":
            plot_metric(results, metric, str(out / f"{metric}.png"))
            lines += [f"![{metric}]({metric}.png)", ""]
            continue
        a = analyses[metric] = analyze_results(results, metric)
        lines += ["| model | k (fit) | R^2 | class | range |", "|---|---|---|---|---|"]
        for name, fit in a["fits"].items():
            if "k" in fit:
                lines.append(f"| {name} | {fit['k']:.3f} | {fit['r2']:.4f} | {fit['class']} | "
                             f"{fit['range'][0]}..{fit['range'][1]} |")
        for pair, found in a["crossovers"].items():
            for c in found:
                first = pair.split(" vs ")[0 if c["first_faster_after"] else 1]
                lines.append(f"\nCrossover {pair}: {first} becomes the smaller between {c['between'][0]} and "
                             f"{c['between'][1]}.")
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
