"""The MQAR-with-a-curriculum sections of docs/experiments.md (formerly section 1b): one section per results file
``recall_curriculum*.json`` with its table (mean ± half-range over seeds, or one row per run), the commands that
reproduce it, bar and curve figures, the loss at the end of each curriculum stage and the breakdowns."""

from __future__ import annotations

import contextlib
import itertools

import _report_common as common
import matplotlib.pyplot as plt
import numpy as np
from _report_common import RUN, answers_flag, breakdowns, env, model_color, table
from matplotlib.lines import Line2D
from recall_curriculum import curriculum_stages


def _mean_spread(xs: list[float]) -> str:
    """'mean +- half-range (n)': with 3 seeds the half-range says more than a standard deviation would."""
    if not xs:
        return "-"
    bad = sum(1 for x in xs if not np.isfinite(x))
    if bad:  # a diverged run (NaN loss): say so rather than average it
        ok = [x for x in xs if np.isfinite(x)]
        return (_mean_spread(ok) if ok else "-") + f" and {bad} NaN (diverged)"
    m = sum(xs) / len(xs)
    return f"{m:.3f} ± {(max(xs) - min(xs)) / 2:.3f} (n={len(xs)})"


def _curriculum_flags(b: dict) -> str:
    return (f"--stage-lengths {' '.join(map(str, b['stage_lengths']))} "
            f"--stage-steps {' '.join(map(str, b['stage_steps']))} "
            f"--steps {b['steps']} --batch-size {b['batch_size']} --vocab-size {b['vocab_size']} "
            f"--warmup {b['warmup']} --layers {b['layers']} --head-dim {b['head_dim']} --chunk-size {b['chunk_size']}"
            f"{'' if b.get('zero_filler') else ' --no-zero-filler'}"
            + (f" --eval-every {b['eval_every']}" if b.get("eval_every") else "")
            + (f" --gau-qk-scale-init {b['gau_qk_scale_init']:g}" if b.get("gau_qk_scale_init") is not None else "")
            + ("" if b.get("flush_denormals") else " --no-flush-denormals")
            + (f" --blocks-chunk-size {b['blocks_chunk_size']} --top-k {b['top_k']} --block-summary "
               f"{b['block_summary']} --selection-grad {b['selection_grad']}"
               + (f" --train-top-k {b['train_top_k']}" if b.get("train_top_k") is not None else "")
               + (f" --train-top-k-until {b['train_top_k_until']}" if b.get("train_top_k_until") is not None else "")
               + (f" --indexer-dim {b['indexer_dim']}" if b.get("indexer_dim") is not None else "")
               if "BSBRBlocks" in b.get("models", ()) and "blocks_chunk_size" in b else ""))


def _blocks_text(b: dict) -> str:
    """The BSBRBlocks settings of a budget that trained it, for the section's description ("" otherwise)."""
    if "BSBRBlocks" not in b.get("models", ()) or "blocks_chunk_size" not in b:
        return ""
    summary = ("no summary (a chunk scores the log-sum-exp of its tokens' scores)" if b["block_summary"] == "tokens"
               else f"{b['block_summary']} summary")
    return (f", BSBRBlocks chunk {b['blocks_chunk_size']}, top_k {b['top_k']}, {summary}, "
            f"selection gradient {b['selection_grad']}, no sink (each query sees its own chunk and the top_k chunks "
            "it selects)"
            + (f"; in training every query selects up to {b['train_top_k']} chunks (every earlier chunk where that "
               "covers them)"
               + (f" for the steps before {b['train_top_k_until']}, top_k from it on"
                  if b.get("train_top_k_until") is not None else "")
               + ", validation and test select top_k" if b.get("train_top_k") is not None else "")
            + (f"; an indexer of {b['indexer_dim']} dimensions per head (its own weights, trained by the distillation "
               "loss only) scores the chunks" if b.get("indexer_dim") is not None else ""))


def _budget_differences(runs: list[dict], b: dict) -> list[str]:
    """Where a run's recorded settings differ from the file's budget (the last writer's arguments, which the printed
    command is built from): "key: field run value != budget value".  A field missing on either side (files
    written before it was recorded) is not compared."""
    missing = object()

    def get(d: dict, *path):
        for k in path:
            d = d.get(k, missing) if isinstance(d, dict) else missing
        return d

    out = []
    for r in runs:
        seq_len, hidden = get(r, "task", "seq_len"), get(r, "model_options", "hidden_dim")
        expect = {"steps": (get(r, "train", "steps"), b.get("steps", missing)),
                  "batch size": (get(r, "train", "batch_size"), b.get("batch_size", missing)),
                  "warmup": (get(r, "train", "warmup_steps"), b.get("warmup", missing)),
                  "eval every": (get(r, "train", "eval_every"), b.get("eval_every", missing)),
                  "vocabulary": (get(r, "task", "vocab_size"), b.get("vocab_size", missing)),
                  "layers": (get(r, "model_options", "num_layers"), b.get("layers", missing)),
                  "heads": (get(r, "model_options", "num_heads"),
                            max(1, hidden // b["head_dim"]) if "head_dim" in b and hidden is not missing else missing),
                  "random filler": (get(r, "task", "random_filler"),
                                    not b["zero_filler"] if "zero_filler" in b else missing)}
        if r.get("model") == "BSBRBlocks":
            for field, key in (("chunk_size", "blocks_chunk_size"), ("top_k", "top_k"),
                               ("block_summary", "block_summary"), ("selection_grad", "selection_grad")):
                expect[f"BSBRBlocks {field}"] = (get(r, "model_options", field), b.get(key, missing))
        if "curriculum" in r["task"] and "stage_lengths" in b and "stage_steps" in b and seq_len is not missing:
            with contextlib.suppress(ValueError):  # a budget whose stage steps do not fit its lengths: not compared
                expect["curriculum"] = tuple([(st["seq_len"], st["steps"]) for st in stages] for stages in (
                    r["task"]["curriculum"], curriculum_stages(b["stage_lengths"], b["stage_steps"], seq_len)))
        if r["model"] == "GAU":
            expect["GAU qk_scale_init"] = (get(r, "model_options", "qk_scale_init"),
                                           b.get("gau_qk_scale_init", missing))
        key = f"{r['model']} T={seq_len} h={hidden} lr={get(r, 'train', 'lr')} seed {get(r, 'train', 'seed')}"
        out += [f"{key}: {field} {got} != {want}" for field, (got, want) in expect.items()
                if got is not missing and want is not missing and got != want]
    return out


def _curriculum_commands(runs: list[dict], b: dict, tag: str) -> list[str]:
    """The commands behind a curriculum file's runs. A full grid of (hidden, lr) settings gets one command; otherwise
    one command per setting, since one command listing every setting would train combinations nobody ran. Each names
    only its runs' models, lengths and seeds, and says how many of the cells it would train are in the file."""
    def setting(r):
        return r["model_options"]["hidden_dim"], r["train"]["lr"]

    pairs = sorted({setting(r) for r in runs})
    hiddens, lrs = sorted({h for h, _ in pairs}), sorted({lr for _, lr in pairs})
    cases = {(r["model"], r["task"]["seq_len"], r["train"]["seed"]) for r in runs}
    if len(pairs) == len(hiddens) * len(lrs) and len(cases) * len(pairs) == len(runs):
        groups = [(hiddens, lrs, runs)]  # every case ran at every setting: one command
    else:
        groups = [([h], [lr], [r for r in runs if setting(r) == (h, lr)]) for h, lr in pairs]
    out = []
    for hs, ls, sel in groups:
        models = sorted({r["model"] for r in sel}, key=lambda m: (m != "BSBR", m))
        lengths = sorted({r["task"]["seq_len"] for r in sel})
        seeds = sorted({r["train"]["seed"] for r in sel})
        cells = len(models) * len(lengths) * len(seeds) * len(hs) * len(ls)
        cmd = (f"`{RUN}recall_curriculum.py --models {' '.join(models)} --lengths {' '.join(map(str, lengths))} "
               f"--hiddens {' '.join(map(str, hs))} --lrs {' '.join(f'{x:g}' for x in ls)} "
               f"--seeds {' '.join(map(str, seeds))} {_curriculum_flags(b)}{answers_flag(sel)}"
               f"{f' --tag {tag}' if tag else ''}`")
        what = (f" ({len(sel)} of the {cells} cells it trains are in the file; with the file in place it trains only "
                "the missing ones)" if len(sel) < cells else "")
        out.append(("Command: " if len(groups) == 1 else f"- hidden {hs[0]}, lr {ls[0]:g}: ") + cmd + what)
    return out if len(groups) == 1 else ["Commands, one per setting:", ""] + out


def _stage_losses(runs: list[dict], label) -> list[str]:
    """Per run, its training loss at the end of each curriculum stage (mean of the curve's points in the stage's last
    100 steps) beside a guess among the row's values (ln pairs), and the first logged step of the first stage
    whose loss was below 0.5 nats: where a run stopped learning, not only whether it answered at the final T.
    One table per final T; runs of another curriculum than the first run's are left out (not comparable column by
    column)."""
    staged = [r for r in runs if r["task"].get("curriculum") and r.get("curve")]
    if not staged:
        return []
    stage_shape = [(st["seq_len"], st["num_kv_pairs"]) for st in staged[0]["task"]["curriculum"]]
    by_final: dict[tuple[int, int], list[list]] = {}
    for r in staged:
        if [(st["seq_len"], st["num_kv_pairs"]) for st in r["task"]["curriculum"]] != stage_shape:
            continue
        stages = [*r["task"]["curriculum"], {"steps": r["steps"] - sum(st["steps"] for st in r["task"]["curriculum"])}]
        ends = list(itertools.accumulate(st["steps"] for st in stages))
        losses = []
        for end in ends:
            tail = [p["loss"] for p in r["curve"] if end - 100 < p["step"] <= end]
            losses.append(f"{sum(tail) / len(tail):.2f}" if tail else "-")
        first = next((p["step"] for p in r["curve"] if p["step"] <= ends[0] and p["loss"] < 0.5), None)
        by_final.setdefault((r["task"]["seq_len"], r["task"]["num_kv_pairs"]), []).append(
            [label(r), r["train"]["seed"], *losses, first if first is not None else "never",
             f"{r['test']['accuracy']:.3f}"])
    out = ["Training loss at the end of each curriculum stage (mean of the last 100 steps; a guess among the row's "
           "values scores ln pairs) and the first logged step of the first stage with loss below 0.5:", ""]
    for final, rows in sorted(by_final.items()):
        heads = [f"loss at end of T = {t} (guess {np.log(n):.2f})" for t, n in [*stage_shape, final]]
        out += [table(["run", "seed", *heads, f"first logged step < 0.5 at T = {stage_shape[0][0]}", "test accuracy"],
                      rows), ""]
    return out


def _curves(runs: list[dict], name: str, label, by_model: bool = False) -> list[str]:
    """Figure of valid accuracy at the final T against step for the runs with periodic evaluations (--eval-every),
    one panel per final T and one line per run, labelled ``label(run)``; with ``by_model`` the colour is the model,
    the marker its (hidden, lr) setting and the line style the seed, and one legend beside the panels names each
    ``label(run)`` once and each seed once.  Returns the report lines that show it (none without such runs)."""
    traced = [r for r in runs if r["evals"]]
    if not traced:
        return []
    lengths = sorted({r["task"]["seq_len"] for r in traced})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.4 * len(lengths), 3.6), squeeze=False)

    def setting(r):
        return r["model_options"]["hidden_dim"], r["train"]["lr"]

    settings = {}  # per model, its (hidden, lr) settings in order: the marker tells them apart
    handles, seeds = {}, {}  # by_model: one legend entry per label and per seed
    for r in traced:
        settings.setdefault(r["model"], set()).add(setting(r))
    for ax, t in zip(axes[0], lengths, strict=True):
        shown = [r for r in traced if r["task"]["seq_len"] == t]
        for r in shown:
            pts = r["evals"] + [r["valid"]] * (r["valid"].get("step") not in {e["step"] for e in r["evals"]})
            style = {"marker": "."}
            if by_model:
                which = sorted(settings[r["model"]]).index(setting(r))
                style = {"color": model_color(r["model"]), "ls": ["-", "--", ":", "-."][r["train"]["seed"] % 4],
                         "marker": [".", "x", "^", "s"][which % 4]}
            ax.plot([e["step"] for e in pts], [e["accuracy"] for e in pts], lw=1, label=label(r), **style)
            if by_model:
                handles.setdefault(label(r), Line2D([], [], lw=1, **{**style, "ls": "-"}))
                seeds.setdefault(r["train"]["seed"], Line2D([], [], color="k", lw=1, ls=style["ls"]))
        for end in itertools.accumulate(st["steps"] for st in shown[0]["task"].get("curriculum", [])):
            ax.axvline(end, color="0.7", lw=0.8, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training step (dotted: end of a curriculum stage)", fontsize=8)
        ax.set_ylabel(f"valid accuracy at T = {t}", fontsize=8)
        if not by_model:
            ax.legend(fontsize=6, ncol=2)
    if by_model:
        axes[0][-1].legend([*handles.values(), *(seeds[s] for s in sorted(seeds))],
                           [*handles, *(f"seed {s}" for s in sorted(seeds))], fontsize=7, loc="center left",
                           bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(common.FIGS / f"{name}_curves.png", dpi=120)
    plt.close(fig)
    return [f"![MQAR valid accuracy during training](figures/{name}_curves.png)", ""]


def recall_curriculum(lines: list[str], name: str) -> None:
    """Issue 14's MQAR with a curriculum: one row per run for the sweep, mean ± spread over seeds otherwise."""
    data = common.load(name)
    if not data:
        return
    b, runs = data["budget"], list(data["runs"].values())
    tag = name[len("recall_curriculum_"):] if name != "recall_curriculum" else ""
    lengths = sorted({r["task"]["seq_len"] for r in runs})
    hiddens = sorted({r["model_options"]["hidden_dim"] for r in runs})
    lrs = sorted({r["train"]["lr"] for r in runs})
    seeds = sorted({r["train"]["seed"] for r in runs})
    chunks = sorted({r["model_options"]["chunk_size"] for r in runs if r["model"] == "BSBR"}) or [b["chunk_size"]]
    b = {**b, "chunk_size": chunks[0]}  # the chunk the BSBR runs used (the budget keeps the last writer's)
    differ = _budget_differences(runs, b) + ([f"BSBR chunk sizes {chunks}"] if len(chunks) > 1 else [])
    if differ:  # one printed command would not reproduce every run
        raise SystemExit(f"results/{name}.json holds runs trained with other settings than its budget, so no one "
                         f"command reproduces it ({'; '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); move "
                         "them to a results file of their own (--tag)")
    minutes = sum(r["seconds"] for r in runs) / 60
    filler = "token 0 between the queries" if b.get("zero_filler") else "random tokens between the queries"
    used = any(r["task"].get("curriculum") for r in runs)
    stages = (f"Curriculum: {' / '.join(map(str, b['stage_steps']))} steps at T = {b['stage_lengths']} (those below "
              f"the final T; pairs = T/16 throughout), then the final T" if used else
              "No curriculum stage (every stage length is at least the final T): the final T throughout")
    answers = ("each answer also written into the input after its query (the task before 2026-12-04)"
               if answers_flag(runs) else "answers as labels only")
    lines += [f"## MQAR with a curriculum{f' ({tag})' if tag else ''}", "",
              f"{stages}; {b['steps']} steps in all of batch "
              f"{b['batch_size']}, "
              f"warmup {b['warmup']}, cosine decay, AdamW (weight decay 0.1), vocabulary {b['vocab_size']}, {filler}, "
              f"{answers}, "
              f"{b['layers']} layers, heads = hidden / {b['head_dim']}, BSBR chunk {b['chunk_size']}{_blocks_text(b)}, "
              f"GAU qk_scale_init {b.get('gau_qk_scale_init')}. Test-split accuracy on the scored values "
              f"({b['test_batches']} batches of {b['batch_size']}, always at the final T). {len(runs)} runs, "
              f"{minutes:.0f} CPU minutes of training (one thread each). {env(data)}", "",
              ] + _curriculum_commands(runs, b, tag) + [""]
    if len(seeds) == 1:
        rows = [[r["model"], r["task"]["seq_len"], r["task"]["num_kv_pairs"], r["model_options"]["hidden_dim"],
                 f"{r['train']['lr']:g}", r["train"]["seed"], f"{r['test']['accuracy']:.3f}",
                 f"{r['test']['loss']:.3f}",
                 f"{r['seconds'] / 60:.1f}"] for r in sorted(runs, key=lambda r: (r["model"], r["task"]["seq_len"],
                                                                               r["model_options"]["hidden_dim"],
                                                                               r["train"]["lr"]))]
        lines += [table(["model", "T", "pairs", "hidden", "lr", "seed", "test accuracy", "test loss", "CPU min"],
                         rows), ""]
        lines += breakdowns(runs, lambda r: f"{r['model']} h={r['model_options']['hidden_dim']} "
                                             f"lr={r['train']['lr']:g}")
        lines += _curves(runs, name, lambda r: f"{r['model']} h={r['model_options']['hidden_dim']} "
                                               f"lr={r['train']['lr']:g}")
        return
    # one group per configuration (model, T, hidden, lr): only seeds are pooled, never two settings
    def config(r):
        return r["model"], r["task"]["seq_len"], r["model_options"]["hidden_dim"], r["train"]["lr"]

    configs = sorted({config(r) for r in runs}, key=lambda c: (c[1], c[0] != "BSBR", c[0], c[2], c[3]))
    several = len(hiddens) > 1 or len(lrs) > 1

    def label(c):
        return c[0] + (f" h={c[2]} lr={c[3]:g}" if several else "")

    def members(c):
        return sorted((r for r in runs if config(r) == c), key=lambda r: r["train"]["seed"])

    rows, means = [], {}
    for c in configs:
        sel = members(c)
        acc = [r["test"]["accuracy"] for r in sel]
        means[c] = (sum(acc) / len(acc), (max(acc) - min(acc)) / 2, acc)
        rows.append([label(c), c[1], sel[0]["task"]["num_kv_pairs"], " ".join(str(r["train"]["seed"]) for r in sel),
                     _mean_spread(acc), " / ".join(f"{x:.3f}" for x in acc),
                     _mean_spread([r["test"]["loss"] for r in sel]), f"{sum(r['seconds'] for r in sel) / 60:.1f}"])
    lines += ["Mean ± half the range over the seeds run (with three seeds the range is the honest spread; a row "
              "with one seed is one run, not a mean).", "",
              table(["model", "T", "pairs", "seeds", "test accuracy", "per seed", "test loss",
                      "CPU min (all seeds)"], rows), ""]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4), squeeze=False)
    for ax, t in zip(axes[0], lengths, strict=True):
        shown = [c for c in configs if c[1] == t]
        ax.bar([label(c) for c in shown], [means[c][0] for c in shown], yerr=[means[c][1] for c in shown],
               capsize=3, color=[model_color(c[0]) for c in shown])
        for i, c in enumerate(shown):
            ax.plot([i] * len(means[c][2]), means[c][2], "k.", ms=4)
        pairs = members(shown[0])[0]["task"]["num_kv_pairs"]
        ax.axhline(1 / pairs, color="gray", ls="--", lw=1, label=f"1 / {pairs}: a guess among the row's values")
        ax.legend(fontsize=7, loc="upper left", frameon=False)
        ax.set_ylim(0, 1.15)  # room for the legend above the bars
        ax.set_title(f"T = {t}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylabel("MQAR test accuracy\n(bar: mean; dots: seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(common.FIGS / f"{name}.png", dpi=120)
    plt.close(fig)
    lines += [f"![MQAR with a curriculum](figures/{name}.png)", ""]
    lines += _curves(runs, name, lambda r: label(config(r)), by_model=True)
    def pooled(r):
        n = len(means[config(r)][2])
        return f"{label(config(r))} ({n} seed{'s' * (n > 1)} pooled)"

    lines += _stage_losses(sorted(runs, key=lambda r: (configs.index(config(r)), r["train"]["seed"])),
                           lambda r: label(config(r)))
    lines += breakdowns(sorted(runs, key=lambda r: configs.index(config(r))), pooled)
