"""Decode cost of a converted model against the original with its KV cache, side by side in one run.

    PYTHONPATH=src python benchmarks/bench_convert_decode.py               # SmolLM2-135M, contexts 4k/16k/64k
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_convert_decode.py --lengths 2048 8192 32768 \
        --variants "blocks chunk 256 top-2" --out benchmarks/results/convert_decode_blocks.json

For each context length n the original decodes with a transformers DynamicCache holding n keys and values per
layer, and each BSBR variant with a BSBRHFCache holding the state a stream of n tokens leaves (n / chunk states
per key/value head, fewer with a retrieval window; under block retrieval every key and value and one summary per
complete chunk).  Caches at 16k and 64k are filled with random tensors of
exactly the sizes a prefill would leave (a 64k prefill of the original is quadratic: hours on this CPU); at 4k
both are also filled by a real prefill, and the two latencies are printed side by side to show the fill does not
matter.  Latency: the median of ``--steps`` single-token steps after two warm-up steps; BSBR's steps inside a
chunk reuse the chunk's retrieved mixture, and the step that opens a chunk (one retrieval over the states) is
timed separately and amortised over the chunk.  Cache bytes: every tensor the cache holds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bsbr.convert import BSBRHFCache, convert_to_bsbr, head_counts  # noqa: E402
from bsbr.convert.cache import BlocksRow, BSBRCacheLayer, StreamRow  # noqa: E402
from bsbr.convert.study.checkpoints import smollm2  # noqa: E402
from bsbr.ops.bsbr_blocks import summarize  # noqa: E402
from common import write_with_command  # noqa: E402

VARIANTS = {"blocks chunk 256 top-2": {"retrieval": "blocks", "top_k": 2},
            "blocks chunk 16 top-48, per query head": {"retrieval": "blocks", "chunk_size": 16, "top_k": 48,
                                                       "block_heads": "query"},
            "BSBR chunk 256": {"retrieval": "states"},
            "BSBR chunk 256, compression 4": {"retrieval": "states", "compression_factor": 4},
            "BSBR chunk 256, retrieval window 16": {"retrieval": "states", "retrieval_window": 16}}


def kv_cache(model, n: int, real_ids=None):
    from transformers import DynamicCache

    cache = DynamicCache()
    if real_ids is not None:
        model(real_ids, cache=cache, use_cache=True)
        return cache
    _, Hk, d = head_counts(model)
    g = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        cache.update(torch.randn(1, Hk, n, d, generator=g), torch.randn(1, Hk, n, d, generator=g), layer)
    return cache


def bsbr_cache(model, n: int, real_ids=None) -> BSBRHFCache:
    cache = BSBRHFCache()
    if real_ids is not None:
        for piece in real_ids.split(2048, dim=1):
            model(piece, cache=cache, use_cache=True)
        return cache
    H, Hk, d = head_counts(model)
    meta = model.model.layers[0].self_attn.bsbr
    if meta.uses_blocks:  # every key and value, one summary per complete chunk (room for 1,024 more tokens)
        g = torch.Generator().manual_seed(0)
        ch = meta.chunk_size
        Hk = H if meta.block_heads == "query" else Hk  # per query head: the cache holds every query head's keys
        for _ in range(model.config.num_hidden_layers):
            layer = BSBRCacheLayer()
            layer.lazy_initialization(torch.zeros(1, 1, 1, 1), None)
            k, v = torch.randn(1, Hk, n + 1024, d, generator=g), torch.randn(1, Hk, n + 1024, d, generator=g)
            summ = summarize(k[:, :, : n // ch * ch].unflatten(2, (n // ch, ch)), meta.block_summary)
            layer.rows = [BlocksRow(k, v, summ, length=n)]
            layer.seen = n
            cache.layers.append(layer)
        return cache
    ch, W = meta.chunk_size, meta.retrieval_window
    done = n // ch
    kept = done if W is None else min(done, W)
    m = d * d if meta.compression_factor is None else d * d // meta.compression_factor
    g = torch.Generator().manual_seed(0)
    tail = n - done * ch
    for _ in range(model.config.num_hidden_layers):
        layer = BSBRCacheLayer()
        layer.lazy_initialization(torch.zeros(1, 1, 1, 1), None)
        layer.rows = [StreamRow(states=torch.randn(1, Hk, kept, m, generator=g) * 0.01,
                                keys=torch.randn(1, Hk, kept, d, generator=g),
                                open_k=torch.randn(1, Hk, tail, d, generator=g),
                                open_v=torch.randn(1, Hk, tail, d, generator=g), done=done,
                                open_query=torch.randn(1, H, d, generator=g) if tail else None,
                                open_mixture=torch.randn(1, H, d, d, generator=g) * 0.01 if tail else None)]
        layer.seen = n
        cache.layers.append(layer)
    return cache


def kv_nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.inference_mode()
def decode_times(model, cache, n: int, steps: int) -> list[float]:
    tok = torch.tensor([[1]])
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        model(tok, cache=cache, use_cache=True, position_ids=torch.tensor([[n + i]]))
        times.append(time.perf_counter() - t0)
    return times[2:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_decode.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    original, _ = smollm2(ROOT / "runs" / "models" / "smollm2-135m")
    variants = {name: convert_to_bsbr(__import__("copy").deepcopy(original), **{"chunk_size": 256, **opts}).eval()
                for name, opts in VARIANTS.items() if name in args.variants}
    rows = []
    with torch.inference_mode():
        for n in args.lengths:
            real = [False, True] if n <= 4096 else [False]
            for filled in real:
                ids = torch.randint(0, original.config.vocab_size, (1, n)) if filled else None
                row = {"context": n, "fill": "prefill" if filled else "random"}
                cache = kv_cache(original, n, ids)
                t = decode_times(original, cache, n, args.steps)
                row["original"] = {"ms_per_token": 1e3 * statistics.median(t), "cache_bytes": kv_nbytes(cache)}
                del cache
                for name, model in variants.items():
                    cache = bsbr_cache(model, n, ids)
                    nbytes = cache.nbytes()
                    n0 = cache.get_seq_length()
                    ch = model.model.layers[0].self_attn.bsbr.chunk_size
                    # steps until the next chunk boundary are inside the open chunk; time those, then the opener
                    t = decode_times(model, cache, n0, args.steps)
                    to_open = (-cache.get_seq_length()) % ch
                    for _ in range(to_open):
                        model(torch.tensor([[1]]), cache=cache, use_cache=True,
                              position_ids=torch.tensor([[cache.get_seq_length()]]))
                    t0 = time.perf_counter()
                    model(torch.tensor([[1]]), cache=cache, use_cache=True,
                          position_ids=torch.tensor([[cache.get_seq_length()]]))
                    opener = time.perf_counter() - t0
                    step = statistics.median(t)
                    row[name] = {"ms_per_token": 1e3 * step, "ms_chunk_opening_step": 1e3 * opener,
                                 "ms_per_token_amortised": 1e3 * (step * (ch - 1) + opener) / ch,
                                 "cache_bytes": nbytes}
                    del cache
                rows.append(row)
                orig = row["original"]
                line = (f"context {n:>6,d} ({row['fill']:7s}) original {orig['ms_per_token']:7.1f} ms/token "
                        f"{orig['cache_bytes'] / 2**20:8.1f} MiB")
                for name in variants:
                    r = row[name]
                    line += (f" | {name}: {r['ms_per_token_amortised']:6.1f} ms/token, "
                             f"{r['cache_bytes'] / 2**20:7.1f} MiB ({orig['cache_bytes'] / r['cache_bytes']:.1f}x)")
                print(line, flush=True)
    write_with_command(args.out, "bench_convert_decode.py", None, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
