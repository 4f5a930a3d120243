"""What every training loop of the library shares: the learning-rate schedule, the step loop (progress bar,
periodic checkpoints, a graceful stop on Ctrl-C / SIGTERM) and resuming a run from its directory.

A run directory holds ``checkpoint/`` (:func:`bsbr.train.checkpoint.save_checkpoint`) and ``log.jsonl`` (one JSON
object per line, each with an integer ``step``).  :func:`bsbr.train.train` and :func:`bsbr.convert.heal` both run
on these pieces; each keeps only what its steps do and what its checkpoint must match.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from .. import _files as F
from .checkpoint import check_checkpoint, load_checkpoint


def warmup_cosine(step: int, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``steps``: linear warmup over ``warmup_steps`` to
    ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step (and held there after it)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is always taken at a step boundary.
    A second signal stops at once (KeyboardInterrupt).  Outside the main thread no handler is installed."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_steps(step: Callable[[], dict], state: dict, total: int, checkpoint: Callable[[], Path | None], *,
              checkpoint_every: int = 0, desc: str = "train", progress: bool = True) -> None:
    """Call ``step()`` until ``state["step"]`` reaches ``total`` or ``state.get("stopped")`` is set.

    ``step()`` does one optimizer step, advances ``state["step"]`` by one and returns the step's record (its
    ``"loss"`` is shown on the progress bar).  ``checkpoint()`` saves the run as it stands and returns where (None
    if this process saves nothing); it is called every ``checkpoint_every`` steps (0: not here), and on Ctrl-C /
    SIGTERM, which let the current step finish, save, and raise KeyboardInterrupt.  Any other exception propagates
    without a checkpoint: the run resumes from the last one saved.
    """
    bar = tqdm(total=total, initial=state["step"], desc=desc, unit="step", file=sys.stderr, disable=not progress,
               leave=False)
    try:
        with StopRequest() as stop:
            while state["step"] < total and not state.get("stopped"):
                record = step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if checkpoint_every and state["step"] % checkpoint_every == 0:
                    checkpoint()
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        saved = checkpoint()
        if saved is not None:
            print(f"\ninterrupted after step {state['step']}; checkpoint saved in {saved}", file=sys.stderr)
        raise
    finally:
        bar.close()


def last_checkpoint(out: Path) -> Path | None:
    """The run's last complete checkpoint: ``checkpoint/``, or ``checkpoint.old/`` if an interruption struck
    between save_checkpoint's two renames; None if there is none yet."""
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / "state.json").is_file():
            return out / name
    if (out / "checkpoint").exists():
        raise ValueError(f"{out / 'checkpoint'}: is not a complete checkpoint (state.json missing); move it away to "
                         "start the run again")
    return None


def read_log(path: Path) -> tuple[list[dict], bool]:
    """The records of log.jsonl and whether the file needs rewriting (it is missing, or its last line was cut
    short: the process was killed while writing it, so the line is dropped); any other unreadable line is a
    ValueError."""
    if not path.exists():
        return [], True
    what = "the training log (one JSON object per line, each with an integer 'step')"
    lines = F.decode_text(F.read_bytes(path, what), path, what).split("\n")
    torn = lines[-1] != ""
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = F.parse_json(line, path, what, line=i + 1)
        except ValueError:
            if torn and i == len(lines) - 1:
                continue
            raise
        if not isinstance(rec, dict) or not F.is_int(rec.get("step")) or rec["step"] < 0:
            raise ValueError(f"{path}: line {i + 1} is {F.show(rec)}; expected an object with a non-negative "
                             "integer 'step'")
        records.append(rec)
    return records, torn


def resume(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           keep: Callable[[dict, dict], bool], *, check: Callable[[dict, Path], None] | None = None,
           device: torch.device | str = "cpu", training_state: bool = True,
           write: bool = True) -> tuple[dict | None, list[dict]]:
    """Resume the run in directory ``out``: load its last complete checkpoint into ``model`` and ``optimizer``
    (and the RNG states) and return ``(state, records)``: the checkpoint's state and the records of
    ``out/log.jsonl`` that ``keep(record, state)`` accepts (those of the steps the checkpoint holds).  With
    ``write`` the log is rewritten to hold exactly those, so the steps to be redone are logged once.  Without a
    checkpoint returns ``(None, [])`` and empties the log.

    Everything is read and checked before anything is loaded or written: the checkpoint against the model and
    optimizer (:func:`~bsbr.train.checkpoint.check_checkpoint`), then ``check(state_json, path)``, which may refuse
    the run with a ValueError, then the log.
    """
    log = out / "log.jsonl"
    ckpt = last_checkpoint(out)
    if ckpt is None:
        if write and log.is_file() and log.stat().st_size:
            log.write_text("")
        return None, []
    meta = check_checkpoint(ckpt, model, optimizer, training_state)
    if check is not None:
        check(meta, ckpt)
    records, rewrite = read_log(log)
    state = load_checkpoint(ckpt, model, optimizer, device, training_state)
    kept = [r for r in records if keep(r, state)]
    if write and (rewrite or len(kept) != len(records)):
        log.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return state, kept
