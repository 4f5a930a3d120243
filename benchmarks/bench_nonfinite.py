"""What keeping NaN and inf where they are (issue 27, item 6) costs: every affected forward, this commit against an
older one, side by side in one process.

    flock /tmp/bsbr-cpu.lock env PYTHONPATH=src python benchmarks/bench_nonfinite.py --old 65e4bb0 [--clock cpu] [--aa]

The old commit's ``src/`` is unpacked with ``git archive`` into a temporary folder and imported as a second package
(``bsbr_old``); both sides get the same inputs, and each pair of calls alternates its order round by round.  Outputs
are compared first (equal to the bit: a speedup of a different computation would be no speedup).  Sections:

* ``ops`` — the attention cores the change touched, batch 1, fp32, inference mode: softmax_attention and Hopfield's
  association (H 8, d 64; T 1,024 and 8,192), window_attention (W 128), linear_chunkwise and delta_chunkwise (chunk
  64), gau_mixed (g 256, s 128, e 512) (H 4, d 64; T 1,024 and 16,384);
* ``lm`` — the generic LM of bench_baselines.py (hidden 256, 4 heads, 2 layers, ff 1024) for every model at T 1,024,
  batch 2, unpadded and with one row left-padded by T / 8 (the padding path zeroes padded hidden states).

``--clock cpu`` times the CPU time of the calling thread with one torch thread instead of wall time with the default
threads: on a host shared with other jobs it measures the work of each side, not the scheduler.  ``--aa`` runs the
old side against itself: the noise floor of the same harness at the same time.  Prints one line per case (fastest
and median of the rounds, each side; new / old) and writes benchmarks/results/nonfinite[_aa].json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).resolve().parent)]  # this checkout's bsbr, not an installed one
from common import environment, header, write_json  # noqa: E402

MODULES = ("ops.softmax", "ops.hopfield", "ops.window", "ops.linear", "ops.deltanet", "ops.gau", "models")


def import_old(commit: str, folder: Path):
    """The package ``bsbr`` of ``commit``, unpacked under ``folder`` and imported as ``bsbr_old``."""
    archive = folder / "src.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "archive", commit, "src/bsbr"], cwd=ROOT, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    root = folder / "src" / "bsbr"
    spec = importlib.util.spec_from_file_location("bsbr_old", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bsbr_old"] = module
    spec.loader.exec_module(module)
    return {m: importlib.import_module(f"bsbr_old.{m}") for m in MODULES}


def first(out):
    out = out[0] if isinstance(out, tuple) else out
    return getattr(out, "logits", out)


def compare(label, old_fn, new_fn, rounds, clock, results):
    a, b = first(old_fn()), first(new_fn())
    if not torch.equal(a, b):
        raise SystemExit(f"{label}: the two sides differ (max {(a - b).abs().max():.2e}); not timing them")
    times = ([], [])
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            fn = (old_fn, new_fn)[side]
            t0 = clock()
            fn()
            times[side].append(clock() - t0)
    row = {side: {"min_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3, "rounds": rounds}
           for side, t in zip(("old", "new"), times, strict=True)}
    row["ratio_min"] = row["new"]["min_ms"] / row["old"]["min_ms"]
    row["ratio_median"] = row["new"]["median_ms"] / row["old"]["median_ms"]
    results[label] = row
    print(f"{label:<46} old {row['old']['min_ms']:9.3f} / {row['old']['median_ms']:9.3f} ms   new "
          f"{row['new']['min_ms']:9.3f} / {row['new']['median_ms']:9.3f} ms   new/old {row['ratio_min']:.3f} (fastest) "
          f"{row['ratio_median']:.3f} (median)", flush=True)


def bench_ops(old, new, clock, results, scale):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    cases = []  # (label, module, function, arguments, rounds)
    for T in (1024, 8192):
        rounds = max(3, (40 if T < 4096 else 12) * scale // 4)
        q, k, v = r(1, 8, T, 64), r(1, 8, T, 64), r(1, 8, T, 64)
        cases += [(f"softmax_attention H8 d64 T={T}", "ops.softmax", "softmax_attention", (q, k, v), rounds),
                  (f"association (Hopfield) H8 d64 T={T}", "ops.hopfield", "association", (q, k, v, 0.125), rounds)]
    for T in (1024, 16384):
        rounds = max(3, (40 if T < 4096 else 12) * scale // 4)
        q, k, v = r(1, 4, T, 64), r(1, 4, T, 64), r(1, 4, T, 64)
        phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
        unit_q, unit_k, beta = F.normalize(q, dim=-1), F.normalize(k, dim=-1), torch.rand(1, 4, T, generator=g)
        gau = (r(1, T, 128), r(1, T, 128), r(1, T, 128), r(1, T, 128), r(1, T, 512), 256)
        cases += [(f"window_attention H4 d64 W128 T={T}", "ops.window", "window_attention", (q, k, v, 128), rounds),
                  (f"linear_chunkwise H4 d64 C64 T={T}", "ops.linear", "linear_chunkwise", (phi_q, phi_k, v, 64),
                   rounds),
                  (f"delta_chunkwise H4 d64 C64 T={T}", "ops.deltanet", "delta_chunkwise",
                   (unit_q, unit_k, v, beta, 64), rounds),
                  (f"gau_mixed s128 e512 g256 T={T}", "ops.gau", "gau_mixed", gau, rounds)]
    for label, module, fn, arguments, rounds in cases:
        compare(label, partial(getattr(old[module], fn), *arguments), partial(getattr(new[module], fn), *arguments),
                rounds, clock, results)


def bench_lm(old, new, clock, results, scale, T=1024):
    g = torch.Generator().manual_seed(1)
    for name in new["models"].list_models():
        models = []
        for side in (old, new):
            torch.manual_seed(0)
            models.append(side["models"].build_model(name, vocab_size=256, dropout=0.0, hidden_dim=256, num_heads=4,
                                                     num_layers=2, ff_dim=1024).eval())
        ids = torch.randint(0, 256, (2, T), generator=g)
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, : T // 8] = 0
        rounds = max(3, 30 * scale // 4)
        compare(f"LM {name} T={T} batch 2", partial(models[0], ids), partial(models[1], ids), rounds, clock, results)
        compare(f"LM {name} T={T} batch 2 left-padded", partial(models[0], ids, attention_mask=mask),
                partial(models[1], ids, attention_mask=mask), rounds, clock, results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="65e4bb0", help="the commit to compare against (default: main before this)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--aa", action="store_true", help="old against old: the harness's noise floor")
    parser.add_argument("--sections", nargs="+", choices=("ops", "lm"), default=["ops", "lm"])
    parser.add_argument("--scale", type=int, default=4, help="rounds relative to the default (4)")
    args = parser.parse_args()
    clock = time.perf_counter
    if args.clock == "cpu":
        torch.set_num_threads(1)
        clock = time.thread_time
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old(args.old, Path(tmp))
        new = old if args.aa else {m: importlib.import_module(f"bsbr.{m}") for m in MODULES}
        where = Path(importlib.import_module("bsbr").__file__).resolve()
        if where.parents[1] != ROOT / "src":
            raise SystemExit(f"imported bsbr from {where}, not from this checkout's src/")
        env = environment()
        env.update(old_commit=args.old, clock=args.clock, aa=args.aa, load_before=os.getloadavg())
        print(header(env), f"| clock {args.clock} | old {args.old}{' | A/A control' if args.aa else ''} | load "
              f"{env['load_before'][0]:.1f}", flush=True)
        results = {}
        with torch.inference_mode():
            if "ops" in args.sections:
                bench_ops(old, new, clock, results, args.scale)
            if "lm" in args.sections:
                bench_lm(old, new, clock, results, args.scale)
        env["load_after"] = os.getloadavg()
        print(f"load average after: {env['load_after'][0]:.1f}")
        path = write_json(f"nonfinite{'_aa' if args.aa else ''}.json", {"environment": env, "results": results})
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
