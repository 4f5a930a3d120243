"""Block retrieval of tokens (``retrieval="blocks"``) against softmax attention, in the user's plain process.

Sections (JSON and Markdown to benchmarks/results/bench_blocks.{json,md}); every ratio is measured side by side in
interleaved rounds of one run (benchmarks/common.py ``interleaved``):

1. ``module`` — at T = 32,768 (batch 1, fp32, inference mode): ``BSBRAttention(512, 8, chunk 128,
   retrieval="blocks", top_k 4, sink_tokens 128)`` (the first chunk in view) against ``StandardAttention(512, 8)``
   (the same projections around ``scaled_dot_product_attention(is_causal=True)``), and the op alone
   (``blocks_parallel``) against SDPA causal on the same q, k, v.  Also the keys each query attends, as a share of
   causal attention's.
2. ``exponent`` — the module's forward at T = 4,096, 16,384 and 65,536: fastest of the rounds, log-log slope.
3. ``decode`` — a one-layer cache fed --long tokens in pieces, then single-token steps: latency per token at
   --short and --long tokens of context, interleaved.

Targets (issue 27): module >= 6x the SDPA module, op >= 12x SDPA causal, exponent <= 1.15, decode at 64k <= 1.5x
decode at 1k.

Run:  PYTHONPATH=src python benchmarks/bench_blocks.py          (about 5 minutes on 2 cores; --quick: T = 8,192)
      PYTHONPATH=src python benchmarks/bench_blocks.py --select chunk --tag chunk   (one selection per chunk)
      add --threads 1 where another process keeps one of the cores busy (two threads on one free core wait for each
      other at every parallel op: 3-30x slower elementwise ops, a measurement of the machine, not of the code)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bsbr.layers.bsbr import BSBRAttention  # noqa: E402
from bsbr.layers.standard import StandardAttention  # noqa: E402
from bsbr.ops.bsbr_blocks import BlockSpec, blocks_parallel  # noqa: E402
from common import environment, header, interleaved, loglog_fit, write_json  # noqa: E402

D, H, CHUNK, TOP_K = 512, 8, 128, 4
TARGETS = {"module_vs_sdpa_module": 6.0, "op_vs_sdpa": 12.0, "exponent": 1.15, "decode_long_over_short": 1.5}


SELECT = "token"  # --select: one selection per token, or per chunk (shared by the chunk's queries)


def blocks_module() -> BSBRAttention:
    torch.manual_seed(0)
    return BSBRAttention(D, H, CHUNK, dropout=0.0, retrieval="blocks", top_k=TOP_K, sink_tokens=CHUNK,
                         block_select=SELECT).eval()


def keys_share(T: int) -> float:
    """Keys a query attends (own chunk up to itself, the first chunk, top_k chunks), over causal attention's."""
    seen = 0
    for t in range(T):
        c = t // CHUNK
        seen += t % CHUNK + 1 + (CHUNK if c >= 1 else 0) + CHUNK * min(TOP_K, max(c - 1, 0))
    return seen / (T * (T + 1) / 2)


def module_section(T: int, rounds: int) -> dict:
    blocks, standard = blocks_module(), StandardAttention(D, H, dropout=0.0).eval()
    x = torch.randn(1, T, D)
    with torch.inference_mode():
        q, k, v = blocks.qkv(x, 0)
        spec = BlockSpec(chunk=CHUNK, top_k=TOP_K, sink=CHUNK, select=SELECT)
        fns = [lambda: blocks(x), lambda: standard(x), lambda: blocks_parallel(q, k, v, spec),
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)]
        for fn in fns:  # warm-up
            fn()
        t = interleaved(fns, rounds)
    names = ["blocks_module", "sdpa_module", "blocks_op", "sdpa_op"]
    res = {"T": T, "rounds": rounds, "keys_share": keys_share(T), **{n: r for n, r in zip(names, t, strict=True)}}
    res["module_vs_sdpa_module"] = t[1]["min"] / t[0]["min"]
    res["op_vs_sdpa"] = t[3]["min"] / t[2]["min"]
    return res


def exponent_section(lengths: list[int], rounds: int) -> dict:
    blocks = blocks_module()
    xs = {T: torch.randn(1, T, D) for T in lengths}
    with torch.inference_mode():
        fns = [lambda T=T: blocks(xs[T]) for T in lengths]
        for fn in fns:
            fn()
        t = interleaved(fns, rounds)
    seconds = [r["min"] for r in t]
    return {"lengths": lengths, "seconds": seconds, "fit": loglog_fit(lengths, seconds)}


def decode_section(short: int, long: int, steps: int, rounds: int) -> dict:
    blocks = blocks_module()
    caches, tokens = {}, torch.randn(1, steps * rounds + 8, D)
    with torch.inference_mode():
        for n in (short, long):
            caches[n] = blocks.new_cache(batch_size=1)
            for piece in torch.randn(1, n, D).split(4096, dim=1):
                blocks(piece, cache=caches[n])
        cursor = {short: 0, long: 0}

        def decode(n):
            for _ in range(steps):
                blocks(tokens[:, cursor[n] : cursor[n] + 1], cache=caches[n])
                cursor[n] += 1

        t = interleaved([lambda: decode(short), lambda: decode(long)], rounds)
    per = [r["min"] / steps for r in t]
    return {"short": short, "long": long, "steps": steps, "seconds_per_token": dict(zip(("short", "long"), per,
                                                                                          strict=True)),
            "decode_long_over_short": per[1] / per[0]}


def markdown(res: dict) -> str:
    m, e, dcd = res["module"], res["exponent"], res["decode"]
    ok = lambda good: "met" if good else "**missed**"  # noqa: E731
    lines = [f"# Block retrieval against softmax attention\n\n{header(res['environment'])}\n",
             f"Module and op at T = {m['T']:,} (D {D}, H {H}, chunk {CHUNK}, top_k {TOP_K}, first chunk in view, "
             f"one selection per {res['select']}; "
             f"each query attends {m['keys_share']:.3f} of causal attention's keys), fastest of {m['rounds']} "
             "interleaved rounds (median in brackets):\n",
             "| what | seconds | ratio | target |", "|---|---|---|---|"]
    for name, ratio in (("blocks_module", None), ("sdpa_module", "module_vs_sdpa_module"),
                       ("blocks_op", None), ("sdpa_op", "op_vs_sdpa")):
        r = m[name]
        cell = f"{m[ratio]:.1f}x" if ratio else ""
        goal = f">= {TARGETS[ratio]:.0f}x: {ok(m[ratio] >= TARGETS[ratio])}" if ratio else ""
        lines.append(f"| {name} | {r['min']:.3f} ({r['median']:.3f}) | {cell} | {goal} |")
    fit = e["fit"]
    lines += ["", f"Forward exponent of the module over T = {', '.join(f'{t:,}' for t in e['lengths'])}: "
              f"k = {fit['k']:.3f} (R^2 {fit['r2']:.3f}; seconds {', '.join(f'{s:.3f}' for s in e['seconds'])}); "
              f"target <= {TARGETS['exponent']}: {ok(fit['k'] <= TARGETS['exponent'])}.", "",
              f"Decode, one layer, per token: {dcd['seconds_per_token']['short'] * 1e3:.2f} ms at {dcd['short']:,} "
              f"tokens of context, {dcd['seconds_per_token']['long'] * 1e3:.2f} ms at {dcd['long']:,}: "
              f"{dcd['decode_long_over_short']:.2f}x; target <= {TARGETS['decode_long_over_short']}: "
              f"{ok(dcd['decode_long_over_short'] <= TARGETS['decode_long_over_short'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="T = 8,192 and shorter: a minute, for a first look")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default="", help="results go to bench_blocks_<tag>.{json,md}")
    p.add_argument("--select", choices=("token", "chunk"), default="token",
                   help="block_select of the module and op: per token (the default) or per chunk")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own); 1 where another process holds a core")
    args = p.parse_args()
    global SELECT
    SELECT = args.select
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    T = 8192 if args.quick else 32768
    lengths = [1024, 4096, 8192] if args.quick else [4096, 16384, 65536]
    long = 8192 if args.quick else 65536
    res = {"environment": environment(), "targets": TARGETS, "select": SELECT}
    print(header(res["environment"]), file=sys.stderr)
    res["module"] = module_section(T, args.rounds)
    print(f"module: {res['module']['module_vs_sdpa_module']:.1f}x, op {res['module']['op_vs_sdpa']:.1f}x",
          file=sys.stderr)
    res["exponent"] = exponent_section(lengths, args.rounds)
    print(f"exponent: {res['exponent']['fit']['k']:.3f}", file=sys.stderr)
    res["decode"] = decode_section(1024, long, steps=32, rounds=args.rounds)
    name = "bench_blocks" + (f"_{args.tag}" if args.tag else "")
    write_json(f"{name}.json", res)
    md = markdown(res)
    (Path(__file__).resolve().parent / "results" / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
