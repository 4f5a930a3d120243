"""Checkpoints: model and optimizer tensors in safetensors files, everything else in JSON.

Layout of ``<out_dir>/checkpoint/``: ``model.safetensors`` (tied weights handled by safetensors'
save_model), ``optimizer.safetensors`` (every tensor of the optimizer state, keyed ``<param>.<name>``, plus
the random-number-generator states), ``state.json`` (step, optimizer param groups, early-stop bookkeeping).
A checkpoint is written to a temporary folder and renamed into place, so an interruption while writing
leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write model, optimizer, RNG states and ``state`` (JSON-able) to folder ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict] = {}
    for pid, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {**state, "param_groups": opt["param_groups"], "optimizer_scalars": scalars}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    device: torch.device | str = "cpu") -> dict:
    """Restore ``model`` (and ``optimizer`` and the RNG states) from folder ``path``; return its state dict."""
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r} (state.json missing)")
    meta = json.loads((path / "state.json").read_text())
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("rng."):
                continue
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value.to(device) if name != "step" else value
        for pid, entries in meta["optimizer_scalars"].items():
            state.setdefault(int(pid), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.cpu"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    return {k: v for k, v in meta.items() if k not in ("param_groups", "optimizer_scalars")}
