"""Where the DeltaNet chunkwise core spends its time: the library form against variants, side by side in one run.

    flock /tmp/bsbr-cpu.lock env PYTHONPATH=src python benchmarks/bench_deltanet_core.py

Same shape as bench_baselines.py's core comparison (T = 4,096, batch 1, 4 heads, head dim 64, chunk 64, fp32,
inference mode).  Variants, in interleaved rounds, each called twice in a row in its turn (both calls timed, the
second reported; see ``bench_baselines.interleaved``):

- ``library``: :func:`bsbr.ops.deltanet.delta_chunkwise` as inference runs it (UT transform on half-chunks,
  :func:`~bsbr.ops.deltanet.ut_transform`; the state loop in place, :func:`~bsbr.ops.deltanet.chunk_states`);
- ``one_solve``: the same with each chunk's UT transform from one C x C triangular solve;
- ``stacked_loop``: the same with the out-of-place state loop that autograd needs (and an out-of-place readout);
- ``previous``: both switched back: the library form up to commit 76ccc04;
- ``no_state_loop``: the library form with the recursion left out (its output is wrong: a lower bound that
  shows what the sequential steps cost);
- ``recurrence``: the token recurrence the target is stated against.

A probe then times the library right after itself, the recurrence, a 0.2 s sleep and a few large matmuls: the
first call after other work is slower whatever the other work was.  The four correct variants are checked
against the recurrence before timing.  Writes
benchmarks/results/deltanet_core.{json,md} (``--out`` another stem).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _process  # noqa: E402  (as in bench_baselines.py)

if __name__ == "__main__":
    _process.configure()

import torch  # noqa: E402

from bench_baselines import core_inputs, interleaved  # noqa: E402
from bsbr.ops.deltanet import (  # noqa: E402
    UT_LEAF,
    chunk_states,
    delta_chunk_terms,
    delta_chunkwise,
    delta_recurrent,
)
from common import RESULTS, environment, header, write_json  # noqa: E402


def chunkwise(q, k, v, beta, chunk, ut_leaf=UT_LEAF, in_place=True):
    """The library's chunkwise form from its parts, with either new part switchable back to the earlier one:
    ``ut_leaf=chunk`` solves each chunk's UT transform at once, ``in_place=False`` runs the out-of-place state
    loop (the one autograd needs) and an out-of-place readout."""
    (B, H, T, _), e = q.shape, v.shape[-1]
    q_eff, o_local, decay, writes = delta_chunk_terms(q, k, v, beta, chunk, ut_leaf)
    starts, _ = chunk_states(decay, writes, in_place=in_place)
    o = o_local.baddbmm_(q_eff, starts) if in_place else torch.baddbmm(o_local, q_eff, starts)
    return o.view(B, H, -1, e)[:, :, :T]


def no_state_loop(q, k, v, beta, chunk):
    """Library form without the recursion (wrong output; the time of everything else)."""
    (B, H, T, _), e = q.shape, v.shape[-1]
    q_eff, o_local, _, writes = delta_chunk_terms(q, k, v, beta, chunk)
    return o_local.baddbmm_(q_eff, writes.flatten(0, 1)).view(B, H, -1, e)[:, :, :T]


def first_call_probe(fn, recurrence, rounds: int) -> dict:
    """Time ``fn`` right after each of several other things, ``rounds`` times each (interleaved): what the first
    call after other work costs, and whether it is the token recurrence in particular that slows it."""
    a = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    before = {"itself (a repeated call)": fn, "the token recurrence": recurrence,
              "time.sleep(0.2)": lambda: time.sleep(0.2),
              "eight 2048^2 matmuls": lambda: [a @ a for _ in range(8)]}
    times = {name: [] for name in before}
    for _ in range(rounds):
        for name, other in before.items():
            other()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3} for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default="deltanet_core", help="results file stem under benchmarks/results/")
    p.add_argument("--probe-rounds", type=int, default=12, help="rounds of the first-call probe (0: skip it)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-thp", action="store_true", help="do not set THP_MEM_ALLOC_ENABLE=1")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    q, k, v, beta = core_inputs("DeltaNet", args.length)
    c = args.chunk
    variants = {"library": lambda: delta_chunkwise(q, k, v, beta, c)[0],
                "one_solve": lambda: chunkwise(q, k, v, beta, c, ut_leaf=c),
                "stacked_loop": lambda: chunkwise(q, k, v, beta, c, in_place=False),
                "previous": lambda: chunkwise(q, k, v, beta, c, ut_leaf=c, in_place=False),
                "no_state_loop": lambda: no_state_loop(q, k, v, beta, c),
                "recurrence": lambda: delta_recurrent(q, k, v, beta)[0]}
    env = environment()
    env.update(_process.describe())
    print(header(env))
    with torch.inference_mode():
        ref = variants["recurrence"]()
        for name in ("library", "one_solve", "stacked_loop", "previous"):
            err = (variants[name]() - ref).abs().max().item()
            if err > 1e-4:
                raise AssertionError(f"variant {name!r} differs from the token recurrence by {err:.3g}")
        timed = interleaved(list(variants.values()), args.rounds, repeat=True)
        probe = (first_call_probe(variants["library"], variants["recurrence"], args.probe_rounds)
                 if args.probe_rounds else {})
    rows = {name: {"median_ms": r["median"] * 1e3, "min_ms": r["min"] * 1e3,
                   "first_call_median_ms": r["first_call"]["median"] * 1e3,
                   "first_call_min_ms": r["first_call"]["min"] * 1e3}
            for name, r in zip(variants, timed, strict=True)}
    lib, rec = rows["library"]["median_ms"], rows["recurrence"]["median_ms"]
    results = {"environment": env, "T": args.length, "chunk": c, "rounds": args.rounds, "threads": args.threads,
               "shape": {"batch": 1, "heads": 4, "head_dim": 64}, "variants_ms": rows,
               "protocol": "interleaved rounds; each variant called twice in its turn, the second call timed "
                           "(the first kept as first_call)",
               "recurrence_over_library": rec / lib, "library_after": probe, "command": " ".join(sys.argv)}
    write_json(f"{args.out}.json", results)
    lines = [f"# DeltaNet chunkwise core at T={args.length}, chunk {c}: variants side by side", "",
             header(env) + f"; THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}; malloc: {env['malloc']}; "
             f"{args.rounds} interleaved rounds, "
             "each call repeated; command: `benchmarks/bench_deltanet_core.py`", "",
             "| variant | median ms | min ms | vs library (medians) | first call: median ms | min ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['median_ms'] / lib:.2f}x "
              f"| {r['first_call_median_ms']:.1f} | {r['first_call_min_ms']:.1f} |" for name, r in rows.items()]
    first = rows["recurrence"]["first_call_median_ms"] / rows["library"]["first_call_median_ms"]
    lines += ["", f"Token recurrence / library: {rec / lib:.1f}x (target 20x; first calls after the other variants: "
              f"{first:.1f}x). `no_state_loop` is not a result: it leaves the chunk-to-chunk recursion out to show "
              "its cost.",
              "", "Each variant is called twice in a row in its turn; the columns on the left time the second call "
              "(inputs and buffers in cache), the `first call` columns the one right after the other variants."]
    if probe:
        lines += ["", f"The library's time right after other work ({args.probe_rounds} interleaved rounds):", "",
                  "| called right after | median ms | min ms |", "|---|---|---|"]
        lines += [f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} |" for name, r in probe.items()]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
