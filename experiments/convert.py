"""Conversion experiments: SmolLM2-135M (a real pretrained LLaMA-family checkpoint) and a small GPT-2 pretrained
here, converted to BSBR, measured before and after healing beside local-only and sliding-window conversions.

    PYTHONPATH=src python experiments/convert.py                 # both models, the settings of record
    PYTHONPATH=src python experiments/convert.py --models gpt2   # one of them
    PYTHONPATH=src python experiments/convert.py --models smollm2_distill   # healing by distillation instead

Writes experiments/results/convert_<model>.json (per stage and variant: ppl_ratio, the similarity metrics, the
tokens seen) and runs/convert/<model>/ (stages, healing checkpoints, report.md, figures, the converted model).
Every stage is saved as it finishes: a killed run re-run with the same command continues.  The initialisation
study (which start for the new weights) runs first and is written to the same JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from bsbr.convert import convert_to_bsbr  # noqa: E402
from bsbr.convert.metrics import compare_outputs, reference_outputs  # noqa: E402
from bsbr.convert.study.checkpoints import pretrain_gpt2, smollm2  # noqa: E402
from bsbr.convert.study.pipeline import ConversionPlan, _stage, run_conversion, summary_rows  # noqa: E402
from bsbr.convert.study.report import write_report  # noqa: E402
from bsbr.convert.study.windows import windows  # noqa: E402

# the initialisations compared before any healing (chunk of record, 2 held-out windows)
INITS = {
    "gate 1, meta identity, last key": {"gate_init": 1.0},
    "gate 1, meta identity, mean key": {"gate_init": 1.0, "meta_key": "mean"},
    "gate 1, meta zero (uniform mixture)": {"gate_init": 1.0, "meta_init": "zero"},
    "gate 0.1, meta identity, last key": {"gate_init": 0.1},
    "gate 0.01, meta identity, last key": {"gate_init": 0.01},
    "gate 0 (retrieval off at the start)": {"gate_init": 0.0},
    "gate 0, 4 sink tokens": {"gate_init": 0.0, "sink_tokens": 4},
}

PLANS = {
    "smollm2": ConversionPlan(chunk_size=256, gate_init=0.0, seq_len=2048, eval_windows=4, transfer_steps=30,
                              transfer_lr=1e-2, finetune_steps=4, finetune_lr=1e-3, chunk_sweep=[128, 512]),
    # healing by end-to-end distillation from the local-only start, no layer-wise transfer (2026-12-03)
    "smollm2_distill": ConversionPlan(chunk_size=256, gate_init=0.0, seq_len=2048, eval_windows=4, transfer_steps=0,
                                      distill_steps=60, distill_lr=3e-3, chunk_sweep=[32, 64, 128, 512],
                                      length_sweep=[1024, 4096]),
    "gpt2": ConversionPlan(chunk_size=64, gate_init=0.0, seq_len=512, eval_windows=16, transfer_steps=60,
                           transfer_lr=1e-2, finetune_steps=40, finetune_lr=1e-3, chunk_sweep=[32, 128, 256]),
}


def environment() -> dict:
    """The experiments' one environment record (``_exp.environment``): machine, threads, torch, and the commit with
    a loud ``+dirty`` and ``dirty_paths`` when the code has uncommitted changes."""
    from _exp import environment as shared

    return shared()


def init_study(model, tok, plan: ConversionPlan, out: Path) -> dict:
    def run():
        ev = windows(tok, plan.seq_len, 2, plan.corpora)
        ref = reference_outputs(model, ev)
        rows = {}
        for name, options in INITS.items():
            conv = convert_to_bsbr(copy.deepcopy(model), plan.chunk_size, retrieval="states", **options)
            m = compare_outputs(ref, conv, ev, bucket=plan.chunk_size, progress=False)
            rows[name] = {"options": options, "ppl_ratio": m["ppl_ratio"], "ppl": m["ppl_converted"],
                          "ppl_original": m["ppl_original"], "kl": m["kl"], "top1": m["top1"]}
            print(f"  init {name:40s} ppl ratio {m['ppl_ratio']:.4g}  top-1 {m['top1']:.3f}", flush=True)
            del conv
        return {"chunk_size": plan.chunk_size, "tokens": sum(w["input_ids"].numel() for w in ev), "rows": rows}

    return _stage(out, "init_study", run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gpt2"], choices=sorted(PLANS))
    parser.add_argument("--out", default=str(ROOT / "runs" / "convert"))
    parser.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--gpt2-minutes", type=float, default=15.0, help="pretraining budget of the small GPT-2")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        pretraining = None
        if name.startswith("smollm2"):
            model, tok = smollm2(ROOT / "runs" / "models" / "smollm2-135m")
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            gdir = ROOT / "runs" / "models" / "gpt2-small-bsbr"
            if not (gdir / "pretrain.json").is_file():
                pretrain_gpt2(gdir, minutes=args.gpt2_minutes, seq_len=PLANS["gpt2"].seq_len,
                              progress=not args.no_progress)
            pretraining = json.loads((gdir / "pretrain.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(str(gdir), attn_implementation="sdpa").eval()
            tok = AutoTokenizer.from_pretrained(str(gdir))
        plan = PLANS[name]
        init = None
        if name in ("smollm2", "gpt2"):  # a plan variant (name_suffix) shares its model's initialisation study
            print(f"{name}: initialisation study", flush=True)
            init = init_study(model, tok, plan, out)
        print(f"{name}: conversion at chunk {plan.chunk_size}", flush=True)
        report = run_conversion(model, tok, plan, out, name=name, progress=not args.no_progress)
        write_report(report, out)
        record = {"model": name, "class": report["class"], "environment": environment(),
                  "command": "PYTHONPATH=src python experiments/convert.py --models " + name,
                  "pretraining": pretraining, "init_study": init, "plan": report["plan"],
                  "eval_tokens": report["eval_tokens"], "healing": report["healing"], "rows": summary_rows(report),
                  "stages": report["stages"], "chunk_sweep": report["chunk_sweep"],
                  "length_sweep": report.get("length_sweep"),
                  "wall_minutes_this_invocation": round((time.perf_counter() - t0) / 60, 1)}
        (results / f"convert_{name}.json").write_text(json.dumps(record, indent=1))
        for row in record["rows"]:
            print(f"  {row['stage']:9s} {row['variant']:15s} ppl {row['ppl']:.3f} (orig {row['ppl_original']:.3f}) "
                  f"ratio {row['ppl_ratio']:.3f} top-1 {row['top1']:.3f} KL {row['kl']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
