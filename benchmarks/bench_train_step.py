"""One MQAR training step (forward, backward, AdamW) with the full logits vs the LM head at scored positions only.

``lm(..., labels=..., return_logits=False)`` (what ``bsbr.train`` calls) gives the same loss and gradients as the
full [B, T, vocab] logits (tests/test_invariants.py); this measures what it saves.  Both forms of one model and
length run in alternating rounds (min and median of each), so machine noise hits them alike.

    PYTHONPATH=src python benchmarks/bench_train_step.py            # writes results/train_step.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bsbr.models import build_model
from bsbr.tasks import get_task
from common import environment, header, write_json


def step_fn(lm, optimizer, batch, full: bool):
    def step():
        optimizer.zero_grad(set_to_none=True)
        out = lm(batch.input_ids, labels=batch.labels, return_logits=full)
        out.loss.backward()
        optimizer.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["BSBR", "Standard"])
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="train_step", help="results/<out>.json and .md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    for T in args.lengths:
        task = get_task("mqar", seq_len=T, vocab_size=args.vocab_size, num_kv_pairs=T // 16)
        batch = task.batch("train", args.batch_size, 0)
        for name in args.models:
            torch.manual_seed(0)
            lm = build_model(name, vocab_size=args.vocab_size, hidden_dim=128, num_layers=2, num_heads=4,
                             ff_dim=512, dropout=0.0, causal_lm=True, **({"chunk_size": 64} if name == "BSBR" else {}))
            optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4)
            fns = {"full": step_fn(lm, optimizer, batch, True), "scored": step_fn(lm, optimizer, batch, False)}
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(args.rounds):
                for key, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
            row = {"model": name, "T": T, "scored_positions": int((batch.labels[:, 1:] != -100).sum())}
            for key, ts in times.items():
                row[f"{key}_min_s"], row[f"{key}_median_s"] = min(ts), statistics.median(ts)
            row["speedup_min"] = row["full_min_s"] / row["scored_min_s"]
            rows.append(row)
            print(f"{name:>13} T={T:>5}: full {row['full_min_s']:.3f} s, scored only {row['scored_min_s']:.3f} s "
                  f"-> {row['speedup_min']:.2f}x", flush=True)
    config = vars(args)
    lines = ["# One MQAR training step: full logits vs scored positions only", "", header(env), "",
             f"Vocabulary {args.vocab_size}, batch {args.batch_size}, hidden 128, 2 layers, 4 heads, "
             f"{args.rounds} alternating rounds after a warm-up; seconds per step (min / median).", "",
             "| model | T | scored positions | full logits | scored only | speed-up (min) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['T']} | {r['scored_positions']} | {r['full_min_s']:.3f} / {r['full_median_s']:.3f} "
              f"| {r['scored_min_s']:.3f} / {r['scored_median_s']:.3f} | {r['speedup_min']:.2f}x |" for r in rows]
    path = write_json(f"{args.out}.json", {"environment": env, "config": config, "rows": rows})
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
