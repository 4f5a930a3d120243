"""One resumable loop for the project's sweeps: run each cell of a grid once and save its result as soon as it
finishes, so that an interrupted sweep resumes where it stopped.

A *store* says which cells are finished and keeps each new result.  :class:`CellFiles` writes one JSON file per cell
(:class:`~bsbr.utils.research.ExperimentRunner` uses it); the experiment scripts keep every cell of a grid in one
results file (``experiments/_exp.py``), a store of its own.  The loop is :func:`run_cells`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol


class CellStore(Protocol):
    def finished(self, key: str) -> dict | None:
        """The result recorded for cell ``key``, or None when the cell has still to run."""

    def save(self, key: str, result: dict) -> None:
        """Record ``result`` for cell ``key`` (all at once: a cell on disk is always complete)."""


def run_cells(cells: Sequence[tuple[str, Callable[[], dict]]], store: CellStore | None = None,
              on_event: Callable[[int, str, str | float], None] | None = None) -> dict[str, dict]:
    """Run ``compute()`` for every ``(key, compute)`` of ``cells`` whose key ``store`` holds no result for, and save
    each result in ``store`` as soon as it is computed.  Returns {key: result} for every cell, recorded earlier or
    now, in the order of ``cells``.  Without a store every cell runs and nothing is kept.

    The store is asked about each cell just before its turn, so cells that another process finished meanwhile are
    skipped.  ``on_event(index, key, what)`` follows the progress: what is "skipped", "started", or the seconds the
    cell took once it is saved.
    """
    results: dict[str, dict] = {}
    for i, (key, compute) in enumerate(cells):
        done = store.finished(key) if store is not None else None
        if done is not None:
            results[key] = done
            if on_event is not None:
                on_event(i, key, "skipped")
            continue
        if on_event is not None:
            on_event(i, key, "started")
        t0 = time.perf_counter()
        results[key] = compute()
        if store is not None:
            store.save(key, results[key])
        if on_event is not None:
            on_event(i, key, time.perf_counter() - t0)
    return results


class CellFiles:
    """A cell store of one JSON file per cell, ``directory/<key>.json``, written through a temporary file and
    renamed into place.  ``read(path)`` reads a finished cell (it may refuse a damaged file; the default reads the
    JSON as it is)."""

    def __init__(self, directory: str | Path, read: Callable[[Path], dict] | None = None):
        self.directory = Path(directory)
        self.read = read or (lambda path: json.loads(path.read_text()))

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def finished(self, key: str) -> dict | None:
        path = self.path(key)
        return self.read(path) if path.exists() else None

    def save(self, key: str, result: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=float))
        tmp.replace(path)
