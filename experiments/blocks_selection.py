"""Does block retrieval pick the right chunk?  A trained BSBRBlocks MQAR run, read back from its checkpoint.

For every scored query of the MQAR test split (the query key sits just before the scored answer, and the pair's
key ``distance`` tokens before the query), this counts, per
layer and head, how often the chunk holding that key is among the chunks the query attends (selected, its own, or
in view), and the model's accuracy on the queries whose chunk layer 2 found against those it missed.  It tells a
selection that fails from an attention that fails with the right chunk in view.

    PYTHONPATH=src python experiments/blocks_selection.py runs/experiments/recall_curriculum_blocks_grad_none/<cell>

``--summary``, ``--top-k`` and ``--chunk-size`` read the same weights with other selection settings; with
``--batches 8 --batch-size 128`` the rows are those of the grid's test accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import bsbr.ops.bsbr_blocks as blocks
from bsbr.models import CausalLM, ModelConfig
from bsbr.tasks import get_task
from bsbr.train.checkpoint import load_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a grid cell's run directory (config.json, checkpoint/)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--summary", choices=blocks.SUMMARIES, help="score with this summary instead of the trained one")
    p.add_argument("--top-k", type=int, help="select this many chunks instead of the trained number")
    p.add_argument("--chunk-size", type=int, help="chunk the test rows this finely instead of the trained chunk (the "
                   "chunk is no weight: a model trained with every chunk in view can be read at any chunk)")
    args = p.parse_args()
    config = json.loads((args.run / "config.json").read_text())
    overrides = {"block_summary": args.summary, "top_k": args.top_k, "chunk_size": args.chunk_size}
    config["model"]["attention_kwargs"].update({k: v for k, v in overrides.items() if v is not None})
    model = CausalLM(ModelConfig.from_dict(config["model"])).eval()
    state = load_checkpoint(args.run / "checkpoint", model, None, training_state=False)
    task_opts = {k: v for k, v in config["task"].items() if k not in ("name", "curriculum")}
    task = get_task(config["task"]["name"], **task_opts)
    ch = config["model"]["attention_kwargs"]["chunk_size"]

    r = measure(model, task, ch, config["model"]["attention_kwargs"].get("sink_tokens", 0),
                config["model"]["num_layers"], args.batches, args.batch_size)
    opts = config["model"]["attention_kwargs"]
    print(describe(f"{args.run.name} (step {state.get('step')})", ch, opts["top_k"], opts.get("block_summary", "mean"),
                   r))


def measure(model, task, ch: int, spec_sink: int, layers: int, batches: int, batch_size: int) -> dict:
    """Accuracy and, per layer, the share of scored test queries with the queried key's chunk in view (selected,
    own or always visible), and accuracy split by whether the last layer had it in view."""
    picks: list[tuple] = []
    original, original_rows = blocks.select, blocks.select_in_row_groups

    def recording(*args, **kwargs):  # the selection of the explicit path and of grad != "none"
        out = original(*args, **kwargs)
        picks.append((out[0], out[1]))
        return out

    def recording_rows(*args, **kwargs):  # the inference path's selection (grad "none", per token)
        out = original_rows(*args, **kwargs)
        picks.append(out)
        return out

    blocks.select, blocks.select_in_row_groups = recording, recording_rows
    hits = torch.zeros(layers)
    found_right = found_total = missed_right = missed_total = total = 0
    try:
        with torch.no_grad():
            for i in range(batches):
                picks.clear()
                batch = task.batch("test", batch_size, i)
                logits = model(batch.input_ids).logits
                scored = batch.labels != -100  # [B, T]
                b_idx, a_idx = scored.nonzero(as_tuple=True)  # the answer's position; the query key is just before
                t_idx = a_idx - 1
                key_pos = t_idx - batch.meta["distance"][b_idx, a_idx]
                key_chunk, own_chunk = key_pos // ch, t_idx // ch
                right = logits.argmax(-1)[b_idx, t_idx] == batch.labels[b_idx, a_idx]
                seen_by_layer = []
                if not picks:  # top_k covers every earlier chunk: the layers take the dense route, select nothing
                    seen_by_layer = [torch.ones_like(right)] * layers
                    hits += right.numel()
                for layer, (idx, ok) in enumerate(picks):  # idx, ok [B, Hk, T, K]; a head sees the chunk it picked
                    chosen = ((idx[b_idx, :, t_idx] == key_chunk[:, None, None]) & ok[b_idx, :, t_idx]).any(-1)
                    free = (key_chunk == own_chunk) | ((key_pos < spec_sink) & (own_chunk >= 1))
                    seen = chosen.any(-1) | free
                    hits[layer] += seen.float().sum()
                    seen_by_layer.append(seen)
                last = seen_by_layer[-1]
                found_right += int((right & last).sum())
                found_total += int(last.sum())
                missed_right += int((right & ~last).sum())
                missed_total += int((~last).sum())
                total += int(scored.sum())
    finally:
        blocks.select, blocks.select_in_row_groups = original, original_rows
    return {"total": total, "accuracy": (found_right + missed_right) / max(total, 1),
            "in_view": [float(h) / max(total, 1) for h in hits], "found": found_total, "missed": missed_total,
            "accuracy_found": found_right / max(found_total, 1), "accuracy_missed": missed_right / max(missed_total, 1)}


def describe(name: str, ch: int, top_k: int, summary: str, r: dict) -> str:
    """The lines :func:`main` prints for one reading."""
    lines = [f"{name}: {r['total']} scored queries, chunk {ch}, top_k {top_k}, summary {summary}: accuracy "
             f"{r['accuracy']:.3f}"]
    lines += [f"  layer {i + 1}: the queried key's chunk in view for {h:.3f} of queries"
              for i, h in enumerate(r["in_view"])]
    lines.append(f"  accuracy where layer {len(r['in_view'])} sees the key's chunk: {r['accuracy_found']:.3f} "
                 f"({r['found']} queries); where it does not: {r['accuracy_missed']:.3f} ({r['missed']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
