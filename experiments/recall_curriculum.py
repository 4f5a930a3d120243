"""Experiment 1b: associative recall (MQAR) with a curriculum, every model, several seeds (issue 14).

The same MQAR as experiment 1 (keys from the lower half of the vocabulary, values from the upper half,
power-law query placement, num_kv_pairs = T / 16), but training starts on shorter rows with fewer pairs and
grows to the final length: a stage of ``--stage-steps`` steps at each of ``--stage-lengths`` shorter than the
final T (pairs = length / 16 there too), then the final T for the rest of ``--steps`` (the step count includes
the stages; valid and test batches are always the final T).  Held-out (test split) accuracy, also by pairs
remaining and by query-to-key distance (``MQAR.score``).  The answers are labels only, as in Zoology;
``--answers-in-input`` runs the task as it was before 2026-12-04 (each answer also in the input), on which the
models learnt to answer by elimination rather than by looking keys up (experiments/NOTES.md).

    # the recipe that learns the lookup (tag bs128): batch 128, 5,000 steps at T = 64 and 500 at T = 128 first;
    # at T = 256 over seeds 0-2 DeltaNet, Standard and SlidingWindow reach 0.93-1.00 on every seed, BSBR
    # 0.42-0.61, GAU 1.000 on one seed and the guess level on two, Linear and Hopfield the guess level
    # (23-51 CPU minutes a run); at T = 512 over the same seeds DeltaNet and Standard 0.95-0.99, SlidingWindow
    # 0.55-0.74 (nothing beyond its two layers' reach), GAU 0.94 on seed 0 and the guess level on seeds 1 and 2,
    # BSBR 0.18-0.25, Linear and Hopfield the guess level (30-100 CPU minutes a run; experiments/NOTES.md)
    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/recall_curriculum.py --lengths 256 512 --seeds 0 1 2 \\
        --lrs 0.003 --batch-size 128 --warmup 300 --stage-steps 5000 500 --steps 6500 --eval-every 500 --tag bs128
    # the defaults: batch 32 and 2,500 steps, on which no model leaves the guess level (results without a tag)
    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/recall_curriculum.py --lengths 256 512 --seeds 0 1 2
    # the first sweep (Standard only, T = 256, one seed; on the earlier task)
    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/recall_curriculum.py --models Standard --lengths 256 \\
        --lrs 0.001 0.003 --hiddens 64 128 --seeds 0 --answers-in-input --tag sweep

On a 2-core CPU the grid can run as two one-thread processes given disjoint ``--models`` (the grid of record
ran as ``--models GAU Standard BSBR`` beside ``--models Linear SlidingWindow DeltaNet Hopfield``); each
process adds its cells to the one results file under a lock.

A cell that is killed resumes from its checkpoint in runs/experiments/<results name>/<cell>/ (gitignored);
finished cells are skipped (a cell recorded with other settings stops the grid: use another ``--tag``).
``--device cuda`` trains on a GPU (bf16 autocast there, as the loop does); it
stops with a clear message where CUDA is absent.  At Zoology's scale on a GPU, e.g.:

    python experiments/recall_curriculum.py --device cuda --vocab-size 8192 --lengths 256 512 1024 \\
        --steps 20000 --stage-steps 2000 --batch-size 128 --lrs 0.003 --hiddens 128 --tag gpu
"""

from __future__ import annotations

import argparse
import itertools

from _exp import check_device, cpu_flush_denormals, run_dir, run_grid, train_run

from bsbr.layers.bsbr import LAYER_GRADS
from bsbr.models import list_models


def curriculum_stages(stage_lengths: list[int], stage_steps: list[int], final_len: int) -> list[dict]:
    """The curriculum stages before ``final_len``: one per stage length below it, with ``stage_steps`` steps (one
    number for every stage, or one per stage length) and pairs = length / 16.  Raises ValueError when
    ``stage_steps`` is neither."""
    steps = list(stage_steps) * len(stage_lengths) if len(stage_steps) == 1 else list(stage_steps)
    if len(steps) != len(stage_lengths):
        raise ValueError(f"--stage-steps takes one number or one per stage length ({len(stage_lengths)}), "
                         f"got {len(steps)}")
    return [{"steps": n, "seq_len": s, "num_kv_pairs": max(1, s // 16)}
            for s, n in zip(stage_lengths, steps, strict=True) if s < final_len]


def jobs_for(args) -> list[tuple[str, dict]]:
    jobs = []
    for t in args.lengths:
        try:
            stages = curriculum_stages(args.stage_lengths, args.stage_steps, t)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if sum(st["steps"] for st in stages) >= args.steps:
            raise SystemExit(f"--steps {args.steps} leaves no step at T = {t} after stages of {args.stage_steps} "
                             f"steps; raise --steps or lower --stage-steps")
        # seed outermost: an interrupted grid has every model at the first seeds rather than some models at all
        for seed, model, hidden, lr in itertools.product(args.seeds, args.models, args.hiddens, args.lrs):
            opts = {"hidden_dim": hidden, "num_layers": args.layers, "num_heads": max(1, hidden // args.head_dim)}
            if model == "BSBR":
                opts["chunk_size"] = args.chunk_size
            if model == "BSBRBlocks":  # no sink: MQAR puts every pair at the start (the first chunk would hold them)
                opts.update(chunk_size=args.blocks_chunk_size, top_k=args.top_k, block_summary=args.block_summary,
                            selection_grad=args.selection_grad)
                if args.train_top_k is not None:
                    opts["train_top_k"] = args.train_top_k
                if args.indexer_dim is not None:
                    opts["indexer_dim"] = args.indexer_dim
            if model == "GAU" and args.gau_qk_scale_init is not None:
                opts["qk_scale_init"] = args.gau_qk_scale_init
            task = {"name": "mqar", "seq_len": t, "vocab_size": args.vocab_size, "num_kv_pairs": t // 16,
                    "random_filler": not args.zero_filler, "answers_in_input": args.answers_in_input, "seed": 0,
                    "curriculum": stages}
            train_opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": lr, "warmup_steps": args.warmup,
                          "eval_every": args.eval_every, "eval_batches": 2, "seed": seed, "weight_decay": 0.1,
                          "device": args.device, "checkpoint_every": args.checkpoint_every}
            key = f"{model}|T={t}|h={hidden}|lr={lr:g}|seed={seed}"
            job = {"model": model, "model_opts": opts, "task_spec": task, "train_opts": train_opts,
                   "test_batches": args.test_batches}
            if model == "BSBRBlocks" and args.train_top_k_until is not None:
                job["train_top_k_until"] = args.train_top_k_until
            jobs.append((key, job))
    return jobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list_models())
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512])
    p.add_argument("--stage-lengths", nargs="+", type=int, default=[64, 128],
                   help="curriculum stages (each shorter than the final T is used; pairs = length / 16)")
    p.add_argument("--stage-steps", nargs="+", type=int, default=[1500, 500],
                   help="steps of each curriculum stage (one number: the same for every stage)")
    p.add_argument("--steps", type=int, default=2500, help="total steps, stages included")
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-3])
    p.add_argument("--hiddens", nargs="+", type=int, default=[64])
    p.add_argument("--head-dim", type=int, default=32, help="heads = hidden / head_dim")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="model initialisation and data order (the task's own seed stays 0)")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--zero-filler", action=argparse.BooleanOptionalAction, default=True,
                   help="token 0 between the queries (default) or random tokens (--no-zero-filler)")
    p.add_argument("--answers-in-input", action="store_true",
                   help="write each answer into the input after its query too (MQAR before 2026-12-04; lets a model "
                        "answer by elimination without looking keys up: bsbr/tasks/mqar.py)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--blocks-chunk-size", type=int, default=16,
                   help="BSBRBlocks' chunk: small enough that the T / 16 pairs span several chunks (4 at T = 512)")
    p.add_argument("--top-k", type=int, default=2, help="BSBRBlocks: chunks each query selects")
    p.add_argument("--block-summary", default="mean",
                   help="BSBRBlocks: chunk summary scored (mean, minmax, max or tokens)")
    p.add_argument("--selection-grad", default="none", choices=list(LAYER_GRADS),
                   help="BSBRBlocks: how the scores learn")
    p.add_argument("--train-top-k", type=int, default=None,
                   help="BSBRBlocks: chunks selected per query while training (default --top-k; at least T / chunk "
                        "selects every earlier chunk, as Landmark Attention trains)")
    p.add_argument("--train-top-k-until", type=int, default=None,
                   help="BSBRBlocks: select --train-top-k chunks for the steps before this one, then --top-k (dense "
                        "warm-up, then sparse training, as DeepSeek's sparse attention trains; needs --train-top-k)")
    p.add_argument("--indexer-dim", type=int, default=None,
                   help="BSBRBlocks: an indexer of this many dimensions per head selects (needs --selection-grad "
                        "distill)")
    p.add_argument("--test-batches", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--gau-qk-scale-init", type=float, default=0.5,
                   help="GAU's qk_scale_init (its default 0.02 starts silent and learnt no MQAR; experiments/NOTES.md)")
    p.add_argument("--flush-denormals", action=argparse.BooleanOptionalAction, default=True,
                   help="flush denormal floats to zero on CPU (5x faster late in training; see _exp.py)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--tag", default="", help="results go to results/recall_curriculum_<tag>.json")
    args = p.parse_args()
    check_device(args.device)
    if args.train_top_k_until is not None and args.train_top_k is None:
        p.error("--train-top-k-until needs --train-top-k")
    if args.flush_denormals:
        cpu_flush_denormals()
    budget = vars(args)
    name = f"recall_curriculum_{args.tag}" if args.tag else "recall_curriculum"
    run_grid(name, budget, jobs_for(args),
             lambda key, **job: train_run(**job, keep_every=10, out_dir=run_dir(name, key))[0], pass_key=True)


if __name__ == "__main__":
    main()
