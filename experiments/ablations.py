"""Experiment 4: BSBR ablations — chunk size and compression factor — quality, speed and cache size.

Each variant is trained with the same budget on one task (MQAR by default; ``--task lm`` for the prose
LM) and then measured untrained-independent properties: inference throughput of a [1, --speed-len] forward
pass and the streaming cache's bytes after --speed-len tokens (the state that a chunk size and a compression
factor trade against quality).

    PYTHONPATH=src flock /tmp/bsbr-cpu.lock python experiments/ablations.py --chunks 32 64 128 256 --compress 2 4 8
"""

from __future__ import annotations

import argparse
import time

import torch
from _exp import run_grid, train_run


def speed_and_cache(lm, length: int, piece: int = 512) -> dict:
    """Median-free single measurement after one warm-up: tokens/s of one [1, length] forward, cache bytes."""
    ids = torch.randint(0, lm.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    lm.eval()
    with torch.inference_mode():
        lm(ids[:, :piece])
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            lm(ids)
            times.append(time.perf_counter() - t0)
        cache = lm.new_cache(1)
        for a in range(0, length, piece):
            lm(ids[:, a : a + piece], cache=cache, use_cache=True)
    times.sort()
    return {"length": length, "forward_seconds_median": times[1], "tokens_per_second": length / times[1],
            "cache_bytes": cache.state_nbytes()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("mqar", "lm"), default="mqar")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--chunks", nargs="+", type=int, default=[32, 64, 128, 256])
    p.add_argument("--compress", nargs="*", type=int, default=[2, 4, 8], help="compression factors at chunk 64")
    p.add_argument("--state-norms", nargs="*", default=[], choices=("mean", "none"),
                   help="state_norm variants at the base chunk besides the default 'mean'")
    p.add_argument("--base-chunk", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--speed-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answers-in-input", action="store_true",
                   help="MQAR only: write each answer into the input after its query (MQAR before 2026-12-04, which "
                        "the committed MQAR ablation used; bsbr/tasks/mqar.py)")
    args = p.parse_args()
    if args.task == "mqar":
        task = {"name": "mqar", "seq_len": args.seq_len, "vocab_size": 256, "num_kv_pairs": args.seq_len // 16,
                "seed": args.seed, "answers_in_input": args.answers_in_input}
    else:
        task = {"name": "lm", "seq_len": args.seq_len, "corpus": "prose"}
    variants = [({"chunk_size": c}, f"chunk={c}") for c in args.chunks]
    variants += [({"chunk_size": args.base_chunk, "compression_factor": f}, f"chunk={args.base_chunk},compress={f}")
                 for f in args.compress]
    variants += [({"chunk_size": args.base_chunk, "state_norm": n}, f"chunk={args.base_chunk},state_norm={n}")
                 for n in args.state_norms if n != "mean"]
    train_opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": args.steps // 10, "eval_every": 0, "eval_batches": 4, "seed": args.seed}
    jobs = [(f"BSBR|{args.task}|T={args.seq_len}|{name}", {"opts": opts}) for opts, name in variants]

    def one(opts):
        summary, lm = train_run("BSBR", opts, task, train_opts, test_batches=8, keep_every=10)
        summary["inference"] = speed_and_cache(lm, args.speed_len)
        return summary

    run_grid(f"ablations_{args.task}", vars(args), jobs, one)


if __name__ == "__main__":
    main()
