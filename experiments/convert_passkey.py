"""Passkey retrieval on SmolLM2-135M and its conversions (no training): a 5-digit key hidden at a depth of 0-100% of
a prompt of 2k / 4k / 8k tokens of repeated filler, then "What is the pass key? The pass key is"; greedy decoding of
8 tokens; a trial scores 1 when the key's digits are the first digits generated.

    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/convert_passkey.py
    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/convert_passkey.py --lengths 2048 --trials 2

The original runs with its KV cache, the conversions with generate()'s BSBRHFCache (so decoding goes through the
streaming forms).  Writes experiments/results/convert_passkey.json after every cell (a re-run skips what is done)
and docs/figures/convert_passkey.png (accuracy by length and depth, one panel per model, read from the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from convert import environment  # noqa: E402

from bsbr.convert import convert_to_bsbr, set_attention  # noqa: E402
from bsbr.convert.study.checkpoints import smollm2  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "convert_passkey.json"
FIGURE = ROOT / "docs" / "figures" / "convert_passkey.png"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
INTRO = "A pass key is hidden somewhere in the long text below. Read it all and remember the pass key.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"

VARIANTS = {
    "original": None,
    "blocks chunk 256 top-2 mean, first chunk": {"chunk_size": 256, "top_k": 2, "block_summary": "mean"},
    "local chunk 256": {"chunk_size": 256, "retrieval": "none"},
    "blocks chunk 64 top-8 mean, first chunk, per query head": {"chunk_size": 64, "top_k": 8,
                                                                 "block_heads": "query"},
    "sliding window 1024 + 4 sinks": "window",
    # 2026-12-07: the setting that meets the 8,192-token perplexity target at <= 1/4 of the keys
    "blocks chunk 16 top-48 mean, first chunk, per query head": {"chunk_size": 16, "top_k": 48,
                                                                  "block_heads": "query"},
}


def prompt(tok, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids [1, ~length - 8]: intro, filler with the needle at ``depth`` of the filler, question."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, needle, question, filler = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION), enc(FILLER)
    room = length - 8 - len(intro) - len(needle) - len(question)  # 8 new tokens: at most ``length`` in all
    body = (filler * (room // len(filler) + 1))[:room]
    cut = int(round(depth * room / len(filler))) * len(filler)  # at a sentence boundary of the filler
    cut = min(cut, room)
    ids = intro + body[:cut] + needle + body[cut:] + question
    return torch.tensor([ids])


def build(original, spec):
    if spec is None:
        return original
    if spec == "window":
        model = convert_to_bsbr(copy.deepcopy(original), chunk_size=256)
        set_attention(model, "sliding_window", window=1024, sink=4)
        return model
    spec = dict(spec)
    return convert_to_bsbr(copy.deepcopy(original), spec.pop("chunk_size"), **spec)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["cells"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        cells = record["cells"][name]
        lengths = sorted({int(k.split("/")[0]) for k in cells})
        depths = sorted({float(k.split("/")[1]) for c in record["cells"].values() for k in c})
        grid = [[cells.get(f"{L}/{d}", {}).get("accuracy", float("nan")) for d in depths] for L in lengths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{int(d * 100)}%" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths])
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="w" if a < 0.6 else "k", fontsize=8)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("depth of the key")
    axes[0][0].set_ylabel("prompt tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(record: dict) -> str:
    """Markdown: one row per (model, length), accuracy at each depth measured (trials in brackets)."""
    depths = sorted({float(k.split("/")[1]) for c in record["cells"].values() for k in c})
    lines = ["| conversion | tokens | " + " | ".join(f"depth {int(d * 100)}%" for d in depths) + " |",
             "|---|---|" + "---|" * len(depths)]
    for name, cells in record["cells"].items():
        for L in sorted({int(k.split("/")[0]) for k in cells}):
            vals = []
            for d in depths:
                c = cells.get(f"{L}/{d}")
                vals.append("—" if c is None else f"{c['accuracy']:.2f} ({c['trials']})")
            lines.append(f"| {name} | {L:,} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--trials", type=int, default=2, help="keys per (length, depth)")
    p.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--table", action="store_true", help="print the Markdown table of the JSON")
    args = p.parse_args(argv)
    path = Path(args.results)
    record = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    if args.table:
        print(table(record))
        return 0
    if args.plot_only:
        plot(record, FIGURE)
        return 0
    torch.set_num_threads(1)
    original, tok = smollm2(ROOT / "runs" / "models" / "smollm2-135m")
    record.setdefault("runs", []).append({
        "environment": environment(),
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/convert_passkey.py " + " ".join(
            argv if argv is not None else sys.argv[1:])})
    record["prompt"] = {"intro": INTRO, "filler": FILLER, "needle": NEEDLE, "question": QUESTION,
                        "decode": "greedy, 8 new tokens; correct when the digits generated start with the key"}
    for L in args.lengths:
        for name in args.variants:
            model = build(original, VARIANTS[name])
            cells = record["cells"].setdefault(name, {})
            for depth in args.depths:
                key = f"{L}/{depth}"
                if key in cells and cells[key]["trials"] >= args.trials:
                    continue
                rng = random.Random(f"{L}/{depth}")
                hits, answers, t0 = 0, [], time.perf_counter()
                for _ in range(args.trials):
                    secret = rng.randint(10000, 99999)
                    ids = prompt(tok, L, depth, secret)
                    with torch.no_grad():
                        out = model.generate(ids, max_new_tokens=8, do_sample=False,
                                             pad_token_id=tok.eos_token_id)
                    text = tok.decode(out[0, ids.shape[1] :])
                    digits = "".join(ch for ch in text if ch.isdigit())
                    hits += digits.startswith(str(secret))
                    answers.append({"key": secret, "generated": text, "tokens": ids.shape[1]})
                cells[key] = {"trials": args.trials, "accuracy": hits / args.trials, "answers": answers,
                              "seconds": round(time.perf_counter() - t0, 1)}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=1))
                print(f"{name:45s} {L:5d} depth {depth:.2f}: {hits}/{args.trials}  {[a['generated'] for a in answers]}",
                      flush=True)
            if model is not original:
                del model
    path.write_text(json.dumps(record, indent=1))
    plot(record, FIGURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
