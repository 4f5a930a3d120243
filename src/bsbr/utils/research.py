"""ExperimentRunner: models x lengths sweeps that write every cell to disk and resume after an interruption."""

from __future__ import annotations

import sys
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from .. import _files
from ..models import build_model
from .cells import CellFiles, run_cells


def _read_cell(path: Path) -> dict:
    """A finished cell from disk; a damaged one is a ValueError naming it (it is not overwritten: move it away
    to have the cell measured again)."""
    what = "a finished cell: the JSON object run_experiment returned (move the file away to rerun the cell)"
    return _files.mapping(path, _files.read_json(path, what), (), what)


class ExperimentRunner:
    """Subclass and define ``setup`` (set ``self.models``: {name: model} or a list of registered names, and
    ``self.seq_lengths``), ``run_experiment(model, seq_length) -> dict`` and optionally ``analyze_results``.

    ``run()`` iterates models x lengths with a progress bar (through :func:`bsbr.utils.cells.run_cells`, the loop the
    experiment scripts' grids use too), seeding torch with ``seed + seq_length`` before each
    cell.  With ``out_dir`` each finished cell is written to ``out_dir/cells/<model>__<length>.json`` at once; a
    later ``run()`` over the same ``out_dir`` skips cells already there, so an interrupted sweep loses nothing (a
    cell file that is not a JSON object is a ValueError naming it, raised before any cell is measured).
    A cell that raises is recorded as {"error": ...} and the sweep goes on.  Returns {model: {length: dict}}.
    """

    model_options = {"vocab_size": 10000, "hidden_dim": 128, "num_layers": 2, "num_heads": 4, "ff_dim": 512,
                     "dropout": 0.0}

    def __init__(self, out_dir: str | Path | None = None, seed: int = 0, progress: bool = True):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.seed = seed
        self.progress = progress
        self.models: dict | list = {}
        self.seq_lengths: list[int] = []

    def setup(self) -> None:
        """Define ``self.models`` and ``self.seq_lengths`` (override)."""

    def run_experiment(self, model, seq_length: int) -> dict:
        raise NotImplementedError("subclasses define run_experiment(model, seq_length) -> dict of metrics")

    def analyze_results(self, results: dict):
        """Override to analyse what ``run()`` returned; the default returns the results unchanged."""
        return results

    @staticmethod
    def calculate_accuracy(outputs, labels: torch.Tensor | None = None) -> float | None:
        """Fraction of positions where argmax(outputs) equals ``labels`` (positions labelled -100 ignored).

        ``outputs``: logits [..., V] (or a model output with ``.logits``); ``labels``: [...] long.  Without
        labels there is nothing to compare against: returns None (and warns) rather than a made-up number."""
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        if labels is None:
            warnings.warn("calculate_accuracy got no labels: accuracy is undefined, returning None", stacklevel=2)
            return None
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"labels must have shape {list(logits.shape[:-1])}, got {list(labels.shape)}")
        keep = labels != -100
        if not bool(keep.any()):
            raise ValueError("labels has no scored position (all -100)")
        return float((logits.argmax(-1)[keep] == labels[keep]).float().mean())

    def _measure(self, model, T: int) -> dict:
        """One cell: seeded with ``seed + T``; a cell that raises is recorded as {"error", "traceback"}."""
        torch.manual_seed(self.seed + T)
        try:
            return dict(self.run_experiment(model, T))
        except (RuntimeError, ValueError, MemoryError) as err:
            return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=3)}

    def run(self) -> dict:
        self.setup()
        models = self.models
        if isinstance(models, list | tuple):
            models = {n: build_model(n, **self.model_options) for n in models}
        if not models or not self.seq_lengths:
            raise ValueError("setup() must set self.models (non-empty) and self.seq_lengths (non-empty)")
        cells = {f"{name}__{T}": (name, T) for name in models for T in self.seq_lengths}
        store = CellFiles(self.out_dir / "cells", read=_read_cell) if self.out_dir is not None else None
        if store is not None:  # every finished cell is read (and a damaged one refused) before any is measured
            for key in cells:
                store.finished(key)
        bar = tqdm(total=len(cells), desc=type(self).__name__, disable=not self.progress, file=sys.stderr)

        def advance(index: int, key: str, what) -> None:
            if what != "started":
                bar.update(1)

        try:
            done = run_cells([(key, partial(self._measure, models[name], T)) for key, (name, T) in cells.items()],
                             store, advance)
        finally:
            bar.close()
        results: dict = {name: {} for name in models}
        for key, (name, T) in cells.items():
            results[name][T] = done[key]
        return results
