"""Peak memory during training: the CUDA allocator's peak on GPU, the process's peak resident set on CPU."""

from __future__ import annotations

import resource
import sys

import torch


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Reset at construction; ``peak()`` is the highest memory use since then.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only).  CPU on Linux: the process's peak resident set
    (VmHWM) after resetting it through /proc/self/clear_refs, so it includes the interpreter and torch
    themselves; ``kind`` says which ("cuda_allocated", "process_rss" or "process_rss_since_start" when the
    reset is refused and the value is the lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_allocated"
            return
        self.kind = "process_rss_since_start"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.kind = "process_rss"
        except OSError:
            pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _vm_hwm()
        if hwm is not None:
            return hwm
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
