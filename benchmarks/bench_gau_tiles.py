"""GAU's mixed chunk attention on sequences shorter than a group: one T x T tile against padding up to g.

Until 2026-12-04 ``bsbr.ops.gau.gau_mixed`` padded every segment to a whole number of groups, so a row of
T < g tokens was computed as g x g products.  Here both forms run side by side in alternating rounds: the op as
it is (one T x T tile) and the op on the same inputs padded with zeros to g tokens, which is exactly what the
padded version computed (padded keys sit after every real query, so the causal mask removes them; the output
is sliced back to T rows).  Forward and backward of the op at the GAU layer's shapes (qk_dim s, expansion e).

    PYTHONPATH=src python benchmarks/bench_gau_tiles.py           # writes results/gau_tiles.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bsbr.ops.gau import gau_mixed
from common import environment, header, write_json


def step_fn(inputs, group: int, pad_to: int):
    """Forward + backward of gau_mixed on ``inputs`` zero-padded to ``pad_to`` tokens (output sliced to T)."""
    T = inputs[0].shape[1]

    def step():
        xs = [t.detach().requires_grad_() for t in inputs]
        padded = [F.pad(t, (0, 0, 0, pad_to - T)) for t in xs]
        out = gau_mixed(*padded, group)[0][:, :T]
        out.square().sum().backward()
        return out
    return step


def measure(T: int, group: int, batch: int, s: int, e: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(T)
    inputs = [torch.randn(batch, T, s, generator=g) * 0.5 for _ in range(4)] + [torch.randn(batch, T, e, generator=g)]
    tiled, padded = step_fn(inputs, group, T), step_fn(inputs, group, -(-T // group) * group)
    torch.testing.assert_close(tiled(), padded(), rtol=1e-4, atol=1e-5)  # the same values either way
    times = {"tiled": [], "padded": []}
    for _ in range(rounds):
        for key, fn in (("tiled", tiled), ("padded", padded)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    row = {"T": T, "group": group}
    for key, ts in times.items():
        row[f"{key}_min_s"], row[f"{key}_median_s"] = min(ts), statistics.median(ts)
    row["speedup_min"] = row["padded_min_s"] / row["tiled_min_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--group-size", type=int, default=256, help="g (the layer's default)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--qk-dim", type=int, default=128, help="s (the layer's default)")
    p.add_argument("--expansion-dim", type=int, default=128, help="e (2 x hidden 64, as in the MQAR runs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="gau_tiles", help="results/<out>.json and .md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    rows = []
    for T in args.lengths:
        row = measure(T, args.group_size, args.batch_size, args.qk_dim, args.expansion_dim, args.rounds)
        rows.append(row)
        print(f"T={T:>5} g={args.group_size}: tiled {row['tiled_min_s']:.4f} s, padded {row['padded_min_s']:.4f} s "
              f"-> {row['speedup_min']:.2f}x", flush=True)
    lines = ["# GAU mixed chunk attention below one group: one T x T tile vs padding to g", "", header(env), "",
             f"Forward + backward of `gau_mixed`, batch {args.batch_size}, qk_dim {args.qk_dim}, expansion "
             f"{args.expansion_dim}, group {args.group_size}; {args.rounds} alternating rounds after a check that "
             "both give the same output; seconds (min / median).", "",
             "| T | tiled (now) | padded to g (before 2026-12-04) | speed-up (min) |", "|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['tiled_min_s']:.4f} / {r['tiled_median_s']:.4f} | {r['padded_min_s']:.4f} / "
              f"{r['padded_median_s']:.4f} | {r['speedup_min']:.2f}x |" for r in rows]
    path = write_json(f"{args.out}.json", {"environment": env, "config": vars(args), "rows": rows})
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
