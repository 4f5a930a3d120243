"""Meters: wall time (median of warm repeats, spread kept), activation memory, FLOPs, parameters."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


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
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3  # within [min, max]
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "min": min(times), "max": max(times),
            "repeats": repeats, "times": times}


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
