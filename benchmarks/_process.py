"""Process-wide settings the CPU benchmarks apply before torch starts, for every model and op they time alike.

Imported before torch and called only when a benchmark runs as a script (``if __name__ == "__main__"``), so that
importing a benchmark module from the tests changes nothing.

- Transparent huge pages for PyTorch's CPU allocations (``THP_MEM_ALLOC_ENABLE=1``, read once when torch
  starts): large fresh tensors otherwise fault in 4 KiB at a time.  ``--no-thp`` measures without.
- Fixed glibc malloc thresholds far above any tensor the benchmarks make.  With glibc's defaults, memory freed at
  the end of one forward goes back to the system and the next forward faults it in again; on the benchmark host
  that added a length-dependent cost to every model (docs/baselines.md, "Memory allocator").  glibc reads these
  at start-up, so the script re-executes itself once with them.  ``--default-malloc`` measures with the defaults.
  (The library's run-time equivalent, ``bsbr.utils.memory.fix_malloc_thresholds``, goes through ``mallopt``,
  which caps the mmap threshold at 32 MiB; the environment route here has no cap and acts from the first
  allocation.)
"""

from __future__ import annotations

import os
import sys

MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def configure(argv: list[str] | None = None) -> None:
    """Apply the settings above for this process (re-executing it once for the malloc thresholds)."""
    argv = sys.argv if argv is None else argv
    if "--no-thp" not in argv:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if "--default-malloc" not in argv and any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.environ.update(MALLOC)
        os.execv(sys.executable, [sys.executable, *argv])


def describe() -> dict:
    """The settings in force, for the results header."""
    return {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "malloc": " ".join(f"{k}={os.environ[k]}" for k in MALLOC if k in os.environ) or "glibc defaults"}
