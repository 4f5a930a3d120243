"""Experiment 1: associative recall (MQAR) accuracy vs sequence length, every model, same step budget.

Zoology-style MQAR (keys from the lower half of the vocabulary, values from the upper half, power-law query
placement) at each length with num_kv_pairs = T / 16; hidden 128, 2 layers, 4 heads; a learning-rate sweep
per (model, length) keeping the best valid accuracy, as Zoology does.  Held-out (test split) accuracy.

    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/recall_vs_length.py   # T = 256/512/1,024, vocab 8,192

Training computes the LM head only at the scored positions (``return_logits=False``), which is what makes a
vocabulary of 8,192 affordable here: 3.7-4.8x faster steps (benchmarks/results/train_step.md).
"""

from __future__ import annotations

import argparse

from _exp import run_grid, train_run

from bsbr.models import list_models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list_models())
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--test-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answers-in-input", action="store_true",
                   help="write each answer into the input after its query (MQAR before 2026-12-04, which every "
                        "committed results file of this script used; bsbr/tasks/mqar.py)")
    p.add_argument("--tag", default="", help="results go to results/recall_vs_length_<tag>.json (another budget)")
    p.add_argument("--gau-qk-scale-init", type=float, default=None,
                   help="GAU's qk_scale_init (std of its Q/K scales at initialisation; default: the layer's 0.02)")
    args = p.parse_args()
    budget = vars(args)
    jobs = []
    for t in args.lengths:
        for model in args.models:
            for lr in args.lrs:
                opts = {"chunk_size": args.chunk_size} if model == "BSBR" else {}
                if model == "GAU" and args.gau_qk_scale_init is not None:
                    opts = {"qk_scale_init": args.gau_qk_scale_init}
                task = {"name": "mqar", "seq_len": t, "vocab_size": args.vocab_size, "num_kv_pairs": t // 16,
                        "seed": args.seed, "answers_in_input": args.answers_in_input}
                train_opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": lr,
                              "warmup_steps": args.steps // 10, "eval_every": 0, "eval_batches": 4,
                              "seed": args.seed, "weight_decay": 0.1}
                jobs.append((f"{model}|T={t}|lr={lr:g}", {"model": model, "model_opts": opts, "task_spec": task,
                                                           "train_opts": train_opts,
                                                           "test_batches": args.test_batches}))
    name = f"recall_vs_length_{args.tag}" if args.tag else "recall_vs_length"
    run_grid(name, budget, jobs, lambda **job: train_run(**job, keep_every=10)[0])


if __name__ == "__main__":
    main()
