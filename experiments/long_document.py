"""Experiment 5: a trained BSBR language model streams a 100,000+-byte document through its streaming cache.

Trains a byte-level BSBR LM on the standard library's source (train split) at T = --train-len, then feeds
the first --tokens bytes of the test split (source files joined in order) through the streaming cache in
pieces of --piece bytes.  Reports prefill throughput, cache bytes as the stream grows (one state per chunk
without a retrieval window; bounded with --retrieval-window), and loss / bits per byte by position bucket: does the
model keep predicting well far beyond the length it was trained on?  The same bytes are also scored cut into
independent windows of the training length: the difference per bucket is what the long cached context adds
(or costs), with the text held fixed.

    PYTHONPATH=src flock /tmp/bsbr-cpu.lock python experiments/long_document.py [--retrieval-window 8]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from _exp import build, run_grid, train_run
from tqdm import tqdm

from bsbr.tasks import get_task


def windowed_nll(lm, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Per-position loss [N - 1] when the bytes are cut into independent windows of ``window`` (no context
    crosses a window boundary; the first byte of each window has no prediction and is NaN)."""
    n = ids.shape[1]
    nll = torch.full((n - 1,), float("nan"))
    with torch.inference_mode():
        for a in range(0, n, window):
            chunk = ids[:, a : a + window]
            if chunk.shape[1] > 1:
                logits = lm(chunk).logits[0].float()
                nll[a : a + chunk.shape[1] - 1] = F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="none")
    return nll


def stream(lm, ids: torch.Tensor, piece: int, edges: list[int], window: int) -> dict:
    """Feed ids [1, N] through the cache; per-position loss of predicting byte t+1 from all bytes <= t, beside
    the loss of the same bytes cut into independent windows of ``window`` (the training length)."""
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
    win = windowed_nll(lm, ids, window)
    both = ~torch.isnan(win)  # positions predicted in both settings
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = torch.zeros(n - 1, dtype=torch.bool)
        sel[lo : min(hi, n - 1)] = True
        sel &= both
        if sel.any():
            s, w = float(nll[sel].mean()), float(win[sel].mean())
            buckets.append({"from": lo, "to": min(hi, n - 1), "bits_per_byte": s / math.log(2),
                            "windowed_bits_per_byte": w / math.log(2), "positions": int(sel.sum())})
    return {"tokens": n, "piece": piece, "window": window, "seconds": seconds, "tokens_per_second": n / seconds,
            "cache_bytes": cache_bytes[:: max(1, len(cache_bytes) // 50)] + cache_bytes[-1:],
            "final_cache_bytes": cache_bytes[-1]["bytes"], "loss": float(nll.mean()),
            "bits_per_byte": float(nll[both].mean()) / math.log(2),
            "windowed_bits_per_byte": float(win[both].mean()) / math.log(2), "by_position": buckets}


def kv_cache_bytes(lm_config: dict, tokens: int, piece: int) -> int:
    """Measured: the cache bytes of a standard-attention model of the same size after ``tokens`` tokens."""
    std = build("Standard", lm_config["vocab_size"], lm_config["hidden_dim"], lm_config["num_layers"],
                lm_config["num_heads"]).eval()
    cache = std.new_cache(1)
    ids = torch.zeros(1, tokens, dtype=torch.long)
    with torch.inference_mode():
        for a in range(0, tokens, piece):
            std(ids[:, a : a + piece], cache=cache, use_cache=True)
    return cache.state_nbytes()


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
    p.add_argument("--retrieval-window", type=int, default=None,
                   help="BSBR retrieval_window W (chunks): trains and streams with a bounded cache; default: none")
    args = p.parse_args()
    task_spec = {"name": "lm", "seq_len": args.train_len, "corpus": "python"}
    train_opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 10), "eval_every": 0, "eval_batches": 4, "seed": args.seed}
    edges = [0, 1024, 4096, 16384, 65536, args.tokens]

    def one():
        opts = {"chunk_size": args.chunk_size}
        if args.retrieval_window is not None:
            opts["retrieval_window"] = args.retrieval_window
        summary, lm = train_run("BSBR", opts, task_spec, train_opts, test_batches=8, keep_every=10)
        lm.eval()
        task = get_task("lm", seq_len=args.tokens, corpus="python")
        ids = task.batch("test", 1, 0).input_ids  # the first --tokens bytes of the test split
        summary["stream"] = stream(lm, ids, args.piece, edges, args.train_len)
        cfg = lm.config.to_dict()
        summary["stream"]["standard_kv_cache_bytes_at_8192"] = kv_cache_bytes(cfg, 8192, args.piece)
        summary["stream"]["bsbr_cache_bytes_at_8192"] = next(c["bytes"] for c in summary["stream"]["cache_bytes"]
                                                             if c["tokens"] >= 8192)
        return summary

    key = f"BSBR|python|T={args.train_len}|steps={args.steps}|tokens={args.tokens}"
    if args.retrieval_window is not None:
        key += f"|window={args.retrieval_window}"
    budget = {k: v for k, v in vars(args).items() if k != "retrieval_window"}  # per run: in model_options
    run_grid("long_document", budget, [(key, {})], one)


if __name__ == "__main__":
    main()
