"""Markdown and PNG report of a conversion run (reads only the report dict / report.json)."""

from __future__ import annotations

from pathlib import Path

from .pipeline import summary_rows

VARIANT_NAMES = {"bsbr": "BSBR", "local": "local only", "sliding_window": "sliding window"}


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write ``report.md`` and its figures (similarity by layer, perplexity by position, by chunk size) into
    ``out_dir``; return the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(report, out)
    plan = report["plan"]
    if plan.get("retrieval") == "blocks":
        mode = (f"Block retrieval: chunk {plan['chunk_size']}, top-{plan['top_k']} chunks per query by their "
                f"{plan['block_summary']!r} summary, the first chunk always in view; no new weights.")
    else:
        mode = (f"State readout: chunk {plan['chunk_size']}, compression {plan['compression_factor']}, retrieval "
                f"window {plan['retrieval_window']}, gate init {plan['gate_init']}, meta key {plan['meta_key']!r}.")
    lines = [f"# Conversion of {report['name']} ({report['class']}) to BSBR", "",
             f"{mode} Held-out "
             f"text: {plan['eval_windows']} windows of {plan['seq_len']} tokens ({report['eval_tokens']:,} tokens; "
             f"sources {', '.join(sorted(set(report['eval_sources'])))}; valid + test splits, never used for healing).",
             "", "| stage | variant | ppl | original ppl | ratio | bits/byte | KL (nats) | top-1 | top-5 | "
             "cos (last layer) | max KL, first chunk |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(report):
        lines.append(f"| {r['stage']} | {VARIANT_NAMES.get(r['variant'], r['variant'])} | {_fmt(r['ppl'], '.2f')} | "
                     f"{_fmt(r['ppl_original'], '.2f')} | {_fmt(r['ppl_ratio'])} | {_fmt(r['bpb'])} | "
                     f"{_fmt(r['kl'], '.4f')} | {_fmt(r['top1'])} | {_fmt(r['top5'])} | "
                     f"{_fmt(r['cosine_last'], '.4f')} | {_fmt(r['first_chunk_max_kl'], '.2e')} |")
    lines += ["", "Local only and sliding window are the same model with retrieval switched off, and with softmax "
              "attention over the latest chunk-size tokens; their rows do not change with healing (healing trains "
              "only BSBR's retrieval weights) except through those weights' absence.", ""]
    if report["healing"]:
        lines += ["## Healing", "", "| stage | steps | lr | tokens | CPU s | loss first -> last |",
                  "|---|---|---|---|---|---|"]
        for stage, h in report["healing"].items():
            lines.append(f"| {stage} | {h['steps']} | {h['lr']} | {h['tokens']:,} | {h['cpu_seconds']:.0f} | "
                         f"{_fmt(h['first_loss'], '.4f')} -> {_fmt(h['last_loss'], '.4f')} |")
        lines.append("")
    sweep = report.get("chunk_sweep", {}).get("results", {})
    if sweep:
        lines += [f"## By chunk size (stage {report['chunk_sweep']['stage']})", "",
                  "| chunk | BSBR ratio | local ratio | sliding ratio | BSBR top-1 |", "|---|---|---|---|---|"]
        for chunk, res in sorted(sweep.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {chunk} | {_fmt(res['bsbr']['ppl_ratio'])} | {_fmt(res['local']['ppl_ratio'])} | "
                         f"{_fmt(res['sliding_window']['ppl_ratio'])} | {_fmt(res['bsbr']['top1'])} |")
        lines.append("")
    lengths = report.get("length_sweep", {}).get("results", {})
    if lengths:
        lines += [f"## By sequence length (stage {report['length_sweep']['stage']}, chunk "
                  f"{report['length_sweep']['chunk_size']})", "",
                  "| tokens per window | windows' tokens | original ppl | BSBR ratio | local ratio | sliding ratio | "
                  "BSBR top-1 | local top-1 |", "|---|---|---|---|---|---|---|---|"]
        for n, res in sorted(lengths.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {n} | {res['tokens']:,} | {_fmt(res['bsbr']['ppl_original'], '.2f')} | "
                         f"{_fmt(res['bsbr']['ppl_ratio'])} | {_fmt(res['local']['ppl_ratio'])} | "
                         f"{_fmt(res['sliding_window']['ppl_ratio'])} | {_fmt(res['bsbr']['top1'])} | "
                         f"{_fmt(res['local']['top1'])} |")
        lines.append("")
    for title, name in figures:
        lines += [f"![{title}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _figures(report: dict, out: Path) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the eval extra is not installed: the tables are still written
        return []
    made = []
    stages = report["stages"]

    def save(fig, ax, xlabel, ylabel, name, title):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append((title, name))

    def shown():  # BSBR at every stage; the references (no trained weights) once
        for stage, variants in stages.items():
            for variant in ("bsbr", "local", "sliding_window"):
                if variant == "bsbr" or stage == "before":
                    yield f"{VARIANT_NAMES[variant]} ({stage})", variants[variant]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, m in shown():
        ax.plot(range(len(m["cosine"])), m["cosine"], marker=".", label=label)
    save(fig, ax, "hidden-state layer (0 = embeddings)", "cosine similarity to the original",
         "similarity_by_layer.png", "cosine similarity by layer")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pos = stages["before"]["bsbr"]["by_position"]
    ax.plot([b["start"] for b in pos], [b["ppl_original"] for b in pos], "k-", marker="o", label="original")
    for label, m in shown():
        ax.plot([b["start"] for b in m["by_position"]], [b["ppl_converted"] for b in m["by_position"]], marker=".",
                label=label)
    ax.set_yscale("log")
    save(fig, ax, "position (start of chunk-size bucket)", "perplexity", "perplexity_by_position.png",
         "perplexity by position")

    def sweep_plot(results: dict, xlabel: str, file: str, title: str) -> None:
        """Perplexity ratio of each variant against a swept size (keys of ``results``), log2 x axis."""
        if not results:
            return
        xs = sorted(int(x) for x in results)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for variant in ("bsbr", "local", "sliding_window"):
            ax.plot(xs, [results[str(x)][variant]["ppl_ratio"] for x in xs], marker="o", label=VARIANT_NAMES[variant])
        ax.set_xscale("log", base=2)
        save(fig, ax, xlabel, "perplexity / original", file, title)

    sweep_plot(report.get("chunk_sweep", {}).get("results", {}), "chunk size (window for sliding window)",
               "perplexity_by_chunk.png", "perplexity ratio by chunk size")
    sweep_plot(report.get("length_sweep", {}).get("results", {}), "tokens per held-out window",
               "perplexity_by_length.png", "perplexity ratio by sequence length")
    return made
