"""Can the indexer select, given the attention it serves?  A diagnostic, not a result of the seven's budget.

A trained BSBRBlocks MQAR run with an indexer (``indexer_dim``) is read back from its checkpoint; every weight but
the indexers' is frozen, and the indexers alone are trained further by the selection's distillation loss
(``selection_grad="distill"``: the cross-entropy from dense attention's weight per candidate chunk to the softmax of
the indexer's chunk scores) on fresh training rows at the run's final length.  The selection is read on the grid's
test rows before and after (``experiments/blocks_selection.py``'s counts): the share of queries whose layer has
the queried key's chunk in view, and the accuracy.  If the share rises to ~1 the indexer has the capacity and
the run's budget was what it lacked; if it stays, the indexer's form is what limits.

With ``--all-weights`` every weight trains instead, by the task's loss (the indexers still by theirs), with the
selection in place: the run's ``train_top_k`` is cleared, so training sees the top_k chunks that test sees.  For a
run trained with every chunk in view this asks whether a short sparse stage recovers what the sparse view loses (the
steps are beyond the grid's budget: a diagnostic, not a result).

    PYTHONPATH=src python experiments/indexer_probe.py runs/experiments/recall_curriculum_blocks_indexer/<cell>

The run's checkpoint is not changed.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from blocks_selection import describe, measure
from tqdm import tqdm

import bsbr.layers.bsbr_blocks as layer_blocks
from bsbr.models import CausalLM, ModelConfig
from bsbr.tasks import get_task
from bsbr.train.checkpoint import load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a grid cell's run directory (config.json, checkpoint/) with an indexer")
    p.add_argument("--steps", type=int, default=300, help="indexer-only training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rows", type=int, default=0, help="query rows the loss takes per layer call (0: every row)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--report-every", type=int, default=100)
    p.add_argument("--block-summary", default=None,
                   help="score the chunks by this summary instead of the run's (e.g. tokens: the log-sum-exp of "
                        "the indexer's token scores); the indexer's weights carry over, the loss follows it")
    p.add_argument("--all-weights", action="store_true",
                   help="train every weight by the task's loss with the selection in place (train_top_k cleared)")
    args = p.parse_args()
    for name in ("steps", "batch_size", "eval_batches", "eval_batch_size", "report_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    config = json.loads((args.run / "config.json").read_text())
    opts = config["model"]["attention_kwargs"]
    if not opts.get("indexer_dim"):
        p.error(f"{args.run} has no indexer (attention_kwargs: {opts}); train one with --indexer-dim")
    if args.block_summary is not None:
        opts["block_summary"] = args.block_summary
    if args.all_weights:
        opts.pop("train_top_k", None)  # training selects top_k, as test does
    model = CausalLM(ModelConfig.from_dict(config["model"]))
    state = load_checkpoint(args.run / "checkpoint", model, None, training_state=False)
    task = get_task(config["task"]["name"], **{k: v for k, v in config["task"].items()
                                                if k not in ("name", "curriculum")})
    ch, layers = opts["chunk_size"], config["model"]["num_layers"]

    def read(label: str) -> None:
        model.eval()
        r = measure(model, task, ch, opts.get("sink_tokens", 0), layers, args.eval_batches, args.eval_batch_size)
        print(describe(f"{args.run.name} (step {state.get('step')}) {label}", ch, opts["top_k"],
                       opts.get("block_summary", "mean"), r), flush=True)

    read("as trained")
    trained = [prm for n, prm in model.named_parameters() if args.all_weights or ".indexer." in n]
    for n, prm in model.named_parameters():
        prm.requires_grad_(args.all_weights or ".indexer." in n)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    what = "all-weight steps at top_k" if args.all_weights else "indexer-only steps"
    # the layer adds the loss through its output (bsbr.ops.bsbr_blocks.add_loss); here over --rows query rows
    original = layer_blocks.selection_distill_loss
    layer_blocks.selection_distill_loss = functools.partial(original, rows=args.rows or None)
    try:
        for step in tqdm(range(1, args.steps + 1), desc=what):
            model.train()
            batch = task.batch("train", args.batch_size, 10**6 + step)  # rows the run never trained on
            optimizer.zero_grad(set_to_none=True)
            if args.all_weights:
                model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
            else:
                logits = model(batch.input_ids).logits
                (logits.sum() * 0.0).backward()  # only the distillation losses carried by the layers' outputs count
            optimizer.step()
            if step % args.report_every == 0 or step == args.steps:
                read(f"+ {step} {what} (rows {args.rows or 'all'}, lr {args.lr}, batch {args.batch_size})")
    finally:
        layer_blocks.selection_distill_loss = original


if __name__ == "__main__":
    main()
