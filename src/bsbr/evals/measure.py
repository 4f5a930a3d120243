"""Meters: wall time (median of warm repeats, spread kept), activation memory, FLOPs, parameters."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import _checks


def time_callable(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA synchronised).

    Returns {"median", "p25", "p75", "min", "max", "repeats", "times"} in seconds.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {**summarize(times), "repeats": repeats, "times": times}


def summarize(times: list[float]) -> dict:
    """{"median", "p25", "p75", "min", "max"} of a non-empty list (quartiles interpolated within [min, max])."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "min": min(times), "max": max(times)}


def activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> dict:
    """Activation memory of one forward + backward of ``model(input_ids)`` (hidden states or logits).

    CUDA: ``max_memory_allocated`` above the level before the forward ("cuda_peak_allocated").  CPU: the bytes
    of the distinct tensor storages autograd saves for backward, parameters excluded ("saved_for_backward") —
    what a forward must keep alive until backward, independent of the allocator and of other processes.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    cuda = input_ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(input_ids.device)
        before = torch.cuda.memory_allocated(input_ids.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids)
    out = out.logits if hasattr(out, "logits") else out
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    if cuda:
        peak = torch.cuda.max_memory_allocated(input_ids.device) - before
        return {"bytes": int(peak), "kind": "cuda_peak_allocated"}
    return {"bytes": int(sum(saved.values())), "kind": "saved_for_backward"}


def count_flops(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Forward FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``.

    It counts matmul-like ops only, ignores causal masks, and does not see every fused kernel (on CPU the
    flash-attention kernel behind ``scaled_dot_product_attention``, in-place ``baddbmm_`` and triangular solves
    are not counted): read it beside :func:`bsbr.evals.flops.analytic_flops`, not instead of it.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids)
    return int(counter.get_total_flops())


def _calls_for(fn, min_time: float, sync) -> int:
    """Calls of ``fn`` that take ``min_time`` seconds in a row, measured by calling it for that long."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or n >= 10_000:
            break
    return min(10_000, max(1, math.ceil(min_time / (elapsed / n)))) if elapsed > 0 else 10_000


def time_interleaved(fns: dict, rounds: int, *, control=None, seed: int = 0, probe=None, progress=None,
                     min_time: float = 0.0) -> dict:
    """Time every callable of ``fns`` ({key: fn}) once per round for ``rounds`` rounds after one warm-up round,
    each round in a new random order, so that a burst of background load falls on every cell alike instead of
    on the cells that happened to run during it.

    ``min_time`` (seconds): a cell whose warm-up call took less is called on in the warm-up round until
    ``min_time`` has passed, then ``ceil(min_time / mean time per call)`` times in a row per timing (at most
    10,000), and its time is the mean per call, as ``timeit`` does (a first call is often several times slower
    than the next, so it alone would set too few calls): one call
    of a fraction of a millisecond is at the mercy of a single interrupt or page fault (on a quiet 2-core CI
    machine an A/A control of 0.5 ms single calls read 1.64 / 1.02 / 1.40).

    ``control`` (a key of ``fns``) is timed a second time in every round, at a random place in the other half of
    the round from its first timing: the A/A control whose max / min is 1 on a steady machine.  ``probe`` (a
    :class:`bsbr.evals.noise.Probe`) reads the run-queue wait share of our threads during each call and the runnable
    threads of other processes before it.  A key whose call raises RuntimeError (out of memory) is dropped from
    later rounds and its message kept.  ``progress(n)`` is called after each call (a tqdm's ``update``).

    Returns {"cells": {key: {"times": [s per call, per round], "waits": [wait per round or None], "calls": calls
    per timing}}, "errors": {key:
    message}, "control_ratios": [max/min of the control's two timings per round], "control_pairs": [[the
    control's timing in the round's first half, in its second half] per round], "others": [mean runnable
    threads of other processes per round or None]}; times in seconds, CUDA synchronised.
    """
    import random

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rng = random.Random(seed)
    min_time = _checks.non_negative_number("min_time", min_time)
    cells = {key: {"times": [], "waits": [], "calls": 1} for key in fns}
    errors: dict = {}
    ratios, pairs, others = [], [], []

    def timed(key):
        n = cells[key]["calls"]
        mark = probe.mark() if probe else None
        t0 = time.perf_counter()
        for _ in range(n):
            fns[key]()
        sync()
        dt = (time.perf_counter() - t0) / n
        return dt, (probe.wait(mark) if probe else None)

    for r in range(rounds + 1):  # round 0 warms up
        live = [k for k in fns if k not in errors]
        order = rng.sample(live, len(live))
        extra = None
        if r and control in live:  # the control's second timing goes into the half its first timing is not in
            i, half = order.index(control), (len(order) + 1) // 2  # halves of the round: [0, half), [half, n + 1)
            extra = rng.randint(half, len(order)) if i < half else rng.randint(0, half - 1)
            order.insert(extra, control)
        seen, pair, load = set(), [], []
        for pos, key in enumerate(order):
            if key in errors:
                continue
            if probe:
                load.append(probe.others())
            try:
                dt, wait = timed(key)
            except RuntimeError as err:  # e.g. out of memory: recorded, the other cells go on
                errors[key] = str(err).splitlines()[0] if str(err) else type(err).__name__
                continue
            finally:
                if progress:
                    progress(1)
            if not r and dt < min_time:  # warm-up: call on for min_time to set the calls per timing
                cells[key]["calls"] = _calls_for(fns[key], min_time, sync)
            if key == control and r:
                pair.append(dt)
            if r and (key not in seen) and not (key == control and pos == extra):
                seen.add(key)
                cells[key]["times"].append(dt)
                cells[key]["waits"].append(wait)
        if len(pair) == 2 and min(pair) > 0:
            ratios.append(max(pair) / min(pair))
            pairs.append(pair)
        if r:
            load = [v for v in load if v is not None]
            others.append(statistics.fmean(load) if load else None)
    for key in errors:
        cells[key] = {"times": [], "waits": [], "calls": cells[key]["calls"]}
    return {"cells": cells, "errors": errors, "control_ratios": ratios, "control_pairs": pairs, "others": others}
