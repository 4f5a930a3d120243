"""Which results are of record, and why the others were superseded: the index that opens docs/experiments.md and
the reasons that head docs/experiments-archive.md.

To add an experiment: write its section function in report.py (it appends Markdown lines for one results file and
gives its command as ``Command: `...` ``), add its kind to ``report.SECTIONS`` and a headline function to
``HEADLINES`` here, then one :class:`Record` to ``RECORD``.  When a new result replaces an old one, move the old
file's stem from ``RECORD`` to ``ARCHIVE`` with one line on why.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Record:
    claim: str                # the question the experiment answers, one line
    kind: str                 # the section kind (report.SECTIONS) that reports each file, or "doc" for another document
    stems: tuple[str, ...]    # results files, experiments/results/<stem>.json
    script: str               # experiments/<script> that writes them
    doc: str = ""             # kind "doc": the document that reports the files (relative to docs/)


RECORD = [
    Record("Associative recall (MQAR, Zoology's task): which models learn the lookup at T = 256 and 512, 3 seeds",
           "curriculum", ("recall_curriculum_bs128",), "recall_curriculum.py"),
    Record("MQAR with block retrieval of tokens (BSBRBlocks) at T = 512: does a hard top-k selection learn?",
           "curriculum", ("recall_curriculum_blocks_grad_none", "recall_curriculum_blocks_grad_straight_through",
                          "recall_curriculum_blocks_minmax", "recall_curriculum_blocks_grouped",
                          "recall_curriculum_blocks_grouped_k2", "recall_curriculum_blocks_dense_train",
                          "recall_curriculum_blocks_distill", "recall_curriculum_blocks_indexer",
                          "recall_curriculum_blocks_indexer_dense", "recall_curriculum_blocks_tokens_dense",
                          "recall_curriculum_blocks_tokens_sparse"),
           "recall_curriculum.py"),
    Record("Passkey retrieval by needle depth and length, trained at T = 1,024 and tested up to 64k",
           "passkey", ("passkey_depth", "passkey_depth_blocks"), "passkey_depth.py"),
    Record("Byte-level language modelling (bits/byte) and convergence, all models, 150 steps",
           "convergence", ("convergence_prose", "convergence_prose_T4096", "convergence_prose_blocks"),
           "convergence.py"),
    Record("BSBR chunk size, compression factor and state_norm on language modelling", "ablations",
           ("ablations_lm",), "ablations.py"),
    Record("Streaming a trained BSBR model through its cache over 100k bytes: cost of the bounded cache",
           "long_document", ("long_document",), "long_document.py"),
    Record("Converting pretrained Hugging Face models (GPT-2, SmolLM2-135M) to BSBR", "doc",
           ("convert_gpt2", "convert_smollm2", "convert_smollm2_distill"), "convert.py", doc="convert.md"),
    Record("Converting SmolLM2-135M with block retrieval, no training: perplexity ratio by keys kept, 2k-8k tokens",
           "doc", ("convert_blocks",), "convert_blocks.py", doc="convert.md"),
    Record("Passkey retrieval in converted SmolLM2-135M at 2k, 4k and 8k tokens", "doc", ("convert_passkey",),
           "convert_passkey.py", doc="convert.md"),
]

_OLD_TASK = "MQAR before 2026-12-04, answers written into the input (a shortcut: see the archive's notes)"
ARCHIVE = {
    "recall_curriculum": "Zoology's task at batch 32 (T = 256 / 512): every model at the guess level; the batch-128 "
                         "recipe (bs128) replaced it",
    "recall_curriculum_answers_in_input": f"{_OLD_TASK}; the 3-seed grid at batch 32",
    "recall_curriculum_sweep": f"{_OLD_TASK}; the (hidden, lr) sweep that chose the batch-32 grid's recipe",
    "recall_curriculum_t64_answers_in_input": f"{_OLD_TASK}; the probe that showed the shortcut",
    "recall_curriculum_labels_only_sweep": "probe: the batch-32 recipe on Zoology's task, Standard only, at the "
                                           "guess level",
    "recall_curriculum_labels_only_t64": "probe: T = 64 without a curriculum at batch 32, at the guess level",
    "recall_curriculum_labels_only_t64_bsbr": "probe: as labels_only_t64, BSBR",
    "recall_curriculum_bs128_chunk8": "probe: BSBR with chunk 8 in the bs128 recipe, seed 0; stayed at the guess "
                                      "level",
    "recall_vs_length": f"{_OLD_TASK}; the issue's grid at T = 256-1,024, 300 steps, every model near 0",
    "recall_vs_length_1000steps": f"{_OLD_TASK}; a longer budget probe",
    "recall_vs_length_2000steps": f"{_OLD_TASK}; a longer budget probe",
    "recall_vs_length_vocab256": f"{_OLD_TASK}; vocabulary 256, 200 steps",
    "recall_vs_length_small": f"{_OLD_TASK}; the 'small' budget (T = 64 / 128)",
    "recall_vs_length_small_labels_only": "the 'small' budget on Zoology's task: every model at the guess level; "
                                          "bs128 replaced it",
    "recall_vs_length_gau_init_002": f"{_OLD_TASK}; GAU qk_scale_init probe",
    "recall_vs_length_gau_init_05": f"{_OLD_TASK}; GAU qk_scale_init probe",
    "recall_vs_length_gau_init_05_4000": f"{_OLD_TASK}; GAU qk_scale_init probe",
    "recall_vs_length_gau_init_05_4000_t128": f"{_OLD_TASK}; GAU qk_scale_init probe",
    "ablations_mqar": f"{_OLD_TASK}; 200 steps, every variant near chance",
    "gau_rows_bs128": "diagnostic of GAU's bs128 checkpoints (experiments/gau_rows.py), quoted in the bs128 notes; "
                      "no section",
}


def results_commit(data: dict) -> tuple[str, bool]:
    """The commit(s) a results file was produced at, as text, and whether they pin it (recorded, none +dirty).

    Runs that carry their own "environment" (run_grid since 2026-12-07) are counted per commit; older files record
    only the last writer's environment, which says nothing of the commit of earlier runs in a file with several."""
    runs = data.get("runs")
    runs = list(runs.values()) if isinstance(runs, dict) else [r for r in runs if isinstance(r, dict)] \
        if isinstance(runs, list) else []  # a dict of cells (run_grid) or a list of invocations (convert_*.py)
    own = [r["environment"].get("commit") for r in runs if isinstance(r.get("environment"), dict)]
    if runs and len(own) == len(runs) and all(own):
        counts = Counter(own)
        text = ", ".join(c if len(counts) == 1 else f"{c} ({n} runs)" for c, n in counts.items())
        return text, not any("+dirty" in c for c in counts)
    commit = (data.get("environment") or {}).get("commit")
    if not commit:
        return "none recorded", False
    if len(runs) > 1:
        return f"{commit} (the last of {len(runs)} runs; earlier runs' commits not recorded)", "+dirty" not in commit
    return commit, "+dirty" not in commit


def load_all(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _curriculum(data: dict) -> str:
    """Mean test accuracy per model and final T over the seeds of the most-run setting."""
    runs = list(data["runs"].values())
    settings = Counter((r["model_options"]["hidden_dim"], r["train"]["lr"]) for r in runs)
    main = settings.most_common(1)[0][0]
    out = []
    for t in sorted({r["task"]["seq_len"] for r in runs}):
        by_model: dict[str, list[float]] = {}
        for r in runs:
            if r["task"]["seq_len"] == t and (r["model_options"]["hidden_dim"], r["train"]["lr"]) == main:
                by_model.setdefault(r["model"], []).append(r["test"]["accuracy"])
        seeds = {len(v) for v in by_model.values()}
        cells = sorted(by_model.items(), key=lambda kv: -_mean(kv[1]))
        n = "/".join(map(str, sorted(seeds)))
        out.append(f"T = {t}, {'one seed' if n == '1' else f'mean of {n} seeds'}: "
                   + ", ".join(f"{m} {_mean(v):.3f}" for m, v in cells))
    return "test accuracy at " + "; ".join(out)


def _passkey(data: dict) -> str:
    runs = data["runs"]
    b = data["budget"]
    return (f"all 5 digits right at T = {b['train_len']:,}: "
            + ", ".join(f"{m} {r['test']['example_accuracy']:.2f}"
                        for m, r in sorted(runs.items(), key=lambda kv: -kv[1]["test"]["example_accuracy"])))


def _convergence(data: dict) -> str:
    runs = sorted(data["runs"].values(), key=lambda r: r["test"]["bits_per_token"])
    return (f"test bits/byte at T = {runs[0]['task']['seq_len']:,}: "
            + ", ".join(f"{r['model']} {r['test']['bits_per_token']:.3f}" for r in runs))


def _ablations(data: dict) -> str:
    def name(r):
        o = r["model_options"]
        extra = [f"compression {o['compression_factor']}"] if o.get("compression_factor") else []
        extra += [f"state_norm {o['state_norm']}"] if o.get("state_norm", "mean") != "mean" else []
        return f"chunk {o['chunk_size']}" + "".join(f", {e}" for e in extra)

    runs = sorted(data["runs"].values(), key=lambda r: r["test"]["loss"])
    return "test loss (nats/byte): " + ", ".join(f"{name(r)} {r['test']['loss']:.3f}" for r in runs)


def _long_document(data: dict) -> str:
    out = []
    for r in data["runs"].values():
        s, w = r["stream"], r["model_options"].get("retrieval_window")
        out.append(f"{'all chunks' if w is None else f'window {w}'}: streamed {s['bits_per_byte']:.3f} bits/byte "
                   f"vs {s['windowed_bits_per_byte']:.3f} in windows of {s['window']}, cache "
                   f"{s['final_cache_bytes'] / 2**20:.2f} MiB after {s['tokens']:,} tokens")
    return "; ".join(out)


def _doc(data: dict) -> str:
    rows = data.get("rows")
    return f"{len(rows)} measured conversions" if isinstance(rows, list) else "see the document"


HEADLINES = {"curriculum": _curriculum, "passkey": _passkey, "convergence": _convergence, "ablations": _ablations,
             "long_document": _long_document, "doc": _doc}


def headline(kind: str, data: dict) -> str:
    """The file's current result in one line (numbers rounded as the section's tables round them)."""
    try:
        return HEADLINES[kind](data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # a file of another layout: say so
        return f"(no headline: {type(err).__name__} {err})"
