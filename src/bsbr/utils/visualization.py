"""Plots: attention heatmaps, metric vs length on log-log axes with fitted lines, relative-speed heatmaps."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..evals.analysis import TIMED as TIMED_METRICS  # noqa: E402
from ..evals.analysis import fit_power_law  # noqa: E402
from ..evals.results import METRIC_UNITS  # noqa: E402


def visualize_attention(attention_weights: torch.Tensor, layer: int = 0, batch: int = 0, max_heads: int = 4,
                        fig=None):
    """Heatmaps of ``get_attention_weights`` output [L, B, H, T, T] (or [B, H, T, T] / [H, T, T] / [T, T]):
    one panel per head (up to ``max_heads``) of ``layer`` and ``batch`` row, drawn into ``fig`` (default: the
    current figure).  Returns the figure."""
    w = attention_weights.detach().float().cpu()
    if w.dim() == 5:
        w = w[layer]
    if w.dim() == 4:
        w = w[batch]
    if w.dim() == 2:
        w = w[None]
    if w.dim() != 3:
        raise ValueError(f"attention_weights must be [L, B, H, T, T], [B, H, T, T], [H, T, T] or [T, T], got "
                         f"{list(attention_weights.shape)}")
    fig = fig or plt.gcf()
    heads = min(max_heads, w.shape[0])
    for h in range(heads):
        ax = fig.add_subplot(1, heads, h + 1)
        im = ax.imshow(w[h].numpy(), cmap="viridis", aspect="auto")
        ax.set_title(f"head {h}")
        ax.set_xlabel("key position")
        if h == 0:
            ax.set_ylabel("query position")
    fig.colorbar(im, ax=fig.axes, shrink=0.8)
    return fig


def plot_metric(results: dict, metric: str, path: str, ylabel: str | None = None) -> str:
    """``metric`` vs sequence length for every model on log-log axes, in the metric's unit
    (:data:`bsbr.evals.results.METRIC_UNITS`: seconds, MiB, GFLOP), with each model's fitted power law dashed.

    Timed metrics get error bars from the recorded spread (the quartiles of the repeats, ``<metric>_spread``);
    cells that ``results["noise"]`` names as noisy are drawn as red crosses, and a noisy run says so in the
    title.  Writes a PNG to ``path`` and returns it.
    """
    label, unit, scale = METRIC_UNITS.get(metric, (metric, "", 1.0))
    lengths = results["seq_lengths"]
    noise = results.get("noise") if isinstance(results.get("noise"), dict) else {}
    noisy = {(m, T) for m, T in noise.get("noisy_cells", [])}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in results["models"]:
        ys = results[name].get(metric)
        if not ys:
            continue
        spread = results[name].get(f"{metric}_spread") or []
        pts = [(x, y, spread[j] if j < len(spread) else None) for j, (x, y) in enumerate(zip(lengths, ys, strict=True))
               if y]
        if not pts:
            continue
        xs, vs = [p[0] for p in pts], [p[1] * scale for p in pts]
        if any(p[2] for p in pts):  # quartiles around the median (a spread missing at a point: no bar there)
            err = [[max(0.0, v - p[2][0] * scale) if p[2] else 0.0 for v, p in zip(vs, pts, strict=True)],
                   [max(0.0, p[2][1] * scale - v) if p[2] else 0.0 for v, p in zip(vs, pts, strict=True)]]
            line = ax.errorbar(xs, vs, yerr=err, fmt="o-", capsize=3, label=name)[0]
        else:
            line, = ax.plot(xs, vs, "o-", label=name)
        bad = [(x, v) for x, v in zip(xs, vs, strict=True) if (name, x) in noisy]
        if bad:
            ax.plot([b[0] for b in bad], [b[1] for b in bad], "x", color="red", markersize=10, mew=2, zorder=5)
        try:
            fit = fit_power_law(xs, vs)
            grid = [lengths[0] * (lengths[-1] / lengths[0]) ** (i / 50) for i in range(51)]
            ax.plot(grid, [fit["a"] * x ** fit["k"] for x in grid], "--", color=line.get_color(), alpha=0.6,
                    label=f"{name} fit k={fit['k']:.2f}")
        except ValueError:
            pass
    if noisy:
        ax.plot([], [], "x", color="red", mew=2, label="noisy cell")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel or (f"{label} ({unit})" if unit else label))
    if noise.get("noisy"):
        ax.set_title("NOISY RUN: timings disturbed by other processes (see the report)", color="red", fontsize=9)
    elif metric in TIMED_METRICS and any(results[n].get(f"{metric}_spread") for n in results["models"]):
        ax.set_title("median of the repeats; bars: quartiles", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_relative_heatmap(analysis: dict, path: str) -> str:
    """Each model's metric divided by the baseline's, per length (below 1: faster than the baseline)."""
    models = list(analysis["relative"])
    lengths = analysis["seq_lengths"]
    grid = [[v if v is not None else math.nan for v in analysis["relative"][m]] for m in models]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1 + 0.45 * len(models)))
    im = ax.imshow([[math.log2(v) if v == v and v > 0 else math.nan for v in row] for row in grid], cmap="RdYlGn_r",
                   aspect="auto", vmin=-4, vmax=4)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}" if v == v else "-", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(t) for t in lengths])
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_title(f"{analysis['metric']} relative to {analysis['baseline']}")
    fig.colorbar(im, ax=ax, label="log2 ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
