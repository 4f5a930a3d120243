"""Checkpoints: model and optimizer tensors in safetensors files, everything else in JSON.

Layout of ``<out_dir>/checkpoint/``: ``model.safetensors`` (tied weights handled by safetensors'
save_model), ``optimizer.safetensors`` (every tensor of the optimizer state, keyed ``<param>.<name>``, plus
the random-number-generator states), ``state.json`` (step, optimizer param groups, early-stop bookkeeping).
A checkpoint is written to a temporary folder and renamed into place, so an interruption while writing
leaves the previous one intact (as ``checkpoint.old`` if it strikes between the two renames).

:func:`check_checkpoint` reads all three files and compares them with the model and optimizer before
anything is loaded: a truncated or foreign file, or a checkpoint of another model or size, is a ValueError
naming the file and the first tensor or field that does not match, and the model is left untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .. import _files as F

STOPPED = ("completed", "early_stop", "target_loss")


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
    if path.exists():  # (else a previous checkpoint.old is the last complete one: kept until the new one is in place)
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if F.is_int(value) or isinstance(value, float):
        return "number"
    if isinstance(value, list | tuple):
        return f"list of {len(value)} {'/'.join(sorted({_kind(v) for v in value}))}"
    return type(value).__name__


def _model_tensors(model: torch.nn.Module) -> tuple[dict, list[list[str]]]:
    """{name: (dtype, shape)} of the model's state dict, and the groups of names that share one tensor (tied
    weights: save_model writes one name of each group)."""
    expected, groups = {}, {}
    for name, t in model.state_dict().items():
        expected[name] = (F.ST_DTYPE.get(str(t.dtype), str(t.dtype)), tuple(t.shape))
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        groups.setdefault(key, []).append(name)
    return expected, [g for g in groups.values() if len(g) > 1]


def _describe(model: torch.nn.Module) -> str:
    c = getattr(model, "config", None)
    if all(hasattr(c, k) for k in ("attention", "hidden_dim", "num_layers", "vocab_size")):
        return (f"this {type(model).__name__} ({c.attention}, hidden_dim {c.hidden_dim}, {c.num_layers} layer(s), "
                f"vocab {c.vocab_size})")
    return f"this {type(model).__name__}"


def check_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     training_state: bool = True) -> dict:
    """Check checkpoint folder ``path`` against ``model`` (and ``optimizer``) without loading anything; returns
    the parsed state.json.  Raises FileNotFoundError if there is no checkpoint and ValueError naming the file
    and the first field or tensor that does not match otherwise.  ``training_state=False`` checks only the
    ``step`` and ``seconds`` fields (checkpoints of other loops, e.g. healing a converted model)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r} (state.json missing)")
    sp = path / "state.json"
    meta = F.mapping(sp, F.read_json(sp, "a checkpoint's state.json"), (), "an object {...} (a checkpoint's state)")

    def field(key, expected):
        return F.get(sp, meta, key, (), expected)  # every version of save_checkpoint wrote all of them

    F.int_at_least(sp, field("step", "the number of steps done"), ("step",), 0)
    F.number_at_least(sp, field("seconds", "the training seconds so far"), ("seconds",))
    if not training_state:
        return _check_files(path, meta, model, optimizer)
    F.int_at_least(sp, field("bad_evals", "the evaluations without improvement"), ("bad_evals",), 0)
    F.int_at_least(sp, field("peak_memory_bytes", "the peak memory so far"), ("peak_memory_bytes",), 0)
    F.int_at_least(sp, field("steps_to_target", "null or a step"), ("steps_to_target",), 0, none=True)
    best = field("best_loss", "null or the best valid loss")
    if best is not None and not F.is_number(best):
        F.fail(sp, ("best_loss",), best, "a finite number or null")
    if field("stopped", f"null or one of {list(STOPPED)}") not in (None, *STOPPED):
        F.fail(sp, ("stopped",), meta["stopped"], f"null or one of {list(STOPPED)}")
    return _check_files(path, meta, model, optimizer)


def _check_files(path: Path, meta: dict, model: torch.nn.Module, optimizer) -> dict:
    mp = path / "model.safetensors"
    expected, tied = _model_tensors(model)
    found = F.safetensors_header(mp)
    what = _describe(model)
    F.check_tensors(mp, found, expected, what, frozenset(n for g in tied for n in g))
    for group in tied:
        if not any(n in found for n in group):
            raise ValueError(f"{mp}: tensor {group[0]!r} is missing; expected {what}")
    if optimizer is not None:
        _check_optimizer(path, meta, optimizer)
    return meta


def _check_optimizer(path: Path, meta: dict, optimizer: torch.optim.Optimizer) -> None:
    sp, op = path / "state.json", path / "optimizer.safetensors"
    groups = F.list_of(sp, F.get(sp, meta, "param_groups", (), "the optimizer's parameter groups"),
                       ("param_groups",), len(optimizer.param_groups), "a list",
                       "one per parameter group of the optimizer")
    params, start = [], 0
    for i, (saved, current) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        F.mapping(sp, saved, ("param_groups", i))
        ids = list(range(start, start + len(current["params"])))
        if saved.get("params") != ids:
            F.fail(sp, ("param_groups", i, "params"), saved.get("params"),
                   f"parameter ids {ids[0]}..{ids[-1]}" if ids else "no parameters")
        for key, value in current.items():
            if key in ("params", "param_names"):
                continue
            got = F.get(sp, saved, key, ("param_groups", i), f"the optimizer setting {key!r}")
            if value is None or isinstance(value, bool):  # flags such as foreach / fused may be null
                ok = got is None or isinstance(got, bool)
            else:
                ok = _kind(got) == _kind(value)
            if not ok:
                F.fail(sp, ("param_groups", i, key), got, f"a {_kind(value)} like {show_setting(value)}")
        params += current["params"]
        start += len(current["params"])
    scalars = F.mapping(sp, meta.get("optimizer_scalars", {}), ("optimizer_scalars",))
    for pid, entries in scalars.items():
        if not (pid.isdigit() and int(pid) < len(params)):
            F.fail(sp, ("optimizer_scalars",), pid, f"parameter ids 0..{len(params) - 1} as keys")
        F.mapping(sp, entries, ("optimizer_scalars", pid))
    found = F.safetensors_header(op)
    rng = ("U8", tuple(torch.get_rng_state().shape))
    if found.get("rng.cpu") != rng:
        got = f"{found['rng.cpu'][0]} {list(found['rng.cpu'][1])}" if "rng.cpu" in found else "missing"
        raise ValueError(f"{op}: tensor 'rng.cpu' is {got}; expected U8 {list(rng[1])} (the CPU random-number-"
                         "generator state)")
    for name, (dtype, shape) in found.items():
        if name.startswith("rng."):
            if not (name == "rng.cpu" or (name[9:].isdigit() and name.startswith("rng.cuda.") and dtype == "U8"
                                          and len(shape) == 1)):
                raise ValueError(f"{op}: holds tensor {name!r}; expected only rng.cpu and rng.cuda.<i> beside the "
                                 "optimizer state")
            continue
        pid, _, key = name.partition(".")
        if not (pid.isdigit() and int(pid) < len(params) and key):
            raise ValueError(f"{op}: holds tensor {name!r}; expected <parameter id 0..{len(params) - 1}>.<state name>")
        p = params[int(pid)]
        want = () if key == "step" else tuple(p.shape)
        if shape != want or dtype not in (("F32", "F64") if key == "step" else (F.ST_DTYPE.get(str(p.dtype)),)):
            raise ValueError(f"{op}: tensor {name!r} is {dtype} {list(shape)}; expected "
                             f"{'a scalar' if key == 'step' else F.ST_DTYPE.get(str(p.dtype))} {list(want)} for "
                             f"parameter {pid} of this optimizer")


def show_setting(value) -> str:
    return F.show(list(value) if isinstance(value, tuple) else value)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    device: torch.device | str = "cpu", training_state: bool = True) -> dict:
    """Restore ``model`` (and ``optimizer`` and the RNG states) from folder ``path``; return its state dict.
    Everything is checked first (:func:`check_checkpoint`): a bad checkpoint raises ValueError and loads nothing."""
    path = Path(path)
    meta = check_checkpoint(path, model, optimizer, training_state)
    try:
        return _load(path, meta, model, optimizer, device)
    except Exception as err:  # anything the checks above did not foresee: still name the checkpoint
        raise ValueError(f"{path}: the checkpoint could not be loaded ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err


def _load(path: Path, meta: dict, model, optimizer, device) -> dict:
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("rng."):
                continue
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value.to(device) if name != "step" else value
        for pid, entries in meta.get("optimizer_scalars", {}).items():
            state.setdefault(int(pid), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.cpu"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    return {k: v for k, v in meta.items() if k not in ("param_groups", "optimizer_scalars")}
