"""Experiments 2 and 3: language-model convergence and perplexity on the prose corpus.

Byte-level LM on ``pydoc_data.topics`` (English prose, fixed hashed splits) at T = 1024 (and any other
--lengths): loss vs step and vs wall-clock, steps to reach a target validation loss, peak training memory,
and final valid / test bits per byte with loss by position bucket.  Same budget for every model.

    PYTHONPATH=src flock /tmp/bsbr-cpu.lock python experiments/convergence.py --models BSBR Standard
"""

from __future__ import annotations

import argparse

from _exp import run_grid, train_run

from bsbr.models import list_models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list_models())
    p.add_argument("--lengths", nargs="+", type=int, default=[1024])
    p.add_argument("--corpus", default="prose")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--target-loss", type=float, default=None,
                   help="record the first evaluated step at or below this valid loss (training continues)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4, help="BSBRBlocks: chunks each query selects (chunk: --chunk-size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="results go to results/convergence_<corpus>_<tag>.json")
    args = p.parse_args()
    jobs = []
    for t in args.lengths:
        for model in args.models:
            opts = {"chunk_size": args.chunk_size} if model in ("BSBR", "BSBRBlocks") else {}
            if model == "BSBRBlocks":
                opts["top_k"] = args.top_k
            task = {"name": "lm", "seq_len": t, "corpus": args.corpus, "position_buckets": 8}
            train_opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                          "warmup_steps": max(1, args.steps // 10), "eval_every": args.eval_every, "eval_batches": 4,
                          "seed": args.seed, "weight_decay": 0.1}
            jobs.append((f"{model}|{args.corpus}|T={t}", {"model": model, "model_opts": opts, "task_spec": task,
                                                          "train_opts": train_opts, "test_batches": None,
                                                          "target": args.target_loss}))

    def one(target, **job):
        summary, _ = train_run(**job)
        if target is not None:  # first periodic evaluation at or below the target
            hits = [e["step"] for e in summary["evals"] if e["loss"] <= target]
            summary["steps_to_target"] = hits[0] if hits else None
            summary["target_loss"] = target
        return summary

    name = f"convergence_{args.corpus}" + (f"_{args.tag}" if args.tag else "")
    run_grid(name, vars(args), jobs, one)


if __name__ == "__main__":
    main()
