"""Forward time of all seven models, chunkwise vs token recurrence, and scaling exponents (issue 3 targets).

    flock /tmp/bsbr-cpu.lock env PYTHONPATH=src python benchmarks/bench_baselines.py

Models: hidden 256, 4 heads, 2 layers, ff 1024, batch 1, fp32, inference mode, 1 torch thread, registered
default options (BSBR chunk 128, Linear/DeltaNet chunk 64, window 128, Hopfield 1 update step, GAU group 256 / qk 128).
Writes benchmarks/results/baselines.json after every measurement and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bsbr.models import build_model, list_models  # noqa: E402
from common import environment, header, loglog_fit, time_fn, write_json  # noqa: E402

SHAPE = {"hidden_dim": 256, "num_heads": 4, "num_layers": 2, "ff_dim": 1024}
TARGETS = {"recurrence_speedup": 20.0, "exponent": 1.15}


def model(name: str):
    torch.manual_seed(0)
    return build_model(name, vocab_size=256, dropout=0.0, **SHAPE).eval()


def bench_models(names, lengths, results, save, min_time):
    table = results.setdefault("forward_ms", {})
    for name, T in tqdm([(n, t) for n in names for t in lengths], desc="forward"):
        m = model(name)
        ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.inference_mode():
            r = time_fn(lambda m=m, ids=ids: m(ids), min_time=min_time, min_runs=3)
        table.setdefault(name, {})[str(T)] = {k: (v * 1e3 if k != "runs" else v) for k, v in r.items()}
        results.setdefault("parameters", {})[name] = m.num_parameters()
        save()


def bench_recurrence(names, T, results, save):
    """One attention layer: the chunkwise parallel form against the token recurrence (the reference form)."""
    out = results.setdefault("chunkwise_vs_recurrence", {})
    for name in tqdm(names, desc=f"recurrence T={T}"):
        attn = model(name).blocks[0].attn
        x = torch.randn(1, T, SHAPE["hidden_dim"], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            fast = time_fn(lambda a=attn, x=x: a._parallel(x), min_time=1.0, min_runs=3)["median"]
            slow = time_fn(lambda a=attn, x=x: a._reference(x), min_time=0.0, min_runs=2)["median"]
        out[name] = {"T": T, "chunkwise_ms": fast * 1e3, "recurrence_ms": slow * 1e3, "speedup": slow / fast}
        save()


def summarise(results, lengths) -> list[str]:
    fw = results["forward_ms"]
    lines = ["| model | params | " + " | ".join(f"T={t} (ms)" for t in lengths) + " | exponent 4096->16384 |",
             "|---" * (len(lengths) + 3) + "|"]
    exps = {}
    for name, row in fw.items():
        pts = [t for t in (4096, 16384) if str(t) in row]
        if len(pts) == 2:
            exps[name] = loglog_fit(pts, [row[str(t)]["median"] for t in pts])["k"]
        cells = [f"{row[str(t)]['median']:.1f}" if str(t) in row else "-" for t in lengths]
        exp = f"{exps[name]:.2f}" if name in exps else "-"
        lines.append(f"| {name} | {results['parameters'][name]:,} | " + " | ".join(cells) + f" | {exp} |")
    results["exponents_4096_16384"] = exps
    checks = {}
    for name, r in results.get("chunkwise_vs_recurrence", {}).items():
        checks[f"{name} chunkwise >= 20x recurrence at T={r['T']}"] = (r["speedup"], r["speedup"] >= 20.0)
    for name in ("Linear", "DeltaNet", "SlidingWindow", "GAU"):
        if name in exps:
            checks[f"{name} exponent <= 1.15"] = (exps[name], exps[name] <= TARGETS["exponent"])
    if "SlidingWindow" in fw and "Standard" in fw:
        for t in lengths:
            if t >= 4096 and str(t) in fw["SlidingWindow"] and str(t) in fw["Standard"]:
                ratio = fw["Standard"][str(t)]["median"] / fw["SlidingWindow"][str(t)]["median"]
                checks[f"SlidingWindow faster than Standard at T={t} (Standard/SW)"] = (ratio, ratio > 1.0)
    results["targets"] = {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()}
    lines.append("")
    for name, r in results.get("chunkwise_vs_recurrence", {}).items():
        lines.append(f"- {name} at T={r['T']} (one layer): chunkwise {r['chunkwise_ms']:.1f} ms, token recurrence "
                     f"{r['recurrence_ms']:.0f} ms, speedup {r['speedup']:.1f}x")
    lines.append("")
    lines += [f"- {k}: {v:.2f} -> {'met' if ok else 'MISSED'}" for k, (v, ok) in checks.items()]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--models", nargs="+", default=list_models())
    p.add_argument("--recurrence-length", type=int, default=4096)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of repeated runs per forward timing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, oversubscribed machine OpenMP threads spin-wait and "
                        "make small matmuls up to 100x slower, which would distort the comparison)")
    p.add_argument("--out", default="baselines.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    results = {"environment": env, "shape": SHAPE, "batch": 1, "dtype": "float32", "command": " ".join(sys.argv)}
    save = lambda: write_json(args.out, results)  # noqa: E731
    print(header(env))
    bench_models(args.models, args.lengths, results, save, args.min_time)
    bench_recurrence([n for n in ("Linear", "DeltaNet") if n in args.models], args.recurrence_length, results, save)
    lines = summarise(results, args.lengths)
    save()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
