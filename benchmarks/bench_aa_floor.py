"""How often a quiet run of ``compare_models`` reads as noisy: the A/A noise floor over many small runs, both ways of
computing it, side by side (issue 29's CI failure).

    PYTHONPATH=src python benchmarks/bench_aa_floor.py [--runs 12] [--repeats 3 7] [--min-time 0 0.02]

Each run is the quiet test's configuration (tests/test_evals_noise.py::test_a_quiet_run_is_not_flagged): BSBR and
Standard at 64 and 128 tokens, hidden 32, 2 heads, one torch thread, glibc's malloc thresholds fixed as ``bsbr
compare`` fixes them.  For each (repeats, min_time) it prints, over the runs, the floor as the median of the
per-round max / min ratios minus 1 (``old``, what files before 2026-12-07 hold) and as the disagreement of the
control's two medians (``new``, :func:`bsbr.evals.noise.control_floor`): median, largest, and how many runs exceed
``FLOOR_LIMIT``.  Writes benchmarks/results/aa_floor.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

from tqdm import tqdm

from bsbr.evals import compare_models
from bsbr.evals.noise import FLOOR_LIMIT, NoisyTimingWarning
from bsbr.utils.memory import fix_malloc_thresholds
from common import environment, header, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--repeats", type=int, nargs="+", default=[3, 7])
    ap.add_argument("--min-time", type=float, nargs="+", default=[0.0, 0.02])
    args = ap.parse_args(argv)
    fix_malloc_thresholds()
    env = environment()
    print(header(env))
    rows = []
    for repeats in args.repeats:
        for min_time in args.min_time:
            old, new = [], []
            for _ in tqdm(range(args.runs), desc=f"repeats {repeats}, min_time {min_time}", file=sys.stderr):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NoisyTimingWarning)
                    r = compare_models([64, 128], models=["BSBR", "Standard"], metrics=["inference_time"],
                                       hidden_dim=32, num_heads=2, repeats=repeats, threads=1, min_time=min_time,
                                       progress=False)
                old.append(statistics.median(r["noise"]["control"]["ratios"]) - 1)
                new.append(r["noise"]["noise_floor"])
            row = {"repeats": repeats, "min_time": min_time, "old": old, "new": new}
            rows.append(row)
            print(f"repeats {repeats}  min_time {min_time:<5}  "
                  + "  ".join(f"{k}: median {statistics.median(v):.3f} max {max(v):.3f} "
                              f"above {FLOOR_LIMIT:.2f} {sum(x > FLOOR_LIMIT for x in v)}/{len(v)}"
                              for k, v in (("old", old), ("new", new))), flush=True)
    path = write_json("aa_floor.json", {"environment": env, "runs": args.runs, "floor_limit": FLOOR_LIMIT,
                                        "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
