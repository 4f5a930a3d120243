"""Where the DeltaNet chunkwise core spends its time: the library form against variants, side by side in one run.

    flock /tmp/bsbr-cpu.lock env PYTHONPATH=src python benchmarks/bench_deltanet_core.py

Same shape as bench_baselines.py's core comparison (T = 4,096, batch 1, 4 heads, head dim 64, chunk 64, fp32,
inference mode).  Variants, each timed once per round, the order rotating from round to round:

- ``library``: :func:`bsbr.layers.deltanet.delta_chunkwise` (T from one solve of X L = diag(beta), then products);
- ``solve_rhs``: the earlier form, one triangular solve against [beta K | beta V] for W and U directly;
- ``pair_scan``: the library form with the chunk-to-chunk recursion run as one level of a pairwise scan
  (half the sequential steps, three extra batched products);
- ``no_state_loop``: the library form with the recursion left out (its output is wrong: a lower bound that
  shows what the 64 sequential steps cost);
- ``recurrence``: the token recurrence the target is stated against.

The three correct variants are checked against the recurrence before timing.  Writes
benchmarks/results/deltanet_core.{json,md}.
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

from bench_baselines import core_inputs  # noqa: E402
from bsbr.layers.deltanet import delta_chunk_terms, delta_chunkwise, delta_recurrent  # noqa: E402
from bsbr.layers.linear import pad_to_chunks  # noqa: E402
from common import RESULTS, environment, header, write_json  # noqa: E402


def _read_out(q_eff, o_local, starts, q, v):
    """O = q_eff S + o_local per chunk, back to [B, H, T, e] (as in the library)."""
    (B, H, T, _), e = q.shape, v.shape[-1]
    return torch.baddbmm(o_local, q_eff, starts.reshape(-1, *starts.shape[-2:])).view(B, H, -1, e)[:, :, :T]


def pair_scan(q, k, v, beta, chunk):
    """Library form, recursion as one level of a pairwise scan: combine chunks (2i, 2i+1), loop over the pairs,
    then fill in the odd chunks' start states in one batched product."""
    q_eff, o_local, decay, writes = delta_chunk_terms(q, k, v, beta, chunk)
    BH, N, d, e = writes.shape
    if N % 2:  # pad with an identity step
        decay = torch.cat([decay, torch.eye(d, dtype=q.dtype).expand(BH, 1, d, d)], 1)
        writes = torch.cat([writes, writes.new_zeros(BH, 1, d, e)], 1)
    de, do, we, wo = decay[:, 0::2], decay[:, 1::2], writes[:, 0::2], writes[:, 1::2]
    d2 = do @ de
    w2 = torch.baddbmm(wo.flatten(0, 1), do.flatten(0, 1), we.flatten(0, 1)).view_as(wo)
    S, even = q.new_zeros(BH, d, e), []
    for n in range(d2.shape[1]):
        even.append(S)
        S = torch.baddbmm(w2[:, n], d2[:, n], S)
    even = torch.stack(even, 1)
    odd = torch.baddbmm(we.flatten(0, 1), de.flatten(0, 1), even.flatten(0, 1)).view_as(even)
    starts = torch.stack([even, odd], 2).flatten(1, 2)[:, :N]
    return _read_out(q_eff, o_local, starts, q, v)


def no_state_loop(q, k, v, beta, chunk):
    """Library form without the recursion (wrong output; the time of everything else)."""
    q_eff, o_local, _, writes = delta_chunk_terms(q, k, v, beta, chunk)
    return _read_out(q_eff, o_local, writes, q, v)


def solve_rhs(q, k, v, beta, chunk):
    """The earlier form: W and U from one solve against [beta K | beta V] (L = I + tril(diag(beta) K K^T, -1))."""
    qc, kc, vc = (pad_to_chunks(t, chunk) for t in (q, k, v))
    bc = pad_to_chunks(beta[..., None], chunk)
    system = torch.eye(chunk, dtype=q.dtype) + (bc * (kc @ kc.mT)).tril(-1)
    sol = torch.linalg.solve_triangular(system, bc * torch.cat([kc, vc], -1), upper=False, unitriangular=True)
    w, u = sol.split([k.shape[-1], v.shape[-1]], -1)
    local = (qc @ kc.mT).tril()
    q_eff, o_local = qc - local @ w, local @ u
    decay = (torch.eye(k.shape[-1], dtype=q.dtype) - kc.mT @ w).flatten(0, 1)
    writes = (kc.mT @ u).flatten(0, 1)
    B, H, N = qc.shape[:3]
    S, starts = q.new_zeros(B * H, k.shape[-1], v.shape[-1]), []
    for n in range(N):
        starts.append(S)
        S = torch.baddbmm(writes[:, n], decay[:, n], S)
    starts = torch.stack(starts, 1).view(B, H, N, k.shape[-1], v.shape[-1])
    return (q_eff @ starts + o_local).flatten(2, 3)[:, :, :q.shape[2]]


def rotated_rounds(fns: dict, rounds: int) -> dict:
    """Time every fn once per round; the order rotates from round to round, so that no variant always runs right
    after the token recurrence (which leaves the caches and the allocator cold for whatever follows it)."""
    names, times = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3} for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-thp", action="store_true", help="do not set THP_MEM_ALLOC_ENABLE=1")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    q, k, v, beta = core_inputs("DeltaNet", args.length)
    c = args.chunk
    variants = {"library": lambda: delta_chunkwise(q, k, v, beta, c)[0],
                "solve_rhs": lambda: solve_rhs(q, k, v, beta, c),
                "pair_scan": lambda: pair_scan(q, k, v, beta, c),
                "no_state_loop": lambda: no_state_loop(q, k, v, beta, c),
                "recurrence": lambda: delta_recurrent(q, k, v, beta)[0]}
    env = environment()
    env.update(_process.describe())
    print(header(env))
    with torch.inference_mode():
        ref = variants["recurrence"]()
        for name in ("library", "solve_rhs", "pair_scan"):
            err = (variants[name]() - ref).abs().max().item()
            if err > 1e-4:
                raise AssertionError(f"variant {name!r} differs from the token recurrence by {err:.3g}")
        rows = rotated_rounds(variants, args.rounds)
    lib, rec = rows["library"]["median_ms"], rows["recurrence"]["median_ms"]
    results = {"environment": env, "T": args.length, "chunk": c, "rounds": args.rounds, "threads": args.threads,
               "shape": {"batch": 1, "heads": 4, "head_dim": 64}, "variants_ms": rows,
               "recurrence_over_library": rec / lib, "command": " ".join(sys.argv)}
    write_json("deltanet_core.json", results)
    lines = [f"# DeltaNet chunkwise core at T={args.length}, chunk {c}: variants side by side", "",
             header(env) + f"; THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}; malloc: {env['malloc']}; "
             f"{args.rounds} rounds, "
             "order rotating; command: `benchmarks/bench_deltanet_core.py`", "",
             "| variant | median ms | min ms | vs library (medians) |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['median_ms'] / lib:.2f}x |"
              for name, r in rows.items()]
    lines += ["", f"Token recurrence / library: {rec / lib:.1f}x (target 20x). `no_state_loop` is not a result: "
              "it leaves the chunk-to-chunk recursion out to show its cost."]
    (RESULTS / "deltanet_core.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
