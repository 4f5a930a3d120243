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
import sys
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest mmap threshold glibc's mallopt accepts on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest it can say
_malloc_fixed = False


def fix_malloc_thresholds() -> bool:
    """Keep freed memory in this process between calls, so that CPU timings do not pay for page faults.

    glibc's malloc adjusts its thresholds as the process runs and hands large freed blocks back to the system;
    the next forward of a model then faults the same memory in again, page by page.  That cost grows with the
    tensors and so with the sequence length, is the same for every model, and bends timing-based scaling fits
    upward: on the development host a Linear backbone at T = 16,384 took 352.6 ms with glibc's defaults and
    268.6 ms with fixed thresholds, and its fitted exponent from 4,096 went from 1.20 to 1.04 (docs/baselines.md,
    "Memory allocator"; that benchmark fixes the thresholds through glibc's environment variables before it
    starts).  This fixes both at run time (``mallopt``): blocks up to 32 MiB come from the heap, and freed memory
    is not trimmed back to the system.

    One-way for the process: it keeps the memory it has freed, so resident-memory figures taken afterwards
    (:func:`max_memory_allocated` on CPU) read higher; ``compare_models``' CPU memory metric (bytes saved for
    backward) is unaffected.  ``bsbr compare``, ``bsbr scaling`` and ``bsbr ablate`` call it unless given
    ``--default-malloc``.  Returns True when applied, False where the C library is not glibc (nothing changes).
    """
    global _malloc_fixed
    import ctypes
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc's mallopt refused parameter {param} = {value}")
    _malloc_fixed = True
    return True


def malloc_setting() -> str:
    """What :func:`fix_malloc_thresholds` has done to this process, in words (for results' settings)."""
    return (f"fixed glibc thresholds (mmap {MMAP_THRESHOLD >> 20} MiB, no trim)" if _malloc_fixed
            else "allocator defaults")
