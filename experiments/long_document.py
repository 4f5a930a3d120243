"""Experiment 5: a trained BSBR language model streams a 100,000+-byte document through its bounded cache.

Trains a byte-level BSBR LM on the standard library's source (train split) at T = --train-len, then feeds
the first --tokens bytes of the test split (source files joined in order) through the streaming cache in
pieces of --piece bytes.  Reports prefill throughput, cache bytes as the stream grows (it must stop growing
with length apart from the buffered partial chunk), and loss / bits per byte by position bucket: does the
model keep predicting well far beyond the length it was trained on?

    PYTHONPATH=src flock /tmp/bsbr-cpu.lock python experiments/long_document.py
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from _exp import run_grid, train_run
from tqdm import tqdm

from bsbr.tasks import get_task


def stream(lm, ids: torch.Tensor, piece: int, edges: list[int]) -> dict:
    """Feed ids [1, N] through the cache; per-position loss of predicting byte t+1 from bytes <= t."""
    cache = lm.new_cache(1)
    n = ids.shape[1]
    nll = torch.empty(n - 1)
    cache_bytes = []
    start = time.perf_counter()
    prev = None
    with torch.inference_mode():
        for a in tqdm(range(0, n, piece), desc="stream", unit="piece"):
            chunk = ids[:, a : a + piece]
            logits = lm(chunk, cache=cache, use_cache=True).logits[0].float()  # [piece, V]
            if prev is not None:  # the last logit of the previous piece predicts this piece's first byte
                nll[a - 1] = F.cross_entropy(prev[None], chunk[0, :1])
            m = chunk.shape[1]
            if m > 1:
                nll[a : a + m - 1] = F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="none")
            prev = logits[-1]
            cache_bytes.append({"tokens": a + m, "bytes": cache.state_nbytes()})
    seconds = time.perf_counter() - start
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        seg = nll[lo : min(hi, n - 1)]
        if seg.numel():
            loss = float(seg.mean())
            buckets.append({"from": lo, "to": min(hi, n - 1), "loss": loss, "bits_per_byte": loss / math.log(2)})
    return {"tokens": n, "piece": piece, "seconds": seconds, "tokens_per_second": n / seconds,
            "cache_bytes": cache_bytes[:: max(1, len(cache_bytes) // 50)] + cache_bytes[-1:],
            "final_cache_bytes": cache_bytes[-1]["bytes"], "loss": float(nll.mean()),
            "bits_per_byte": float(nll.mean()) / math.log(2), "by_position": buckets}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=102_400)
    p.add_argument("--piece", type=int, default=1024)
    p.add_argument("--train-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    task_spec = {"name": "lm", "seq_len": args.train_len, "corpus": "python"}
    train_opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 10), "eval_every": 0, "eval_batches": 4, "seed": args.seed}
    edges = [0, 1024, 4096, 16384, 65536, args.tokens]

    def one():
        summary, lm = train_run("BSBR", {"chunk_size": args.chunk_size}, task_spec, train_opts, test_batches=8,
                                keep_every=10)
        lm.eval()
        task = get_task("lm", seq_len=args.tokens, corpus="python")
        ids = task.batch("test", 1, 0).input_ids  # the first --tokens bytes of the test split
        summary["stream"] = stream(lm, ids, args.piece, edges)
        return summary

    key = f"BSBR|python|T={args.train_len}|steps={args.steps}|tokens={args.tokens}"
    run_grid("long_document", vars(args), [(key, {})], one)


if __name__ == "__main__":
    main()
