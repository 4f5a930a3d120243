"""Is a GAU run's attention silent?  Row sums of its attention matrix A, at initialisation and after training.

GAU's in-group weights are relu(q . k / sqrt(s))^2 / g (:mod:`bsbr.ops.gau`), so a row of A can be all zeros and
the attention then passes nothing.  For each GAU run directory (what ``experiments/recall_curriculum.py`` leaves in
runs/), this rebuilds the run's model twice, as initialised (the run's seed) and from its last checkpoint, feeds
test rows of MQAR at ``--seq-len`` (one group, so A is only the relu^2 part), and records per layer the median and
largest row sum of A and the share of causal weights above zero.  The MQAR of record (issue 14, tag bs128):

    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/gau_rows.py --tag bs128

needs the bs128 GAU cells' run directories (the recall_curriculum.py bs128 command makes them; runs/ is not in
git).  Results go to results/gau_rows_<tag>.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _exp import RESULTS, RUNS

from bsbr.layers.gau import GAUAttention
from bsbr.tasks import get_task
from bsbr.train.checkpoint import load_checkpoint
from bsbr.train.cli import build_run, spec_from_run


def row_stats(lm: torch.nn.Module, input_ids: torch.Tensor) -> list[dict]:
    """Per GAU layer (in order): median and max row sum of A over [B, T] rows, and the share of causal weights > 0."""
    caught = []
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs: caught.append((m, args[0])), with_kwargs=True)
             for m in lm.modules() if isinstance(m, GAUAttention)]
    try:
        with torch.no_grad():
            lm(input_ids)
            out = []
            for layer, x in caught:
                A = layer._attention_weights(x)[:, 0].float()  # [B, T, T], zero above the diagonal
                causal = torch.ones(A.shape[-1], A.shape[-1], dtype=torch.bool).tril()
                rows = A.sum(-1)
                out.append({"row_sum_median": rows.median().item(), "row_sum_max": rows.max().item(),
                            "share_positive": (A[:, causal] > 0).float().mean().item()})
    finally:
        for h in hooks:
            h.remove()
    return out


def probe(run: Path, seq_len: int, rows: int, accuracy: float | None = None) -> dict:
    """Row statistics of run directory ``run``'s model at initialisation and at its last checkpoint."""
    spec = spec_from_run(run)
    if spec["model"]["name"] != "GAU":
        raise ValueError(f"--runs {run}: is a {spec['model']['name']} run, expected GAU")
    spec["train"].pop("out_dir")
    final_task = spec["task"]
    spec["task"] = {k: v for k, v in final_task.items() if k != "curriculum"}  # the model does not depend on it
    task = get_task("mqar", seq_len=seq_len, num_kv_pairs=max(1, seq_len // 16), seed=final_task.get("seed", 0),
                    vocab_size=final_task["vocab_size"], random_filler=final_task.get("random_filler", True))
    ids = task.batch("test", rows, 0).input_ids
    out = {"run": run.name, "seed": spec["train"]["seed"], "test_accuracy": accuracy}
    for which in ("init", "final"):
        _, lm, _ = build_run(spec)  # seeded by the run's seed: its initial weights
        if which == "final":
            load_checkpoint(run / "checkpoint", lm, None, training_state=False)
        lm.eval()
        out[which] = row_stats(lm, ids)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", default="bs128", help="reads runs/experiments/recall_curriculum_<tag>/GAU_* ('' for "
                                                   "the untagged grid)")
    p.add_argument("--runs", nargs="+", type=Path, help="run directories (default: the tag's GAU cells)")
    p.add_argument("--seq-len", type=int, default=64, help="MQAR row length fed to the model (pairs = T / 16)")
    p.add_argument("--rows", type=int, default=64, help="test rows")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    name = "recall_curriculum" + (f"_{args.tag}" if args.tag else "")
    runs = args.runs or sorted((RUNS / name).glob("GAU_*"))
    missing = [str(r) for r in runs if not (Path(r) / "checkpoint").is_dir()]
    if args.rows < 1 or args.seq_len < 16:
        p.error(f"--rows must be >= 1 and --seq-len >= 16 (pairs = T / 16), got {args.rows} and {args.seq_len}")
    if not runs or missing:
        print(f"no GAU run with a checkpoint to read (--tag {args.tag!r}; missing: {missing or 'all'}); make them with "
              "experiments/recall_curriculum.py first", file=sys.stderr)
        return 2
    recorded = RESULTS / f"{name}.json"  # the cells' test accuracy, by cell name
    cells = json.loads(recorded.read_text())["runs"] if recorded.exists() else {}
    accuracy = {key.replace("|", "_"): run["test"]["accuracy"] for key, run in cells.items()}
    found = [probe(Path(r), args.seq_len, args.rows, accuracy.get(Path(r).name)) for r in runs]
    out = RESULTS / f"gau_rows{f'_{args.tag}' if args.tag else ''}.json"
    out.write_text(json.dumps({"seq_len": args.seq_len, "rows": args.rows, "probes": found}, indent=1) + "\n")
    print("seed | test acc | when  | per layer: median row sum / max row sum / share of causal weights > 0")
    for r in found:
        for which in ("init", "final"):
            layers = "  |  ".join(f"{x['row_sum_median']:.1e} / {x['row_sum_max']:.1e} / {x['share_positive']:.3f}"
                                  for x in r[which])
            acc = f"{r['test_accuracy']:.3f}" if r["test_accuracy"] is not None else "-"
            print(f"{r['seed']:4d} | {acc:>8s} | {which:5s} | {layers}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
