"""Per-token block retrieval's inference op with its selection scored in row groups (each group of query rows
against only the chunks it may select: ``bsbr.ops.bsbr_blocks_select.select_in_row_groups``, the default) against
the same op scoring every row against every chunk, side by side in interleaved rounds of one process.

    PYTHONPATH=src python benchmarks/bench_blocks_rows.py                      # T = 32,768 and 65,536, one thread
    PYTHONPATH=src python benchmarks/bench_blocks_rows.py --lengths 8192 --rounds 3

The setting is bench_blocks.py's (H 8, d 64, chunk 128, top_k 4, the first chunk in view, batch 1, fp32,
inference mode) on random q, k, v.  Both variants give the same output (checked: largest difference printed).
Writes benchmarks/results/bench_blocks_rows.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bsbr.ops.bsbr_blocks as blocks  # noqa: E402
from bsbr.ops.bsbr_blocks_select import scores, select  # noqa: E402
from common import write_with_command  # noqa: E402

H, D, CHUNK, TOP_K = 8, 64, 128, 4


def every_chunk(q, summaries, allowed, spec, first_chunk=0):
    """The selection before row groups: every row scored against every chunk."""
    idx, ok, _ = select(scores(q, summaries, spec), allowed, spec, inplace=True)
    return idx, ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_blocks_rows.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = blocks.BlockSpec(chunk=CHUNK, top_k=TOP_K, sink=CHUNK)
    grouped = blocks.select_in_row_groups
    rows = []
    for T in args.lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, T, D, generator=g) for _ in range(3))

        def run(selection, q=q, k=k, v=v):
            blocks.select_in_row_groups = selection
            try:
                return blocks.blocks_parallel(q, k, v, spec)[0]
            finally:
                blocks.select_in_row_groups = grouped

        with torch.inference_mode():
            diff = (run(every_chunk) - run(grouped)).abs().max().item()
            times = {"every chunk": [], "row groups": []}
            for r in range(args.rounds):
                order = [("every chunk", every_chunk), ("row groups", grouped)]
                for name, sel in order if r % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    run(sel)
                    times[name].append(time.perf_counter() - t0)
        row = {"T": T, "max_abs_difference": diff, "seconds": times,
               "fastest": {n: min(t) for n, t in times.items()}}
        row["speedup"] = row["fastest"]["every chunk"] / row["fastest"]["row groups"]
        rows.append(row)
        print(f"T {T:>6,d}: every chunk {row['fastest']['every chunk']:.3f} s, row groups "
              f"{row['fastest']['row groups']:.3f} s ({row['speedup']:.2f}x), largest difference {diff:g}", flush=True)
    write_with_command(args.out, "bench_blocks_rows.py", argv, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
