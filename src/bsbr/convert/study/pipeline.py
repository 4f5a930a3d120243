"""Convert, measure, heal, measure again, save, report: the whole conversion experiment for one model.

:func:`run_conversion` is what ``bsbr convert`` and ``experiments/convert.py`` run.  Every stage writes its result
to ``out/stages/<name>.json`` before the next starts (a cell of :func:`bsbr.utils.cells.run_cells`), and healing
checkpoints as it goes (the resume of :mod:`bsbr.train.steps`), so a killed run re-run with the same arguments
continues where it stopped: a finished stage is read, not recomputed.  Every converted-model number sits beside the
original's and beside two cheaper conversions of the same model: local attention only (block diagonal, retrieval
off) and sliding-window attention over the same span as a chunk.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ... import _checks
from ... import _files as F
from ...utils.cells import CellFiles, run_cells
from ..families import bsbr_modules
from ..healing import HealConfig, heal
from ..metrics import compare_outputs, reference_outputs
from ..to_bsbr import convert_to_bsbr, set_attention
from .windows import token_stream, windows


@dataclass
class ConversionPlan:
    """What one conversion run does.  Token counts are per window; ``eval_windows`` held-out windows of
    ``seq_len`` tokens from the valid + test splits; healing reads the train split only."""

    chunk_size: int = 256
    retrieval: str = "states"  # "blocks": block retrieval of tokens (no weights, nothing to heal)
    top_k: int = 2  # block retrieval: chunks selected per query (the first chunk is always in view)
    block_summary: str = "mean"
    block_heads: str = "kv"  # block retrieval: one selection per key/value group, or per query head ("query")
    compression_factor: int | None = None
    retrieval_window: int | None = None
    gate_init: float = 0.0
    meta_key: str = "last"
    seq_len: int = 2048
    eval_windows: int = 4
    transfer_steps: int = 20
    transfer_lr: float = 1e-2
    distill_steps: int = 0
    distill_lr: float = 3e-3
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    heal_seq_len: int | None = None  # default seq_len
    chunk_sweep: list[int] = field(default_factory=list)
    length_sweep: list[int] = field(default_factory=list)  # other held-out window lengths, at chunk_size
    corpora: tuple[str, ...] = ("prose", "python")

    def __post_init__(self):
        _checks.positive_int("chunk_size", self.chunk_size)
        _checks.one_of("retrieval", self.retrieval, ("blocks", "states"))
        if self.retrieval == "blocks":
            _checks.positive_int("top_k", self.top_k)
            _checks.one_of("block_summary", self.block_summary, ("mean", "minmax"))
            _checks.one_of("block_heads", self.block_heads, ("kv", "query"))
            steps = {"transfer_steps": self.transfer_steps, "distill_steps": self.distill_steps,
                     "finetune_steps": self.finetune_steps}
            if any(steps.values()) or self.compression_factor is not None or self.retrieval_window is not None:
                raise ValueError(f"retrieval='blocks' has no weights to heal and no states: healing steps {steps}, "
                                 f"compression_factor={self.compression_factor} and retrieval_window="
                                 f"{self.retrieval_window} must be 0 / None")
        _checks.positive_int("seq_len", self.seq_len)
        _checks.positive_int("eval_windows", self.eval_windows)
        _checks.non_negative_int("transfer_steps", self.transfer_steps)
        _checks.non_negative_int("distill_steps", self.distill_steps)
        _checks.non_negative_int("finetune_steps", self.finetune_steps)
        for c in self.chunk_sweep:
            _checks.positive_int("chunk_sweep", c)
        for n in self.length_sweep:
            _checks.positive_int("length_sweep", n)
        if self.compression_factor is not None:
            _checks.positive_int("compression_factor", self.compression_factor)


def _stage(out: Path, name: str, compute):
    """The stage's saved result if a previous run finished it, else compute it (adding the seconds it took) and
    save it: one cell of :func:`~bsbr.utils.cells.run_cells`, the runner of the experiment grids, stored in
    ``out/stages/<name>.json``.  Stages run one at a time because healing changes the model between them."""

    def timed() -> dict:
        t0 = time.perf_counter()
        result = compute()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        return result

    return run_cells([(name, timed)], CellFiles(out / "stages"))[name]


def check_out_dir(out: Path, plan: ConversionPlan, name: str) -> dict:
    """Check that ``out`` is new or holds a run of this plan and model name; returns what ``out/plan.json`` holds
    for them.

    A finished stage is read back, not recomputed, so a directory holding another plan's stages would put their
    numbers into this plan's report.  ``out/plan.json`` (written on a run's first start) says which plan and model
    the stages are of; a different one is a ValueError naming the differences, raised before anything is read or
    written (``bsbr convert`` calls this before loading the model).  A directory without plan.json (from before
    it was written) is taken as it is."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file; expected a directory for the run (new or to resume)")
    wanted = json.loads(json.dumps({**asdict(plan), "model": name}))
    path = out / "plan.json"
    if path.is_file():
        saved = F.read_json(path, "the plan of the conversion run in this directory")
        if saved != wanted:
            diff = "; ".join(F.json_differences(saved, wanted)) or "not a plan"
            raise ValueError(f"out_dir {str(out)!r} holds a run of another plan (saved vs this run: {diff}); resume "
                             "it with the same arguments or use a new out_dir")
    return wanted


def _claim_out_dir(out: Path, plan: ConversionPlan, name: str) -> None:
    """:func:`check_out_dir`, then create ``out`` and write its plan.json if it is not there."""
    wanted = check_out_dir(out, plan, name)
    if not (out / "plan.json").is_file():
        CellFiles(out).save("plan", wanted)  # written through a temporary file, as the stages are


def _set_retrieval(model, on: bool) -> None:
    """Retrieval on (the conversion) or off: local attention only, block diagonal (sink tokens off too)."""
    for meta in bsbr_modules(model):
        meta.retrieval = on
        if not on:
            meta.saved_sink, meta.sink_tokens = meta.sink_tokens, 0
        elif hasattr(meta, "saved_sink"):
            meta.sink_tokens = meta.saved_sink


def _set_chunk(model, chunk: int) -> None:
    for meta in bsbr_modules(model):
        meta.chunk_size = chunk


def evaluate_variants(original, converted, batches, chunk: int, progress: bool = True,
                      references: dict | None = None) -> dict:
    """compare_outputs for BSBR, local-only (retrieval off) and a sliding window of ``chunk`` tokens.  Neither
    reference has trained weights, so ``references`` (an earlier call's results at the same chunk) are reused."""
    results = {}
    if not isinstance(original, list):
        original = reference_outputs(original, batches, progress)
    set_attention(converted, "bsbr")
    results["bsbr"] = compare_outputs(original, converted, batches, bucket=chunk, progress=progress)
    if references is not None:
        return {**results, "local": references["local"], "sliding_window": references["sliding_window"]}
    _set_retrieval(converted, False)
    try:
        results["local"] = compare_outputs(original, converted, batches, bucket=chunk, progress=progress)
    finally:
        _set_retrieval(converted, True)
    set_attention(converted, "sliding_window", window=chunk)
    try:
        results["sliding_window"] = compare_outputs(original, converted, batches, bucket=chunk, progress=progress)
    finally:
        set_attention(converted, "bsbr")
    return results


def run_conversion(original, tokenizer, plan: ConversionPlan, out_dir: str | Path, *, name: str = "model",
                   progress: bool = True, save_model: bool = True) -> dict:
    """Run the whole experiment for ``original`` (a loaded Hugging Face causal LM, left unchanged).

    Writes ``out_dir/stages/*.json``, ``out_dir/heal_<stage>/``, ``out_dir/model/`` (the healed converted model,
    ``save_pretrained``), ``out_dir/report.json`` and returns the report: per stage ("before", "transfer",
    "distill", "finetune"; a stage with 0 steps is skipped) the metrics of BSBR and of the two references, the
    chunk and length sweeps, and the healing budget (tokens, CPU seconds).
    """
    import copy

    out = Path(out_dir)
    _claim_out_dir(out, plan, name)
    original.eval()
    for p in original.parameters():
        p.requires_grad_(False)
    if plan.retrieval == "blocks":
        converted = convert_to_bsbr(copy.deepcopy(original), plan.chunk_size, retrieval="blocks", top_k=plan.top_k,
                                    block_summary=plan.block_summary, block_heads=plan.block_heads)
    else:
        converted = convert_to_bsbr(copy.deepcopy(original), plan.chunk_size, plan.compression_factor,
                                    retrieval="states", retrieval_window=plan.retrieval_window,
                                    gate_init=plan.gate_init, meta_key=plan.meta_key)
    ev = windows(tokenizer, plan.seq_len, plan.eval_windows, plan.corpora)
    eval_tokens = sum(w["input_ids"].numel() for w in ev)
    report = {"name": name, "class": type(original).__name__, "plan": asdict(plan), "eval_tokens": eval_tokens,
              "eval_sources": [w["source"] for w in ev], "stages": {}, "healing": {}}

    cached = None

    def ref():  # the original's outputs, computed once for every stage and sweep point that needs them
        nonlocal cached
        if cached is None:
            cached = reference_outputs(original, ev, progress)
        return cached

    report["stages"]["before"] = _stage(out, "before", lambda: evaluate_variants(ref(), converted, ev,
                                                                               plan.chunk_size, progress))
    heal_len = plan.heal_seq_len or plan.seq_len
    train = None

    def batch_at(step: int) -> torch.Tensor:
        nonlocal train
        if train is None:
            train = torch.cat([ids for _, ids in token_stream(tokenizer, plan.corpora, ("train",))])
        n = len(train) // heal_len
        i = step % n
        return train[i * heal_len : (i + 1) * heal_len][None]

    for stage, steps, lr in (("transfer", plan.transfer_steps, plan.transfer_lr),
                             ("distill", plan.distill_steps, plan.distill_lr),
                             ("finetune", plan.finetune_steps, plan.finetune_lr)):
        if not steps:
            continue
        cfg = HealConfig(stage=stage, steps=steps, lr=lr, seq_len=heal_len, warmup=max(1, steps // 10),
                         save_every=max(1, min(10, steps // 4)))
        records = heal(converted, batch_at, cfg, out / f"heal_{stage}", progress=progress)
        report["healing"][stage] = {"steps": steps, "lr": lr, "seq_len": heal_len,
                                    "tokens": records[-1]["tokens"] if records else 0,
                                    "cpu_seconds": records[-1]["seconds"] if records else 0.0,
                                    "first_loss": records[0]["loss"] if records else None,
                                    "last_loss": records[-1]["loss"] if records else None}
        report["stages"][stage] = _stage(out, stage, lambda: evaluate_variants(
            ref(), converted, ev, plan.chunk_size, progress, references=report["stages"]["before"]))
    last = list(report["stages"])[-1]
    sweep = {}
    for chunk in plan.chunk_sweep:
        def one(chunk=chunk):
            _set_chunk(converted, chunk)
            try:
                return evaluate_variants(ref(), converted, ev, chunk, progress)
            finally:
                _set_chunk(converted, plan.chunk_size)
        sweep[str(chunk)] = _stage(out, f"sweep_{last}_chunk{chunk}", one)
    report["chunk_sweep"] = {"stage": last, "results": sweep}
    lengths = {}
    for n in plan.length_sweep:  # the same stage at other window lengths (eval_windows windows of n tokens each)
        def at_length(n=n):
            batches = windows(tokenizer, n, plan.eval_windows, plan.corpora)
            result = evaluate_variants(reference_outputs(original, batches, progress), converted, batches,
                                       plan.chunk_size, progress)
            return {**result, "tokens": sum(w["input_ids"].numel() for w in batches)}
        lengths[str(n)] = _stage(out, f"length_{last}_len{n}", at_length)
    report["length_sweep"] = {"stage": last, "chunk_size": plan.chunk_size, "results": lengths}
    if save_model:
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        converted.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.rename(out / "model")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def summary_rows(report: dict) -> list[dict]:
    """One row per (stage, variant): ppl ratio, KL, top-1/top-5 agreement, last-layer cosine."""
    rows = []
    for stage, variants in report["stages"].items():
        if not isinstance(variants, dict):
            continue
        for variant, m in variants.items():
            if not isinstance(m, dict) or "ppl_ratio" not in m:
                continue
            rows.append({"stage": stage, "variant": variant, "ppl_original": m["ppl_original"],
                         "ppl": m["ppl_converted"], "ppl_ratio": m["ppl_ratio"], "kl": m["kl"], "top1": m["top1"],
                         "top5": m.get("top5"), "cosine_last": m["cosine"][-1],
                         "bpb": m.get("bpb_converted"), "bpb_original": m.get("bpb_original"),
                         "first_chunk_max_kl": m["first_bucket_max_kl"]})
    return rows
