"""MQAR bs128, seed 0: how the T = 512 cells' shared first 5,500 steps compare with the T = 256 cells', and the
seconds a training step at T = 512 (experiments/NOTES.md, "T = 512 with the same recipe").

    python experiments/curve_drift.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "recall_curriculum_bs128.json"
SHARED = 5500  # the steps both cells train on the same batches (the T = 64 and T = 128 stages)


def main() -> None:
    runs = json.loads(RESULTS.read_text())["runs"]
    print("model          s/step at T=512 (5600-6500)  first step |diff| > 1e-3  max |diff| (steps <= 5500)")
    for model in ("BSBR", "Linear", "Standard", "Hopfield", "DeltaNet", "SlidingWindow", "GAU"):
        long = {e["step"]: e for e in runs[f"{model}|T=512|h=64|lr=0.003|seed=0"]["curve"]}
        short = runs[f"{model}|T=256|h=64|lr=0.003|seed=0"]["curve"]
        diffs = [(e["step"], abs(e["loss"] - long[e["step"]]["loss"])) for e in short if e["step"] <= SHARED]
        per_step = (long[6500]["seconds"] - long[5600]["seconds"]) / 900
        first = next((step for step, d in diffs if d > 1e-3), "never")
        print(f"{model:14s} {per_step:27.2f}  {first!s:>27}  {max(d for _, d in diffs):.2g}")


if __name__ == "__main__":
    main()
