"""``bsbr compare``, ``bsbr scaling``, ``bsbr analyze RESULTS``, ``bsbr report RESULTS``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .analysis import analyze_results
from .compare import compare_models, scaling_analysis
from .report import write_report

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192]


def _common(p: argparse.ArgumentParser, lengths, metrics, choices) -> None:
    p.add_argument("--lengths", type=int, nargs="+", default=lengths, help=f"sequence lengths (default {lengths})")
    p.add_argument("--models", nargs="+", default=None, help="registered model names (default: all)")
    p.add_argument("--metrics", nargs="+", default=metrics, choices=choices)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed warm repeats per cell (median reported)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bsbr-results/compare", help="directory for results, plots and the report")


def _kwargs(args) -> dict:
    return {"hidden_dim": args.hidden_dim, "num_layers": args.num_layers, "num_heads": args.num_heads,
            "repeats": args.repeats, "threads": args.threads, "device": args.device}


def _compare(args) -> int:
    results = compare_models(args.lengths, args.models, args.metrics, accuracy_steps=args.accuracy_steps,
                             **_kwargs(args))
    print(f"report written to {write_report(results, args.out)}")
    return 0


def _scaling(args) -> int:
    results = scaling_analysis(args.lengths, args.models, args.metrics, **_kwargs(args))
    print(f"report written to {write_report(results, args.out)}")
    return 0


def _load(path: str) -> dict:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise SystemExit(f"RESULTS must be a results.json (or a directory holding one); {str(p)!r} does not exist")
    return json.loads(p.read_text())


def _analyze(args) -> int:
    results = _load(args.results)
    for metric in results["metrics"]:
        if metric == "accuracy":
            continue
        a = analyze_results(results, metric, args.baseline)
        print(f"{metric} (relative to {a['baseline']}):")
        for name, fit in a["fits"].items():
            if "k" in fit:
                print(f"  {name:14s} k = {fit['k']:.3f}  R^2 = {fit['r2']:.4f}  {fit['class']:10s} "
                      f"x{a['relative'][name][-1]:.2f} at {a['seq_lengths'][-1]}")
        for pair, found in a["crossovers"].items():
            print(f"  crossover {pair}: " + "; ".join(f"{c['between'][0]}..{c['between'][1]}" for c in found))
    return 0


def _report(args) -> int:
    results = _load(args.results)
    out = args.out or str(Path(args.results if Path(args.results).is_dir() else Path(args.results).parent))
    print(f"report written to {write_report(results, out)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="time and memory of every registered model vs length; writes a report")
    _common(p, DEFAULT_LENGTHS, ["inference_time", "memory_usage"], ["inference_time", "memory_usage", "accuracy"])
    p.add_argument("--accuracy-steps", type=int, default=100, help="training steps per cell for --metrics accuracy")
    p.set_defaults(func=_compare)
    p = subparsers.add_parser("scaling", help="time, activation memory and FLOPs vs length with fits")
    _common(p, DEFAULT_LENGTHS, ["time", "memory", "flops"], ["time", "memory", "flops"])
    p.set_defaults(func=_scaling)
    p = subparsers.add_parser("analyze", help="fits, complexity classes and crossovers of a results.json")
    p.add_argument("results")
    p.add_argument("--baseline", default=None)
    p.set_defaults(func=_analyze)
    p = subparsers.add_parser("report", help="(re)write the Markdown/HTML report and plots of a results.json")
    p.add_argument("results")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_report)
