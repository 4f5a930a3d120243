"""``bsbr demo``: build a BSBR language model, stream a long input through its compact cache, and print the
measured prefill throughput, decode latency and cache size beside a KV cache of the same model size."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import _checks
from .models import build_model


def stdlib_bytes(n: int) -> torch.Tensor:
    """The first n bytes of the Python standard library's own source files (always on the machine)."""
    root = Path(json.__file__).resolve().parent.parent
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= n:
            break
    if len(data) < n:
        raise ValueError(f"tokens={n} is more than the {len(data)} bytes of standard-library source found")
    return torch.tensor(list(data[:n]), dtype=torch.long)[None]


def stream(lm, ids: torch.Tensor, piece: int, decode: int, desc: str) -> dict:
    """Prefill ``ids`` in pieces of ``piece`` tokens through a cache, then greedy-decode ``decode`` tokens."""
    cache = lm.new_cache(1)
    n = ids.shape[1]
    start = time.perf_counter()
    logits = None
    with tqdm(total=n, desc=f"{desc} prefill", unit="tok", leave=False, file=sys.stderr) as bar:
        for a in range(0, n, piece):
            logits = lm(ids[:, a : a + piece], cache=cache, use_cache=True).logits
            bar.update(min(piece, n - a))
    prefill = time.perf_counter() - start
    token = logits[:, -1].argmax(-1)
    latencies = []
    for _ in range(decode):
        t0 = time.perf_counter()
        logits = lm(token[:, None], cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1)
        latencies.append(time.perf_counter() - t0)
    latencies.sort()
    return {
        "prefill_tokens": n,
        "prefill_seconds": prefill,
        "prefill_tokens_per_second": n / prefill,
        "decode_tokens": decode,
        "decode_ms_median": 1e3 * latencies[len(latencies) // 2] if latencies else None,
        "cache_bytes": cache.state_nbytes(),
    }


def run_demo(tokens: int = 16384, piece: int = 1024, decode: int = 128, hidden_dim: int = 256,
             num_layers: int = 4, num_heads: int = 4, chunk_size: int = 128, compare_kv: bool = True,
             seed: int = 0) -> dict:
    """Measure BSBR streaming (and, with ``compare_kv``, a standard-attention model of the same size)."""
    for name, value in (("tokens", tokens), ("piece", piece), ("hidden_dim", hidden_dim),
                        ("num_layers", num_layers), ("num_heads", num_heads), ("chunk_size", chunk_size)):
        _checks.positive_int(name, value)
    _checks.non_negative_int("decode", decode)
    ids = stdlib_bytes(tokens)
    results = {"settings": {"tokens": tokens, "piece": piece, "decode": decode, "hidden_dim": hidden_dim,
                            "num_layers": num_layers, "num_heads": num_heads, "chunk_size": chunk_size,
                            "seed": seed, "dtype": "float32", "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "machine": platform.machine(),
                            "processor": platform.processor() or platform.machine()}}
    names = ["BSBR", "Standard"] if compare_kv else ["BSBR"]
    for name in names:
        torch.manual_seed(seed)
        opts = {"chunk_size": chunk_size} if name == "BSBR" else {}
        lm = build_model(name, vocab_size=256, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
                         ff_dim=4 * hidden_dim, dropout=0.0, causal_lm=True, **opts).eval()
        with torch.inference_mode():
            results[name] = {"parameters": lm.num_parameters(), **stream(lm, ids, piece, decode, name)}
    return results


def print_demo(results: dict) -> None:
    s = results["settings"]
    print(f"bsbr demo — {s['tokens']:,} bytes of standard-library source streamed in pieces of {s['piece']}, "
          f"then {s['decode']} decoded tokens")
    print(f"model: hidden {s['hidden_dim']}, {s['num_layers']} layers, {s['num_heads']} heads, chunk "
          f"{s['chunk_size']}, random weights, {s['dtype']}, {s['threads']} threads, torch {s['torch']}")
    header = f"{'model':10s} {'params':>10s} {'prefill tok/s':>14s} {'decode ms/tok':>14s} {'cache MiB':>10s}"
    print(header)
    print("-" * len(header))
    for name in ("BSBR", "Standard"):
        if name in results:
            r = results[name]
            print(f"{name:10s} {r['parameters']:>10,d} {r['prefill_tokens_per_second']:>14,.0f} "
                  f"{r['decode_ms_median'] or float('nan'):>14.2f} {r['cache_bytes'] / 2**20:>10.2f}")
    if "Standard" in results:
        ratio = results["Standard"]["cache_bytes"] / results["BSBR"]["cache_bytes"]
        print(f"BSBR's cache is {ratio:.1f}x smaller than the KV cache at {s['tokens']:,} tokens.")


def _cmd(args: argparse.Namespace) -> int:
    results = run_demo(tokens=args.tokens, piece=args.piece, decode=args.decode, hidden_dim=args.hidden_dim,
                       num_layers=args.num_layers, num_heads=args.num_heads, chunk_size=args.chunk_size,
                       compare_kv=not args.no_kv, seed=args.seed)
    print_demo(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="stream a long input through a BSBR model; print throughput and cache size",
                              description=__doc__)
    p.add_argument("--tokens", type=int, default=16384, help="input length (default 16384)")
    p.add_argument("--piece", type=int, default=1024, help="prefill piece length (default 1024)")
    p.add_argument("--decode", type=int, default=128, help="tokens to decode one at a time (default 128)")
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kv", action="store_true", help="skip the standard-attention (KV cache) comparison")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd)
