"""bsbr.utils.cells: the resumable loop of ExperimentRunner and the experiment grids; one-file-per-cell store."""

from __future__ import annotations

import json

from bsbr.utils.cells import CellFiles, run_cells


def test_run_cells_runs_only_unrecorded_cells_and_saves_each_at_once(tmp_path):
    store = CellFiles(tmp_path / "cells")
    store.save("a", {"x": 1})
    ran, events = [], []

    def compute(key):
        def go():
            if ran:  # the cell run before this one is on disk already
                assert store.finished(ran[-1]) == {"x": ran[-1]}
            ran.append(key)
            return {"x": key}
        return go

    out = run_cells([(k, compute(k)) for k in ("a", "b", "c")], store, lambda i, k, what: events.append((i, k, what)))
    assert ran == ["b", "c"] and out == {"a": {"x": 1}, "b": {"x": "b"}, "c": {"x": "c"}}
    assert [e[:2] for e in events] == [(0, "a"), (1, "b"), (1, "b"), (2, "c"), (2, "c")]
    assert events[0][2] == "skipped" and events[1][2] == "started" and isinstance(events[2][2], float)
    assert json.loads((tmp_path / "cells" / "c.json").read_text()) == {"x": "c"}
    assert not list((tmp_path / "cells").glob("*.tmp"))


def test_run_cells_asks_the_store_at_each_cells_turn():
    """A cell another process finished while this one ran an earlier cell is skipped, not run twice."""

    class Memory:
        def __init__(self):
            self.runs = {}

        def finished(self, key):
            return self.runs.get(key)

        def save(self, key, result):
            self.runs[key] = result

    store = Memory()

    def first():
        store.save("second", {"by": "other"})
        return {"by": "this"}

    out = run_cells([("first", first), ("second", lambda: {"by": "this"})], store)
    assert out == {"first": {"by": "this"}, "second": {"by": "other"}}
    assert run_cells([("a", lambda: {"n": 1})]) == {"a": {"n": 1}}  # no store: every cell runs, nothing is kept
