"""compare_models and scaling_analysis: every registered mechanism in the same generic LM, measured side by side."""

from __future__ import annotations

import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from .. import _checks
from ..models import build_model, list_models
from ..models.registry import canonical_name
from .flops import analytic_flops
from .measure import activation_bytes, count_flops, summarize, time_interleaved
from .noise import NoisyTimingWarning, Probe, assess, busy_warning, cores, loadavg, noise_warning
from .results import RESULTS_SCHEMA

COMPARE_METRICS = ("inference_time", "memory_usage", "accuracy")
SCALING_METRICS = ("time", "memory", "flops")


def _commit() -> str:
    """The commit of the bsbr source this process runs, "<sha>+dirty" when that source (the package directory) has
    uncommitted changes, "unknown" outside a git checkout (an installed wheel)."""
    package = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=package).stdout.strip()
        if not sha:
            return "unknown"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, check=False, cwd=package).stdout.strip()
    except OSError:
        return "unknown"
    return f"{sha}+dirty" if changed else sha


def _validate(seq_lengths, models, metrics, allowed) -> tuple[list[int], list[str], list[str]]:
    """Every argument checked before any work starts."""
    if not isinstance(seq_lengths, list | tuple) or not seq_lengths:
        raise ValueError(f"seq_lengths must be a non-empty list of positive ints, got {seq_lengths!r}")
    lengths = [_checks.positive_int("seq_lengths[]", t) for t in seq_lengths]
    if len(set(lengths)) != len(lengths):  # each length is one cell of every model
        raise ValueError(f"seq_lengths must be distinct, got {list(seq_lengths)!r}")
    models = list(list_models() if models is None else models)
    if not models:
        raise ValueError("models must name at least one registered model; known: " + ", ".join(list_models()))
    names = [canonical_name(m) for m in models]  # raises ValueError naming unknown models
    metrics = list(metrics)
    if not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {allowed}")
    for m in metrics:
        if m not in allowed:
            raise ValueError(f"unknown metric {m!r}; expected one of {allowed}")
    return lengths, names, metrics


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _settings(**kw) -> dict:
    from ..utils.memory import malloc_setting  # (bsbr.utils.memory imports this package)

    return {**kw, "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": _cpu_name(), "threads": torch.get_num_threads(),
            "commit": _commit(), "malloc": malloc_setting()}


def _build(name, vocab_size, hidden_dim, num_layers, num_heads, ff_dim, device, dtype, causal_lm=False):
    torch.manual_seed(0)
    return build_model(name, vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers,
                       num_heads=num_heads, ff_dim=ff_dim, dropout=0.0, causal_lm=causal_lm).to(device, dtype)


def _accuracy(name, T, settings) -> float:
    """Held-out accuracy on MQAR after a short, stated training budget (see ``settings``)."""
    from ..tasks import get_task
    from ..train import TrainConfig, evaluate, train

    task = get_task(settings["accuracy_task"], seq_len=T, **settings["accuracy_task_options"])
    lm = _build(name, task.vocab_size, settings["hidden_dim"], settings["num_layers"], settings["num_heads"],
                settings["ff_dim"], settings["device"], torch.float32, causal_lm=True)
    cfg = TrainConfig(steps=settings["accuracy_steps"], batch_size=settings["accuracy_batch_size"],
                      lr=settings["accuracy_lr"], warmup_steps=max(1, settings["accuracy_steps"] // 10),
                      eval_every=0, eval_batches=2, seed=settings["seed"], device=str(settings["device"]),
                      progress=False)
    train(lm, task, cfg)
    return float(evaluate(lm, task, split="test", batch_size=settings["accuracy_batch_size"], num_batches=4,
                          device=settings["device"])["accuracy"])


TIME_KEYS = ("", "_spread", "_min", "_repeats", "_waits", "_calls")  # inference_time + these: what a timed cell records


def _empty(names, lengths, metrics, settings) -> dict:
    results = {"schema": RESULTS_SCHEMA, "seq_lengths": lengths, "models": names, "metrics": metrics,
               "settings": settings}
    for name in names:
        results[name] = {m: [None] * len(lengths) for m in metrics if m != "inference_time"}
        if "inference_time" in metrics:
            results[name].update({f"inference_time{k}": [None] * len(lengths) for k in TIME_KEYS})
    return results


def _record_time(row: dict, j: int, times: list[float], waits: list, calls: int) -> None:
    s = summarize(times)
    row["inference_time"][j] = s["median"]
    row["inference_time_spread"][j] = [s["p25"], s["p75"]]
    row["inference_time_min"][j] = s["min"]
    row["inference_time_repeats"][j] = list(times)
    row["inference_time_waits"][j] = list(waits)
    row["inference_time_calls"][j] = calls


def _fail(results: dict, name: str, T: int, err: Exception) -> None:
    """A failed cell (e.g. out of memory) holds None everywhere and its message under ``errors``."""
    j = results["seq_lengths"].index(T)
    for values in results[name].values():
        if isinstance(values, list):
            values[j] = None
    results[name].setdefault("errors", {})[str(T)] = (str(err).splitlines() or [type(err).__name__])[0]


def _control_cell(names, lengths, fns):
    """The A/A control: Standard (one fused SDPA kernel per layer, the steadiest cell) at the middle length, else
    the first model there, else any live cell.  A model whose own time depends on where in the round it runs
    would read as machine noise: on a quiet 2-core machine BSBR at 2,048 tokens gave pairs 1.10 / 1.26 / 1.27
    (and 1.03 / 1.24 / 1.28) where Standard gave 1.02 / 1.09 / 1.06 and 1.02 / 1.01 / 1.01."""
    middle = lengths[len(lengths) // 2]
    for name in ("Standard", names[0]):
        if (name, middle) in fns:
            return name, middle
    return next(iter(fns), None)


def _timed_rounds(results: dict, fns: dict, repeats: int, seed: int, progress: bool, min_time: float) -> None:
    """Interleaved rounds over every live cell (see :func:`~bsbr.evals.measure.time_interleaved`), the A/A
    control and the load probe; fills the inference_time fields and ``results["noise"]``."""
    threads, n_cores = torch.get_num_threads(), cores()
    probe = Probe(threads)
    before = {"others": probe.sample_others(), "loadavg": loadavg()}
    note = busy_warning(before["others"], threads, n_cores)
    if note:
        warnings.warn(note, NoisyTimingWarning, stacklevel=3)
    names, lengths = results["models"], results["seq_lengths"]
    control = _control_cell(names, lengths, fns)
    bar = tqdm(total=len(fns) * (repeats + 1) + (repeats if control else 0), desc="timing (interleaved rounds)",
               disable=not progress, file=sys.stderr)
    with bar:
        run = time_interleaved(fns, repeats, control=control, seed=seed, probe=probe, progress=bar.update,
                               min_time=min_time)
    for (name, T), message in run["errors"].items():
        _fail(results, name, T, RuntimeError(message))
    cells = {key: c for key, c in run["cells"].items() if key not in run["errors"]}
    for (name, T), c in cells.items():
        _record_time(results[name], lengths.index(T), c["times"], c["waits"], c["calls"])
    ctrl = {"model": control[0], "seq_length": control[1], "ratios": [round(r, 4) for r in run["control_ratios"]],
            "pairs": [[float(f"{t:.6g}") for t in pair] for pair in run["control_pairs"]]} if control else None
    results["noise"] = assess(cells, ctrl, run["others"], before, threads, n_cores, probe.method)
    message = noise_warning(results)
    if message:
        warnings.warn(message, NoisyTimingWarning, stacklevel=3)


def compare_models(seq_lengths=(64, 128, 256, 512, 1024), models=None, metrics=("inference_time", "memory_usage"),
                   *, hidden_dim: int = 128, num_layers: int = 2, num_heads: int = 4, ff_dim: int | None = None,
                   vocab_size: int = 256, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", threads: int | None = None, repeats: int = 5,
                   min_time: float = 0.02,
                   accuracy_task: str = "mqar", accuracy_task_options: dict | None = None, accuracy_steps: int = 100,
                   accuracy_batch_size: int = 16, accuracy_lr: float = 3e-3, seed: int = 0,
                   progress: bool = True) -> dict:
    """Measure each model at each length, every model in the same generic LM (only the attention differs).

    ``inference_time``: seconds per forward of [batch_size, T] tokens, median of ``repeats`` warm runs, timed in
    interleaved rounds: one warm-up round, then ``repeats`` rounds that each time every (model, length) cell
    once in a new random order (:func:`~bsbr.evals.measure.time_interleaved`), so that background load falls on
    all cells alike; a cell faster than ``min_time`` seconds is called enough times in a row per timing to take
    that long and its time is the mean per call (``inference_time_calls``: calls per timing).  Per cell it keeps
    every repeat (``inference_time_repeats``), the quartiles
    (``inference_time_spread``: [p25, p75]), the fastest (``inference_time_min``) and our threads' run-queue wait
    per repeat (``inference_time_waits``); the load before and during the run, the A/A control and the verdict
    go to ``results["noise"]`` (:func:`bsbr.evals.noise.assess`), and a noisy run also raises a
    :class:`~bsbr.evals.noise.NoisyTimingWarning` naming the noisy cells and what to do.  ``memory_usage``:
    activation bytes of one forward + backward (see :func:`~bsbr.evals.measure.activation_bytes`; CPU: bytes
    saved for backward, CUDA: allocator peak).
    ``accuracy``: test accuracy on ``accuracy_task`` after ``accuracy_steps`` AdamW steps (small: read it as
    what that budget buys).  ``accuracy_task_options`` default for MQAR: ``{"vocab_size": 256}`` (enough keys
    for T / 16 pairs up to T = 1,984; the task's own 8,192 makes the LM head and its softmax most of the cost,
    ~30x slower per step on CPU).  Returns {"schema", "seq_lengths", "models", "metrics", "settings", "noise"
    (when timed), model: {metric: [value per length], ..., "parameters": n}} (layout: :mod:`bsbr.evals.results`);
    a failed cell holds None and its error under ``model["errors"]``.  ``threads``: torch's intra-op threads for
    the measurement (default: as set; the caller's setting is restored on return).
    """
    lengths, names, metrics = _validate(seq_lengths, models, metrics, COMPARE_METRICS)
    for arg, v in (("hidden_dim", hidden_dim), ("num_layers", num_layers), ("num_heads", num_heads),
                   ("batch_size", batch_size), ("repeats", repeats), ("accuracy_steps", accuracy_steps)):
        _checks.positive_int(arg, v)
    _checks.non_negative_number("min_time", min_time)
    previous = torch.get_num_threads()  # restored on return: the caller's process keeps its setting
    if threads is not None:
        torch.set_num_threads(_checks.positive_int("threads", threads))
    try:
        ff_dim = ff_dim or 4 * hidden_dim
        device = torch.device(device)
        if accuracy_task_options is None:
            accuracy_task_options = {"vocab_size": 256} if accuracy_task == "mqar" else {}
        settings = _settings(hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads, ff_dim=ff_dim,
                             vocab_size=vocab_size, batch_size=batch_size, dtype=str(dtype), device=str(device),
                             repeats=repeats, min_time=min_time, seed=seed, accuracy_task=accuracy_task,
                             accuracy_task_options=dict(accuracy_task_options or {}), accuracy_steps=accuracy_steps,
                             accuracy_batch_size=accuracy_batch_size, accuracy_lr=accuracy_lr,
                             memory_kind="cuda_peak_allocated" if device.type == "cuda" else "saved_for_backward",
                             timing="interleaved rounds")
        settings["device"] = device
        results = _empty(names, lengths, metrics, settings)
        built, inputs = {}, {}
        untimed = [m for m in metrics if m != "inference_time"]
        cells = [(n, t) for n in names for t in lengths]
        for name, T in tqdm(cells, desc="building" + ("" if not untimed else " and measuring " + ", ".join(untimed)),
                            disable=not progress, file=sys.stderr):
            try:
                model = built.setdefault(name, _build(name, vocab_size, hidden_dim, num_layers, num_heads, ff_dim,
                                                      device, dtype))
                ids = torch.randint(0, vocab_size, (batch_size, T), generator=torch.Generator().manual_seed(seed + T))
                inputs[name, T] = ids.to(device)
                j = lengths.index(T)
                if "memory_usage" in metrics:
                    results[name]["memory_usage"][j] = activation_bytes(model, inputs[name, T])["bytes"]
                if "accuracy" in metrics:
                    results[name]["accuracy"][j] = _accuracy(name, T, settings)
            except RuntimeError as err:  # e.g. out of memory: recorded for the cell, the sweep goes on
                inputs.pop((name, T), None)
                _fail(results, name, T, err)
        if "inference_time" in metrics:
            fns = {key: (lambda m=built[key[0]], x=ids: m(x)) for key, ids in inputs.items()}
            with torch.inference_mode():
                _timed_rounds(results, fns, repeats, seed, progress, min_time)
        settings["device"] = str(device)
        for name in names:
            results[name]["parameters"] = built[name].num_parameters() if name in built else None
        return results
    finally:
        torch.set_num_threads(previous)


def scaling_analysis(seq_lengths=(256, 512, 1024, 2048), models=None, metrics=("time", "memory", "flops"),
                     **kwargs) -> dict:
    """Like :func:`compare_models` with the scaling metrics: ``time`` (median forward seconds, timed in
    interleaved rounds with ``time_spread``, ``time_min``, ``time_repeats``, ``time_waits`` and the run's
    ``"noise"`` record as compare_models keeps them for ``inference_time``), ``memory``
    (activation bytes, as ``memory_usage``) and ``flops``: analytic forward FLOPs of each mechanism
    (:func:`bsbr.evals.flops.analytic_flops`, matmuls over the blocks the fast path computes) in ``flops``, with
    FlopCounterMode's count of the same forward beside it in ``flops_counted`` (it does not see the fused CPU
    SDPA kernel, in-place ``baddbmm_`` or triangular solves, so it is lower for Standard, Hopfield, BSBR and
    DeltaNet), and the analytic parts per length in ``flops_parts``."""
    lengths, names, metrics = _validate(seq_lengths, models, metrics, SCALING_METRICS)
    mapped = [{"time": "inference_time", "memory": "memory_usage"}[m] for m in metrics if m != "flops"]
    progress = kwargs.pop("progress", True)
    base = compare_models(lengths, names, mapped or ["inference_time"], progress=progress, **kwargs) \
        if mapped else None
    results = {"schema": RESULTS_SCHEMA, "seq_lengths": lengths, "models": names, "metrics": metrics,
               "settings": base["settings"] if base else _settings(**kwargs)}
    for name in names:
        results[name] = {"parameters": base[name]["parameters"] if base else None}
        for m in metrics:
            if m == "flops":
                continue
            src = {"time": "inference_time", "memory": "memory_usage"}[m]
            results[name][m] = base[name][src]
            if m == "time":  # the spread, every repeat and the waits too, as time_spread, time_repeats, ...
                results[name].update({f"time{k}": base[name][f"inference_time{k}"] for k in TIME_KEYS})
        if base and "errors" in base[name]:
            results[name]["errors"] = base[name]["errors"]
    if base and "noise" in base:
        results["noise"] = base["noise"]
    if "flops" in metrics:
        hd, nl = kwargs.get("hidden_dim", 128), kwargs.get("num_layers", 2)
        nh, ff = kwargs.get("num_heads", 4), kwargs.get("ff_dim") or 4 * kwargs.get("hidden_dim", 128)
        vocab = kwargs.get("vocab_size", 256)
        for name in names:
            model = _build(name, vocab, hd, nl, nh, ff, "cpu", torch.float32)
            analytic = [analytic_flops(model, T) for T in lengths]
            results[name]["flops"] = [a["total"] for a in analytic]
            results[name]["flops_parts"] = [a["parts"] for a in analytic]
            results[name]["flops_counted"] = [count_flops(model, torch.randint(0, vocab, (1, T))) for T in lengths]
            results[name]["parameters"] = results[name]["parameters"] or model.num_parameters()
    return results
