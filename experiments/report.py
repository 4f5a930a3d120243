"""Build docs/experiments.md and its figures from experiments/results/*.json (reads only the JSON).

    PYTHONPATH=src python experiments/report.py

docs/experiments.md opens with the results of record (the index, built from _report_index.py's RECORD) and
docs/experiments-archive.md holds the superseded budgets and probes (its ARCHIVE, one line each on why).  The
sections of most kinds are here; MQAR with a curriculum is in _report_mqar.py, and what the sections share
(paths, tables, colours, the MQAR breakdowns) in _report_common.py.
"""

from __future__ import annotations

import re

import _report_common as common
import _report_index as index
import matplotlib.pyplot as plt
import numpy as np
from _report_common import RUN, MiB, answers_flag, breakdowns, env, model_color, table
from _report_mqar import recall_curriculum


def recall(lines: list[str], name: str = "recall_vs_length") -> None:
    data = common.load(name)
    if not data:
        return
    b = data["budget"]
    best: dict[tuple[str, int], dict] = {}
    for run in data["runs"].values():
        key = (run["model"], run["task"]["seq_len"])
        if key not in best or run["valid"]["accuracy"] > best[key]["valid"]["accuracy"]:
            best[key] = run
    models = sorted({m for m, _ in best}, key=lambda m: (m != "BSBR", m))
    lengths = sorted({t for _, t in best})
    tag = name[len("recall_vs_length_"):] if name != "recall_vs_length" else ""
    gau_init = b.get("gau_qk_scale_init")
    gau = (f" GAU's Q/K scales initialised with std {gau_init:g} (qk_scale_init; the layer's default is 0.02)."
           if gau_init is not None else "")
    gau_flag = f" --gau-qk-scale-init {gau_init:g}" if gau_init is not None else ""
    lines += [f"## MQAR vs sequence length{f' ({tag})' if tag else ''}", "",
              f"Budget: {b['steps']} steps of batch {b['batch_size']}, vocabulary {b['vocab_size']}, "
              f"num_kv_pairs = T/16, hidden 128, 2 layers, 4 heads, BSBR chunk {b['chunk_size']}, learning rates "
              f"{b['lrs']} (best valid accuracy kept), seed {b['seed']}. Test-split accuracy on the scored values "
              f"({b['test_batches']} batches of {b['batch_size']}).{gau}"
              + (" Each answer also written into the input after its query (MQAR before 2026-12-04)."
                 if answers_flag(data["runs"].values()) else "") + f" {env(data)}", "",
              f"Command: `{RUN}recall_vs_length.py "
              f"--models {' '.join(models)} --lengths {' '.join(map(str, b['lengths']))} --lrs "
              f"{' '.join(f'{x:g}' for x in b['lrs'])} --steps {b['steps']} --batch-size {b['batch_size']} "
              f"--vocab-size {b['vocab_size']} --chunk-size {b['chunk_size']}"
              f"{gau_flag}{answers_flag(data['runs'].values())}{f' --tag {tag}' if tag else ''}`",
              ""]
    rows = []
    for m in models:
        for t in lengths:
            r = best.get((m, t))
            if r:
                rows.append([m, t, r["task"]["num_kv_pairs"], f"{r['train']['lr']:g}", f"{r['test']['accuracy']:.3f}",
                             f"{r['test']['loss']:.3f}", f"{r['seconds']:.0f}", f"{r['peak_memory_bytes'] / MiB:.0f}"])
    lines += [table(["model", "T", "pairs", "lr", "test accuracy", "test loss", "train s", "peak RSS MiB"], rows), ""]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if len(lengths) == 1:  # one length: a bar per model
        t = lengths[0]
        shown = [m for m in models if (m, t) in best]
        ax.bar(shown, [best[(m, t)]["test"]["accuracy"] for m in shown], color=[model_color(m) for m in shown])
        ax.axhline(1 / best[(shown[0], t)]["task"]["num_kv_pairs"], color="gray", ls="--", lw=1,
                   label="1 / pairs (a value of the row, at random)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_title(f"T = {t}", fontsize=9)
    else:
        for m in models:
            pts = [(t, best[(m, t)]["test"]["accuracy"]) for t in lengths if (m, t) in best]
            ax.plot(*zip(*pts, strict=True), marker="o", color=model_color(m), label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
    ax.set_ylabel("MQAR test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.FIGS / f"{name}.png", dpi=120)
    plt.close(fig)
    lines += [f"![MQAR accuracy vs length](figures/{name}.png)", ""]
    lines += breakdowns(list(best.values()), lambda r: f"{r['model']} (lr {r['train']['lr']:g})")


def _smooth(values: list[float], window: int = 10) -> np.ndarray:
    """Trailing moving mean (shorter at the start): raw per-step losses are too noisy to compare by eye."""
    x = np.cumsum(np.asarray(values, dtype=float))
    out = x.copy()
    out[window:] = x[window:] - x[:-window]
    return out / np.minimum(np.arange(1, len(x) + 1), window)


def convergence(lines: list[str], name: str = "convergence_prose") -> None:
    data = common.load(name)
    if not data:
        return
    b = data["budget"]
    runs = list(data["runs"].values())
    corpus = b["corpus"]
    tag = f" --tag {b['tag']}" if b.get("tag") else ""
    lines += [f"## Convergence and perplexity (byte-level LM, {corpus} corpus, T = {b['lengths']})", "",
              f"Budget: {b['steps']} steps of batch {b['batch_size']} at T = {b['lengths']}, lr {b['lr']:g} "
              f"(warmup {max(1, b['steps'] // 10)}, cosine), hidden 128, 2 layers, 4 heads, BSBR chunk "
              f"{b['chunk_size']}, seed {b['seed']}; valid loss every {b['eval_every']} steps on 4 batches; the final "
              f"numbers cover the whole valid and test splits of `pydoc_data.topics`. Target valid loss for "
              f"'steps to target': {b['target_loss']} nats/byte. {env(data)}", "",
              f"Command: `{RUN}convergence.py "
              f"--models {' '.join(r['model'] for r in runs)} --lengths {' '.join(map(str, b['lengths']))} "
              f"--steps {b['steps']} --batch-size {b['batch_size']} --eval-every {b['eval_every']} "
              f"--target-loss {b['target_loss']}{tag}`", ""]
    rows = [[r["model"], r["task"]["seq_len"], r["parameters"], f"{r['valid']['bits_per_token']:.3f}",
             f"{r['test']['bits_per_token']:.3f}", f"{r['test']['perplexity']:.2f}",
             r["steps_to_target"] or "not reached", f"{r['seconds']:.0f}", f"{r['tokens_per_second']:.0f}",
             f"{r['peak_memory_bytes'] / MiB:.0f}"] for r in runs]
    lines += [table(["model", "T", "params", "valid bits/byte", "test bits/byte", "test ppl (per byte)",
                      "steps to target", "train s", "train tok/s", "peak RSS MiB"], rows), ""]
    edges = runs[0]["test"].get("position_edges")
    if edges:
        rows = [[r["model"]] + [f"{x / 0.6931471805599453:.3f}" for x in r["test"]["loss_by_position"]] for r in runs]
        lines += ["Test bits per byte by position in the window (does the model use long context?):", "",
                  table(["model"] + [f"{a}-{b_}" for a, b_ in zip(edges[:-1], edges[1:], strict=True)], rows), ""]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for r in runs:
        c, ev, color = r["curve"], r["evals"], model_color(r["model"])
        steps, secs, loss = ([p[k] for p in c] for k in ("step", "seconds", "loss"))
        axes[0].plot(steps, _smooth(loss), color=color, label=r["model"])
        axes[1].plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", ms=3, color=color, label=r["model"])
        axes[2].plot(secs, _smooth(loss), color=color, label=r["model"])
    for ax, x, title in zip(axes, ("step", "step", "wall-clock seconds"),
                            ("train loss (moving mean of 10 steps)", "valid loss (4 batches)", "train loss vs time"),
                            strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel("loss (nats/byte)")
        ax.set_title(title, fontsize=9)
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(common.FIGS / f"{name}.png", dpi=120)
    plt.close(fig)
    lines += [f"![loss vs step and time](figures/{name}.png)", ""]


def ablations(lines: list[str], task: str = "mqar") -> None:
    data = common.load(f"ablations_{task}")
    if not data:
        return
    b = data["budget"]
    lines += [f"## BSBR ablations: chunk size and compression factor ({task}, T = {b['seq_len']})", "",
              f"Budget per variant: {b['steps']} steps of batch {b['batch_size']}, lr {b['lr']:g}, "
              f"hidden 128, 2 layers, seed {b['seed']}. Inference columns: one [1, {b['speed_len']}] forward "
              f"pass of the trained model (median of 3) and the streaming cache's bytes after "
              f"{b['speed_len']} tokens. {env(data)}", "",
              f"Command: `{RUN}ablations.py "
              f"--task {task} --seq-len {b['seq_len']} --chunks {' '.join(map(str, b['chunks']))} --compress "
              f"{' '.join(map(str, b['compress']))} --steps {b['steps']} --batch-size {b['batch_size']} "
              f"--lr {b['lr']:g}" + (f" --state-norms {' '.join(b['state_norms'])}" if b.get("state_norms") else "")
              + (answers_flag(data["runs"].values()) if task == "mqar" else "") + "`",
              "", "Test loss in nats per scored token (per byte for the LM).", ""]
    rows = []
    for r in data["runs"].values():
        o = r["model_options"]
        rows.append([o["chunk_size"], o.get("compression_factor") or "none", o.get("state_norm", "mean"),
                     f"{r['test']['accuracy']:.3f}",
                     f"{r['test']['loss']:.3f}", f"{r['tokens_per_second']:.0f}",
                     f"{r['inference']['tokens_per_second']:.0f}", f"{r['inference']['cache_bytes'] / MiB:.2f}"])
    lines += [table(["chunk", "compression", "state_norm", "test accuracy", "test loss", "train tok/s",
                      "inference tok/s", f"cache MiB @ {b['speed_len']}"], rows), ""]


def long_document(lines: list[str]) -> None:
    data = common.load("long_document")
    if not data:
        return
    b = data["budget"]
    lines += ["## Long document: streaming a trained BSBR model through its cache", "",
              f"Newest run: {env(data)}", ""]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for r in data["runs"].values():
        s = r["stream"]
        W = r["model_options"].get("retrieval_window")
        label = "no retrieval window (all earlier chunks)" if W is None else f"retrieval window W = {W} chunks"
        lines += [f"### {label[0].upper()}{label[1:]}", "",
                  f"A BSBR LM (hidden 128, 2 layers, chunk {b['chunk_size']}"
                  f"{'' if W is None else f', retrieval_window {W}'}) trained {b['steps']} steps of batch "
                  f"{b['batch_size']} at T = {b['train_len']} on the standard library's source (train split), then "
                  f"fed the first {s['tokens']:,} bytes of the test split in pieces of {s['piece']} through its "
                  f"streaming cache (inference mode, fp32); run finished {r['finished']}.", "",
                  f"Command: `{RUN}long_document.py "
                  f"--tokens {b['tokens']} --steps {b['steps']} --train-len {b['train_len']}"
                  f"{'' if W is None else f' --retrieval-window {W}'}`", "",
                  f"Stream: {s['tokens_per_second']:.0f} tokens/s, cache {s['final_cache_bytes'] / MiB:.2f} MiB after "
                  f"{s['tokens']:,} tokens (at 8,192 tokens: BSBR {s['bsbr_cache_bytes_at_8192'] / MiB:.2f} MiB, "
                  f"the KV cache of a standard-attention model of the same size "
                  f"{s['standard_kv_cache_bytes_at_8192'] / MiB:.2f} MiB, both measured). Bits per byte over the "
                  f"positions scored both ways: streamed through the cache "
                  f"{s['bits_per_byte']:.3f}, the same bytes in independent windows of "
                  f"{s['window']} {s['windowed_bits_per_byte']:.3f}.", ""]
        rows = [[f"{x['from']:,}-{x['to']:,}", f"{x['bits_per_byte']:.3f}", f"{x['windowed_bits_per_byte']:.3f}",
                 f"{x['bits_per_byte'] - x['windowed_bits_per_byte']:+.3f}"] for x in s["by_position"]]
        lines += [table(["positions", "streamed bits/byte", f"windows of {s['window']}", "difference"], rows), ""]
        ax.plot([c["tokens"] for c in s["cache_bytes"]], [c["bytes"] / MiB for c in s["cache_bytes"]], label=label)
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("cache MiB (live bytes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.FIGS / "long_document_cache.png", dpi=120)
    plt.close(fig)
    lines += ["![cache size while streaming](figures/long_document_cache.png)", ""]


def passkey_depth(lines: list[str], name: str) -> None:
    """Issue 14's passkey heat maps: example accuracy per (depth, length), one panel per model."""
    data = common.load(name)
    if not data:
        return
    b, runs = data["budget"], data["runs"]
    tag = name[len("passkey_depth_"):] if name != "passkey_depth" else ""
    models = sorted(runs, key=lambda m: (m != "BSBR", m))
    lengths = sorted({c["length"] for r in runs.values() for c in r["depth_grid"]})
    depths = sorted({c["depth"] for r in runs.values() for c in r["depth_grid"]})
    train_min = sum(r["seconds"] for r in runs.values()) / 60
    test_min = sum(r["test_grid_seconds"] for r in runs.values()) / 60
    stages = " ".join(map(str, b["stage_lengths"]))
    lines += [f"## Passkey retrieval by depth and length{f' ({tag})' if tag else ''}", "",
              f"Each model (hidden {b['hidden']}, {b['layers']} layers, {b['heads']} heads, BSBR chunk "
              f"{b['chunk_size']}, GAU qk_scale_init {b.get('gau_qk_scale_init')}) trained {b['steps']} steps of "
              f"batch {b['batch_size']} at lr {b['lr']:g} on byte-level passkey rows with the needle at a random "
              f"depth ({'loss on every byte' if b.get('train_all_bytes') else 'loss on the 5 digits only'}): "
              f"{b['stage_steps']} steps at each of T = {b['stage_lengths']} first, then T = {b['train_len']}. "
              f"Then tested unchanged with the needle at each depth in rows of each length: share of test rows with "
              f"all 5 digits right ({b['test_rows']} rows a cell, {b['long_test_rows']} at 16,384 and above; "
              f"chance is 1e-5). Standard and Hopfield are quadratic and skip {b['long_lengths']}. "
              f"Training {train_min:.0f} CPU minutes, testing {test_min:.0f} (one thread). {env(data)}", "",
              f"Command: `{RUN}passkey_depth.py --models {' '.join(models)} --train-len {b['train_len']} "
              f"--stage-lengths {stages} --stage-steps {b['stage_steps']} --steps {b['steps']} --batch-size "
              f"{b['batch_size']} --lr {b['lr']:g} --hidden {b['hidden']} --layers {b['layers']} --heads {b['heads']} "
              f"--chunk-size {b['chunk_size']} --depths {' '.join(f'{d:g}' for d in b['depths'])} --lengths "
              f"{' '.join(map(str, b['lengths']))} --long-lengths {' '.join(map(str, b['long_lengths']))} "
              f"--test-rows {b['test_rows']} --long-test-rows {b['long_test_rows']}"
              f"{' --train-all-bytes' if b.get('train_all_bytes') else ''}"
              f"{'' if b.get('flush_denormals') else ' --no-flush-denormals'}{f' --tag {tag}' if tag else ''}`",
              ""]
    header = ["model", "train-length test acc. (digits)"] + [f"T = {t:,}" for t in lengths]
    for metric, what in (("example_accuracy", "share of rows with all 5 digits right (chance 1e-5)"),
                         ("digit_accuracy", "digit accuracy (chance 0.1)")):
        rows = []
        for m in models:
            r = runs[m]
            cell = {(c["length"], c["depth"]): c for c in r["depth_grid"]}
            row = [m, f"{r['test']['example_accuracy']:.2f} ({r['test']['accuracy']:.2f})"]
            for t in lengths:
                got = [cell[(t, d)][metric] for d in depths if (t, d) in cell]
                row.append(f"{sum(got) / len(got):.2f}" if got else "not run")
            rows.append(row)
        lines += [f"Mean over the {len(depths)} depths of the {what}, per test length; the second column is the "
                  "random-depth test split at the training length (4 batches of the training batch size; "
                  "digit accuracy in brackets).", "", table(header, rows), ""]
    fig, axes = plt.subplots(2, len(models), figsize=(1.9 * len(models) + 1.5, 6.2), squeeze=False,
                             gridspec_kw={"hspace": 0.45, "wspace": 0.08})
    for row_axes, metric, label in zip(axes, ("example_accuracy", "digit_accuracy"),
                                       ("all digits right", "digit accuracy"), strict=True):
        for ax, m in zip(row_axes, models, strict=True):
            cell = {(c["length"], c["depth"]): c[metric] for c in runs[m]["depth_grid"]}
            grid = np.array([[cell.get((t, d), np.nan) for t in lengths] for d in depths])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [f"{t // 1024}k" for t in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if ax is row_axes[0] else [], fontsize=7)
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="w" if grid[i, j] < 0.5 else "k")
            ax.set_title(m, fontsize=9)
            ax.set_xlabel("test length", fontsize=7)
        row_axes[0].set_ylabel(f"needle depth\n({label})", fontsize=8)
        fig.colorbar(im, ax=row_axes.tolist(), shrink=0.8, label=label)
    fig.savefig(common.FIGS / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    lines += [f"![passkey accuracy by depth and length](figures/{name}.png)", ""]


def _ablations_file(lines: list[str], name: str) -> None:
    ablations(lines, name.removeprefix("ablations_"))


# One function per kind of results file: each appends the section of one file (its table, figure and command).
SECTIONS = {"recall": recall, "curriculum": recall_curriculum, "convergence": convergence,
            "ablations": _ablations_file, "long_document": lambda lines, name: long_document(lines),
            "passkey": passkey_depth}
_KIND_OF_PREFIX = {"recall_vs_length": "recall", "recall_curriculum": "curriculum", "convergence_": "convergence",
                   "ablations_": "ablations", "long_document": "long_document", "passkey_depth": "passkey"}
_COMMAND = re.compile(r"`(PYTHONPATH=src[^`]*)`")


def _kind(stem: str) -> str | None:
    """The section kind of a results file not in the index (None: a file with no section, such as gau_rows_*)."""
    return next((kind for prefix, kind in _KIND_OF_PREFIX.items() if stem.startswith(prefix)), None)


def _section(stem: str, kind: str | None) -> list[str]:
    """The section of results/<stem>.json, headed by an anchor named after the stem (the index links to it)."""
    body: list[str] = []
    if kind in SECTIONS:
        SECTIONS[kind](body, stem)
    if not body:
        return []
    return [f'<a id="{stem}"></a>', "", body[0], "", f"Results file: `experiments/results/{stem}.json`.", *body[1:]]


def _unpinned(everything: dict[str, dict]) -> list[str]:
    rows = []
    for stem, data in everything.items():
        commit, pinned = index.results_commit(data)
        if not pinned:
            where = ("of record" if any(stem in r.stems for r in index.RECORD) else
                     "archived" if stem in index.ARCHIVE else "not classified")
            rows.append([f"`{stem}.json`", where, commit])
    if not rows:
        return []
    return ["### Results files that cannot be pinned to a commit", "",
            "Their code is not pinned: a commit marked `+dirty` was taken with uncommitted changes, and a file with "
            "no environment records no commit at all. Until 2026-12-06 `+dirty` also followed from an uncommitted "
            "results file (every grid rewrites its own after each run), so for these files it may mean only that; "
            "which it was is not recorded. Rerunning a file's command at a clean commit pins it (runs now record "
            "their own commit, and `+dirty` only for changes to src/, the scripts or pyproject.toml, with the paths "
            "in `dirty_paths`).", "",
            table(["results file", "status", "commit recorded"], rows), ""]


def _index(record_sections: dict[str, list[str]], everything: dict[str, dict]) -> list[str]:
    rows, commands = [], []
    for rec in index.RECORD:
        for stem in rec.stems:
            data = everything.get(stem)
            if data is None:
                continue
            commit, pinned = index.results_commit(data)
            where = f"[docs/{rec.doc}]({rec.doc})" if rec.kind == "doc" else f"[below](#{stem})"
            result = (f"reported in [docs/{rec.doc}]({rec.doc})" if rec.kind == "doc"
                      else index.headline(rec.kind, data))
            rows.append([rec.claim if stem == rec.stems[0] else "″", result, where,
                         f"`experiments/{rec.script}`", f"`{stem}.json`", commit + ("" if pinned else " (not pinned)")])
            for cmd in _COMMAND.findall("\n".join(record_sections.get(stem, []))):
                commands.append(f"- `{stem}`: `{cmd}`")
    return ["## Results of record", "",
            "One row per results file that holds a current result: the question, the result (the file's numbers, "
            "rounded as its section rounds them), its section, the script and file, and the commit that produced "
            "it. Everything superseded (earlier budgets, probes, the MQAR task before 2026-12-04) is in "
            "[experiments-archive.md](experiments-archive.md), one line each on why.", "",
            table(["claim", "current result", "section", "script", "results file", "commit"], rows), "",
            "### Commands of record", "",
            "Each reproduces its results file; with the file in place a command trains only the cells that are "
            "missing:", "", *commands, "",
            f"The conversion commands are in [docs/convert.md](convert.md). {NOTES_GUIDE}", ""]


NOTES_GUIDE = ("The notes written by hand at the end of the page name sections by their former numbers: 1 = MQAR "
               "vs sequence length, 1b = MQAR with a curriculum, 2-3 = convergence and perplexity, 4 = BSBR "
               "ablations, 5 = long document, 6 = passkey by depth and length.")


def main() -> None:
    common.FIGS.mkdir(parents=True, exist_ok=True)
    everything = index.load_all(common.RESULTS)
    runs = [r for data in everything.values() if isinstance(data.get("runs"), dict) for r in data["runs"].values()]
    minutes = sum(r.get("seconds", 0.0) for r in runs) / 60
    of_record = [stem for rec in index.RECORD for stem in rec.stems]
    record_sections = {stem: _section(stem, rec.kind) for rec in index.RECORD for stem in rec.stems
                       if stem in everything and rec.kind != "doc"}
    unclassified = [s for s in everything if s not in of_record and s not in index.ARCHIVE]
    other = [f"- `{stem}.json` ({index.results_commit(everything[stem])[0]})" for stem in unclassified]
    if other:
        other += [""] + [line for stem in unclassified for line in _section(stem, _kind(stem))]
    lines = ["# Quality experiments", "",
             "Generated by `PYTHONPATH=src python experiments/report.py` from `experiments/results/*.json` (which "
             "results are of record, and why the others were superseded: `experiments/_report_index.py`); every "
             "number below was measured by the command given with it, on this repository's 2-core CPU machine "
             f"shared with other jobs (wall-clock timings, one torch thread a run). The {len(runs)} training runs "
             f"in experiments/results/ took {minutes:.0f} CPU minutes of training in all; most are a few thousand "
             "steps: read them as what that buys, not as converged results.", ""]
    lines += _index(record_sections, everything)
    lines += _unpinned(everything)
    for stem in of_record:
        lines += record_sections.get(stem, [])
    if other:
        lines += ["## Results not yet classified", "",
                  "Files in experiments/results/ that `experiments/_report_index.py` lists neither as of record nor "
                  "as archived.", "", *other]
    notes = common.ROOT / "experiments" / "NOTES.md"
    if notes.exists():
        lines += ["# Notes written by hand", "", "What the numbers above say, dated, from experiments/NOTES.md.", "",
                  notes.read_text()]
    (common.DOCS / "experiments.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {common.DOCS / 'experiments.md'}")
    archive(everything)


def archive(everything: dict[str, dict]) -> None:
    """docs/experiments-archive.md: the superseded budgets and probes, each with why, then their sections."""
    stems = [s for s in index.ARCHIVE if s in everything]
    rows = [[f"[`{s}.json`](#{s})" if _kind(s) else f"`{s}.json`", index.ARCHIVE[s],
             index.results_commit(everything[s])[0]] for s in stems]
    lines = ["# Quality experiments: archive", "",
             "Generated by `PYTHONPATH=src python experiments/report.py` with docs/experiments.md. The budgets and "
             "probes that a later result superseded, kept with their commands so that every number stays "
             "reproducible. The current results are in [experiments.md](experiments.md).", "",
             "**MQAR changed on 2026-12-04.** Until then this library's MQAR also wrote each answer into the input "
             "after its query, so a model could answer a query with \"a pair value not yet given as an answer\" "
             "without looking the key up (1/remaining per query, H_N / N over a row); see the notes at the end. "
             "The runs on that task carry `--answers-in-input` in their commands.", "",
             table(["results file", "why superseded", "commit"], rows), "", NOTES_GUIDE, ""]
    for s in stems:
        lines += _section(s, _kind(s))
    notes = common.ROOT / "experiments" / "NOTES-archive.md"
    if notes.exists():
        lines += ["# Notes written by hand", "",
                  "What the archived numbers say, dated, from experiments/NOTES-archive.md.", "", notes.read_text()]
    (common.DOCS / "experiments-archive.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {common.DOCS / 'experiments-archive.md'}")


if __name__ == "__main__":
    main()
