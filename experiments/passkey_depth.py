"""Experiment 6: passkey retrieval by depth and length, every model (issue 14).

Each model trains on byte-level passkey retrieval (bsbr.tasks.Passkey: a 5-digit number stated once inside
repetitive filler, asked for at the end; the needle's depth drawn uniformly per row) with final rows of
``--train-len`` bytes, optionally after a curriculum of shorter rows (``--stage-lengths`` / ``--stage-steps``,
valid batches always at ``--train-len``).  The trained model is then tested, unchanged, with the needle at each
of ``--depths`` (0 = start of the row, 1 = just before the question) in rows of each of ``--lengths`` bytes;
``--long-lengths`` are added for the models whose cost is linear in T (Standard and Hopfield are quadratic
and skip them).  A cell's accuracy is the share of test rows with every digit right (``--test-rows`` rows,
``--long-test-rows`` at the long lengths); digit accuracy is kept beside it.

    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/passkey_depth.py

Resumable: a killed training run continues from its checkpoint in runs/experiments/<results name>/<model>/,
finished test cells are kept in eval.json there, and finished models are skipped.  ``--device cuda`` trains
and tests on a GPU (refused with a clear message where CUDA is absent), e.g. at a larger scale:

    python experiments/passkey_depth.py --device cuda --steps 20000 --batch-size 32 --hidden 256 --layers 4 \\
        --lengths 1024 4096 16384 65536 --long-lengths 262144 --tag gpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _exp import check_device, cpu_flush_denormals, run_dir, run_grid, train_run
from tqdm import tqdm

from bsbr.models import list_models
from bsbr.tasks import get_task
from bsbr.train import evaluate

QUADRATIC = ("Standard", "Hopfield")  # cost grows as T^2: not tested at --long-lengths


def test_grid(lm, depths: list[float], lengths: list[int], rows: dict[int, int], store: Path,
              device: str) -> list[dict]:
    """Accuracy of ``lm`` per (length, depth) cell on passkey test rows; cells already in ``store`` are kept."""
    done = json.loads(store.read_text()) if store.exists() else []
    have = {(c["length"], c["depth"]) for c in done}
    cells = [(t, d) for t in lengths for d in depths]
    bar = tqdm(cells, desc="passkey test", unit="cell", file=sys.stderr, leave=False)
    for t, d in bar:
        if (t, d) in have:
            continue
        bar.set_postfix(T=t, depth=d)
        task = get_task("passkey", seq_len=t, depth=d, depth_buckets=1)
        t0 = time.perf_counter()
        m = evaluate(lm, task, "test", batch_size=1, num_batches=rows[t], device=device)
        done.append({"length": t, "depth": d, "rows": rows[t], "example_accuracy": m["example_accuracy"],
                     "digit_accuracy": m["accuracy"], "loss": m["loss"], "seconds": time.perf_counter() - t0})
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(store)
    return sorted(done, key=lambda c: (c["length"], c["depth"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list_models())
    p.add_argument("--train-len", type=int, default=1024)
    p.add_argument("--stage-lengths", nargs="*", type=int, default=[256])
    p.add_argument("--stage-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=600, help="total training steps, curriculum stages included")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4, help="BSBRBlocks: chunks each query selects (chunk: --chunk-size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--long-lengths", nargs="*", type=int, default=[65536])
    p.add_argument("--test-rows", type=int, default=8)
    p.add_argument("--long-test-rows", type=int, default=4, help="rows per cell at --long-lengths and at 16,384+")
    p.add_argument("--train-all-bytes", action="store_true",
                   help="train on every byte of a training row (default: the digits' loss only; see Passkey)")
    p.add_argument("--gau-qk-scale-init", type=float, default=0.5)
    p.add_argument("--flush-denormals", action=argparse.BooleanOptionalAction, default=True,
                   help="flush denormal floats to zero on CPU (5x faster late in training; see _exp.py)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    check_device(args.device)
    if args.flush_denormals:
        cpu_flush_denormals()
    name = f"passkey_depth_{args.tag}" if args.tag else "passkey_depth"
    stages = [{"steps": args.stage_steps, "seq_len": s} for s in args.stage_lengths if s < args.train_len]
    if sum(s["steps"] for s in stages) >= args.steps:
        raise SystemExit(f"--steps {args.steps} leaves no step at the final length after the curriculum stages")
    jobs = []
    for model in args.models:
        opts = {"hidden_dim": args.hidden, "num_layers": args.layers, "num_heads": args.heads}
        if model in ("BSBR", "BSBRBlocks"):
            opts["chunk_size"] = args.chunk_size
        if model == "BSBRBlocks":
            opts["top_k"] = args.top_k
        if model == "GAU" and args.gau_qk_scale_init is not None:
            opts["qk_scale_init"] = args.gau_qk_scale_init
        task = {"name": "passkey", "seq_len": args.train_len, "seed": 0, "curriculum": stages,
                "train_all_bytes": args.train_all_bytes}
        train_opts = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                      "warmup_steps": max(1, args.steps // 20), "eval_every": 0, "eval_batches": 4,
                      "seed": args.seed, "weight_decay": 0.1, "device": args.device, "checkpoint_every": 50}
        jobs.append((model, {"model": model, "model_opts": opts, "task_spec": task, "train_opts": train_opts}))

    def cell(key: str, **job) -> dict:
        out = Path(run_dir(name, key))
        summary, lm = train_run(**job, test_batches=4, keep_every=10, out_dir=str(out))
        lengths = sorted(set(args.lengths) | (set() if key in QUADRATIC else set(args.long_lengths)))
        rows = {t: args.long_test_rows if t >= 16384 else args.test_rows for t in lengths}
        t0 = time.perf_counter()
        summary["depth_grid"] = test_grid(lm, args.depths, lengths, rows, out / "eval.json", args.device)
        summary["test_grid_seconds"] = sum(c["seconds"] for c in summary["depth_grid"])
        print(f"{key}: test grid {time.perf_counter() - t0:.0f} s this session", file=sys.stderr)
        return summary

    run_grid(name, vars(args), jobs, cell, pass_key=True)


if __name__ == "__main__":
    main()
