"""``bsbr compare``, ``bsbr scaling``, ``bsbr analyze RESULTS``, ``bsbr report RESULTS``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

from ..utils.memory import fix_malloc_thresholds, malloc_setting
from .analysis import analyze_results
from .compare import compare_models, scaling_analysis
from .noise import NoisyTimingWarning, noise_warning
from .report import write_report
from .results import load_results, results_path

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192]


def _common(p: argparse.ArgumentParser, lengths, metrics, choices) -> None:
    p.add_argument("--lengths", type=int, nargs="+", default=lengths, help=f"sequence lengths (default {lengths})")
    p.add_argument("--models", nargs="+", default=None, help="registered model names (default: all)")
    p.add_argument("--metrics", nargs="+", default=metrics, choices=choices)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed warm repeats per cell (median reported)")
    p.add_argument("--min-time", type=float, default=0.02,
                   help="seconds a timing lasts at least: a faster cell is called that many times in a row per "
                        "timing (mean per call reported; default 0.02)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bsbr-results/compare", help="directory for results, plots and the report")
    _malloc_flag(p)


def _malloc_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (by default they are fixed so that timings do not pay "
                        "for page faults of memory freed and re-allocated between calls: bsbr.utils.memory."
                        "fix_malloc_thresholds)")


def _prepare(args) -> None:
    if Path(args.out).exists() and not Path(args.out).is_dir():  # said before minutes of measuring, not after
        raise ValueError(f"--out {args.out}: is a file; expected a directory for the results")
    if not args.default_malloc:
        fix_malloc_thresholds()


def _kwargs(args) -> dict:
    return {"hidden_dim": args.hidden_dim, "num_layers": args.num_layers, "num_heads": args.num_heads,
            "repeats": args.repeats, "min_time": args.min_time, "threads": args.threads, "device": args.device}


@contextlib.contextmanager
def _say_noise():
    """NoisyTimingWarnings printed to stderr as they come, as plain text (no file:line prefix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", NoisyTimingWarning)
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, NoisyTimingWarning):
                print(message, file=sys.stderr, flush=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def _compare(args) -> int:
    _prepare(args)
    options = {"vocab_size": 256, "answers_in_input": True} if args.mqar_answers_in_input else None
    with _say_noise():
        results = compare_models(args.lengths, args.models, args.metrics, accuracy_steps=args.accuracy_steps,
                                 accuracy_task_options=options, **_kwargs(args))
    print(f"report written to {write_report(results, args.out)}")
    return 0


def _scaling(args) -> int:
    _prepare(args)
    with _say_noise():
        results = scaling_analysis(args.lengths, args.models, args.metrics, **_kwargs(args))
    print(f"report written to {write_report(results, args.out)}")
    return 0


def _analyze(args) -> int:
    results = load_results(args.results)
    message = noise_warning(results)
    if message:
        print(message.replace("  The report opens", "  `bsbr report` opens its report"), file=sys.stderr)
    for metric in results["metrics"]:
        if metric == "accuracy":
            continue
        a = analyze_results(results, metric, args.baseline)
        print(f"{metric} (relative to {a['baseline']}):")
        for name, fit in a["fits"].items():
            if "k" in fit:
                last = a["relative"][name][-1]
                cls = fit["class"] if fit.get("reliable") is not False else f"UNRELIABLE ({fit['why']})"
                print(f"  {name:14s} k = {fit['k']:.3f}  R^2 = {fit['r2']:.4f}  {cls:10s} "
                      + (f"x{last:.2f}" if last is not None else "x-") + f" at {a['seq_lengths'][-1]}")
        for pair, found in a["crossovers"].items():
            notes = {False: " (not resolved: {why})", None: " (spread not recorded)", True: ""}
            shown = [f"{c['between'][0]}..{c['between'][1]}" + notes[c.get("resolved", True)].format(why=c.get("why"))
                     for c in found]
            print(f"  crossover {pair}: " + "; ".join(shown))
    return 0


def _report(args) -> int:
    source = results_path(args.results)
    results = load_results(source)
    out = args.out or str(source.parent)
    print(f"report written to {write_report(results, out, source)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="time and memory of every registered model vs length; writes a report")
    _common(p, DEFAULT_LENGTHS, ["inference_time", "memory_usage"], ["inference_time", "memory_usage", "accuracy"])
    p.add_argument("--accuracy-steps", type=int, default=100, help="training steps per cell for --metrics accuracy")
    p.add_argument("--mqar-answers-in-input", action="store_true",
                   help="--metrics accuracy on MQAR as it was before 2026-12-04: each answer also in the input, "
                        "which lets a model answer by elimination (docs/tasks-and-training.md)")
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
    register_ablate(subparsers)


def _ablate(args) -> int:
    """BSBR chunk size x compression factor at one length: forward time, activation memory, streaming cache."""
    _prepare(args)
    import torch
    from tqdm import tqdm

    from ..models import build_model
    from .measure import activation_bytes, time_callable

    rows = []
    cells = [(c, f) for c in args.chunk_sizes for f in args.compression_factors]
    ids = torch.randint(0, 256, (1, args.length), generator=torch.Generator().manual_seed(0))
    for chunk, factor in tqdm(cells, desc="ablate"):
        torch.manual_seed(0)
        lm = build_model("BSBR", vocab_size=256, hidden_dim=args.hidden_dim, num_layers=args.num_layers,
                         num_heads=args.num_heads, ff_dim=4 * args.hidden_dim, dropout=0.0, causal_lm=True,
                         chunk_size=chunk, compression_factor=None if factor == 0 else factor)
        with torch.inference_mode():
            t = time_callable(lambda lm=lm: lm(ids), repeats=args.repeats)
            cache = lm.new_cache(1)
            lm(ids, cache=cache, use_cache=True)
        rows.append({"chunk_size": chunk, "compression_factor": factor or None, "forward_s": t["median"],
                     "forward_spread": [t["p25"], t["p75"]], "activation_bytes": activation_bytes(lm, ids)["bytes"],
                     "cache_bytes": cache.state_nbytes(), "parameters": lm.num_parameters()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"length": args.length, "hidden_dim": args.hidden_dim,
                                                   "num_layers": args.num_layers, "num_heads": args.num_heads,
                                                   "malloc": malloc_setting(), "rows": rows}, indent=2))
    print(f"BSBR ablation at T={args.length} (hidden {args.hidden_dim}, {args.num_layers} layers, "
          f"{args.num_heads} heads)")
    print(f"{'chunk':>6s} {'compress':>8s} {'forward s':>10s} {'act MiB':>8s} {'cache MiB':>9s} {'params':>10s}")
    for r in rows:
        print(f"{r['chunk_size']:6d} {str(r['compression_factor'] or '-'):>8s} {r['forward_s']:10.4f} "
              f"{r['activation_bytes'] / 2**20:8.1f} {r['cache_bytes'] / 2**20:9.2f} {r['parameters']:10,d}")
    print(f"results written to {out / 'ablation.json'}")
    return 0


def register_ablate(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="BSBR chunk size x compression: time, activation memory, cache size")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--compression-factors", type=int, nargs="+", default=[0, 2, 4, 8], help="0 = no compression")
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bsbr-results/ablate")
    _malloc_flag(p)
    p.set_defaults(func=_ablate)
