"""Memory of a model on one input: peak and current bytes (CUDA allocator) or activation bytes (CPU).

Also the three ``torch.cuda`` memory calls researchers already write — :func:`reset_peak_memory_stats`,
:func:`max_memory_allocated`, :func:`memory_allocated` — made to work on CPU too: on a CUDA device they are
torch.cuda's; on CPU they report this process's resident memory (Linux ``/proc/self/status``: VmHWM, the
high-water mark, reset by writing 5 to ``/proc/self/clear_refs``; VmRSS, the current size).  Process RSS
includes everything the process holds (parameters, the Python heap, the allocator's cached pages), so read it as
a difference from a baseline taken after a reset, as the CUDA figures usually are.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..evals.measure import activation_bytes


def analyze_memory_usage(model: torch.nn.Module, input_ids: torch.Tensor, backward: bool = True) -> dict:
    """Measure what one forward (+ backward when ``backward``) of ``model(input_ids)`` needs.

    CUDA: ``peak_memory`` = ``max_memory_allocated`` after a reset and ``current_memory`` = ``memory_allocated``
    afterwards (kind "cuda_allocator").  CPU: ``peak_memory`` = bytes of the tensors saved for backward,
    parameters excluded (kind "saved_for_backward"; with ``backward=False`` a forward under no_grad saves
    nothing, so the bytes of the output are reported, kind "output"), ``current_memory`` = parameter bytes.
    All values in bytes; ``*_mb`` keys give MiB.
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(input_ids.device)
        if backward:
            activation_bytes(model, input_ids)
        else:
            with torch.no_grad():
                model(input_ids)
        peak, current, kind = (torch.cuda.max_memory_allocated(input_ids.device),
                               torch.cuda.memory_allocated(input_ids.device), "cuda_allocator")
    elif backward:
        peak, current, kind = activation_bytes(model, input_ids)["bytes"], params, "saved_for_backward"
    else:
        with torch.no_grad():
            out = model(input_ids)
        out = out.logits if hasattr(out, "logits") else out
        peak, current, kind = out.numel() * out.element_size(), params, "output"
    return {"peak_memory": int(peak), "current_memory": int(current), "parameter_bytes": int(params), "kind": kind,
            "peak_memory_mb": peak / 2**20, "current_memory_mb": current / 2**20}


def _cpu(device) -> bool:
    if device is None:
        return not torch.cuda.is_available()
    return torch.device(device).type == "cpu"


def _proc_status_bytes(field: str) -> int:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError as err:
        raise RuntimeError(f"CPU memory figures need Linux /proc/self/status ({err})") from None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory_stats(device=None) -> None:
    """Start a new peak.  CUDA: ``torch.cuda.reset_peak_memory_stats``.  CPU: reset this process's RSS
    high-water mark to its current RSS (``/proc/self/clear_refs``; where that is refused the peak keeps counting
    from process start, an overestimate the caller can see as ``max_memory_allocated() > memory_allocated()``
    before any work)."""
    if not _cpu(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def max_memory_allocated(device=None) -> int:
    """Peak bytes since the last :func:`reset_peak_memory_stats`: the CUDA allocator's, or on CPU the process's
    peak resident memory (VmHWM)."""
    return torch.cuda.max_memory_allocated(device) if not _cpu(device) else _proc_status_bytes("VmHWM")


def memory_allocated(device=None) -> int:
    """Bytes held now: the CUDA allocator's, or on CPU the process's resident memory (VmRSS)."""
    return torch.cuda.memory_allocated(device) if not _cpu(device) else _proc_status_bytes("VmRSS")
