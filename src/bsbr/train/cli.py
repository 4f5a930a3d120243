"""``bsbr train``: train a registered model on a task from a preset, a JSON file and command-line overrides.

    bsbr train --preset mqar-small --model Standard --set steps=500 --out-dir runs/mqar-std
    bsbr train --resume runs/mqar-std          # the same run, continued from its last checkpoint
    torchrun --nproc_per_node=2 -m bsbr train --preset tiny --out-dir runs/ddp

A spec has three parts: "task" (name, seq_len and task options), "model" (name, sizes and mechanism
options) and "train" (TrainConfig fields).  Later sources override earlier ones: preset, --config, flags.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

import torch

from .. import _files as F
from ..models import build_model
from ..models.config import ModelConfig
from ..tasks import get_task
from .config import PRESETS, TrainConfig
from .evaluate import evaluate
from .loop import train

_MODEL_SIZES = ("hidden_dim", "num_layers", "num_heads", "ff_dim", "dropout")


def _parse_pairs(pairs: list[str], flag: str) -> dict:
    out = {}
    for item in pairs or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def build_spec(args: argparse.Namespace) -> dict:
    """Merge preset, --config file and flags into {"task": {...}, "model": {...}, "train": {...}}."""
    if getattr(args, "resume", None):
        return _resume_spec(args)
    spec = copy.deepcopy(PRESETS[args.preset]) if args.preset else {"task": {}, "model": {}, "train": {}}
    if args.config:
        for part, section in read_config(args.config).items():
            spec[part].update(section)
    if args.task:
        spec["task"]["name"] = args.task
    if args.seq_len:
        spec["task"]["seq_len"] = args.seq_len
    spec["task"].update(_parse_pairs(args.task_opt, "--task-opt"))
    if args.model:
        spec["model"]["name"] = args.model
    for key in _MODEL_SIZES:
        if getattr(args, key) is not None:
            spec["model"][key] = getattr(args, key)
    spec["model"].update(_parse_pairs(args.model_opt, "--model-opt"))
    spec["train"].update(_parse_pairs(args.set, "--set"))
    if args.out_dir:
        spec["train"]["out_dir"] = args.out_dir
    if "name" not in spec["task"] or "name" not in spec["model"]:
        raise ValueError("say which task and model to train: --preset NAME, or --task and --model")
    return spec


_CONFIG = "a JSON object with optional 'task', 'model' and 'train' sections, each an object"


def read_config(path: str | Path) -> dict:
    """Read a ``--config`` file: {"task": {...}, "model": {...}, "train": {...}} (each optional).  A file that is
    not such an object, or whose 'train' section is not a valid TrainConfig, is a ValueError naming the file and
    the field; the other sections' values are checked when the spec is built (:func:`build_run`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--config file {str(path)!r} does not exist")
    data = F.mapping(path, F.read_json(path, _CONFIG), (), _CONFIG)
    unknown = set(data) - {"task", "model", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; expected task, model, train")
    for part, section in data.items():
        F.mapping(path, section, (part,), f"an object of {part} settings")
        for key in section:
            if not key:
                F.fail(path, (part,), key, "option names that are non-empty strings")
    for part in ("task", "model"):
        if "name" in data.get(part, {}):
            F.string(path, data[part]["name"], (part, "name"))
    try:
        TrainConfig.from_dict(data.get("train", {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: section 'train': {err}") from None
    return data


def build_run(spec: dict, origin: str | None = None) -> tuple:
    """(task, model, TrainConfig) built from ``spec``; an error says which section of the spec it is in (and
    ``origin``, where the spec came from)."""
    for part in ("task", "model", "train"):
        if not isinstance(spec.get(part), dict):
            raise ValueError(f"the spec's {part!r} section must be an object, got {spec.get(part)!r}")
    task_opts = dict(spec["task"])
    with _section("task", origin):
        task = get_task(task_opts.pop("name", None), **task_opts)
    with _section("train", origin):
        cfg = TrainConfig.from_dict(spec["train"])
    model_opts = dict(spec["model"])
    with _section("model", origin):
        name = model_opts.pop("name", None)
        hidden = model_opts.pop("hidden_dim", 128)
        sizes = {"hidden_dim": hidden, "num_layers": model_opts.pop("num_layers", 2),
                 "num_heads": model_opts.pop("num_heads", 4),
                 "ff_dim": model_opts.pop("ff_dim", 4 * hidden if F.is_int(hidden) else hidden),
                 "dropout": model_opts.pop("dropout", 0.0)}
        vocab = model_opts.pop("vocab_size", task.vocab_size)
        torch.manual_seed(cfg.seed)  # same initial weights in every process and every resumed session
        lm = build_model(name, vocab_size=vocab, causal_lm=True, **sizes, **model_opts)
    return task, lm, cfg


@contextlib.contextmanager
def _section(part: str, origin: str | None):
    try:
        yield
    except (TypeError, ValueError) as err:
        raise ValueError(f"the spec's {part!r} section{f' ({origin})' if origin else ''}: {err}") from None


_RUN = "the run description bsbr train writes (an object with 'model', 'task' and 'train')"


def spec_from_run(path: str | Path) -> dict:
    """The spec of the run in directory ``path``, rebuilt from the config.json that :func:`train` wrote there
    (``train`` then checks that the rebuilt run is the same one and resumes it from its checkpoint)."""
    run = Path(path)
    if not run.is_dir():
        raise FileNotFoundError(f"--resume {str(run)!r}: no such directory")
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{run}: holds no run to resume (config.json missing); start one with --out-dir")
    desc = F.mapping(cfg_path, F.read_json(cfg_path, _RUN), (), _RUN)
    parts = {part: F.mapping(cfg_path, F.get(cfg_path, desc, part, (), f"the run's {part} settings"), (part,))
             for part in ("task", "model", "train")}
    try:
        model = ModelConfig.from_dict(parts["model"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: field 'model': {err}") from None
    try:
        TrainConfig.from_dict(parts["train"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: field 'train': {err}") from None
    F.string(cfg_path, parts["task"].get("name"), ("task", "name"))
    return {"task": dict(parts["task"]),
            "model": {"name": model.attention, "vocab_size": model.vocab_size, "hidden_dim": model.hidden_dim,
                      "num_layers": model.num_layers, "num_heads": model.num_heads, "ff_dim": model.ff_dim,
                      "dropout": model.dropout, "norm": model.norm, "tie_embeddings": model.tie_embeddings,
                      **model.attention_kwargs},
            "train": {**parts["train"], "out_dir": str(run)}}


def _resume_spec(args: argparse.Namespace) -> dict:
    given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config), ("--task", args.task),
                                      ("--seq-len", args.seq_len), ("--task-opt", args.task_opt),
                                      ("--model", args.model), ("--model-opt", args.model_opt),
                                      *((f"--{k.replace('_', '-')}", getattr(args, k)) for k in _MODEL_SIZES))
             if value]
    if given:
        raise ValueError(f"--resume reads the run's task, model and settings from its config.json; drop {given}")
    if args.out_dir and Path(args.out_dir) != Path(args.resume):
        raise ValueError(f"--resume {args.resume} and --out-dir {args.out_dir} name different directories")
    spec = spec_from_run(args.resume)
    spec["train"].update(_parse_pairs(args.set, "--set"))  # e.g. progress=false, device=cpu, checkpoint_every=100
    return spec


def run_spec(spec: dict, eval_split: str | None = "test", origin: str | None = None) -> dict:
    """Build task, model and config from ``spec``, train, and evaluate on ``eval_split``; returns a summary."""
    task, lm, cfg = build_run(spec, origin)
    name = spec["model"]["name"]
    result = train(lm, task, cfg)
    summary = {"model": name, "parameters": lm.num_parameters(), "task": task.options | {"name": task.name},
               "steps": result.steps, "stopped": result.stopped, "seconds": result.seconds,
               "peak_memory_bytes": result.peak_memory_bytes, "memory_kind": result.memory_kind,
               "world_size": result.world_size,
               "final_valid": result.final, "steps_to_target": result.steps_to_target}
    if eval_split:
        summary[f"final_{eval_split}"] = evaluate(lm, task, eval_split, cfg.batch_size, cfg.eval_batches)
    return summary


def _cmd(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = build_spec(args)
    origin = f"preset, --config {args.config} and flags merged" if args.config else None
    if getattr(args, "resume", None):
        origin = f"rebuilt from {Path(args.resume) / 'config.json'}"
    if args.print_spec:
        build_run(spec, origin)  # checked: it builds
        print(json.dumps(spec, indent=1))
        return 0
    summary = run_spec(spec, None if args.eval_split == "none" else args.eval_split, origin)
    if int(os.environ.get("RANK", "0")) == 0:
        out = spec["train"].get("out_dir")
        if out:
            Path(out, "summary.json").write_text(json.dumps(summary, indent=1))
        lines = [f"{summary['model']} on {summary['task']['name']}: {summary['steps']} steps in "
                 f"{summary['seconds']:.1f} s ({summary['stopped']}), peak memory "
                 f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB ({summary['memory_kind']})"]
        for key in ("final_valid", f"final_{args.eval_split}"):
            if key in summary:
                m = summary[key]
                lines.append(f"  {key[6:]:5s} loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}  "
                             f"bits/token {m['bits_per_token']:.4f}")
        print("\n".join(lines), file=sys.stdout)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on a task (presets, JSON configs, torchrun-ready)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a task + model + training budget that go together")
    p.add_argument("--config", help="JSON file with optional 'task', 'model' and 'train' sections")
    p.add_argument("--task", help="task name (see bsbr.tasks.list_tasks())")
    p.add_argument("--seq-len", type=int, help="tokens per row")
    p.add_argument("--task-opt", action="append", metavar="KEY=VALUE", help="task option (repeatable)")
    p.add_argument("--model", help="model name (see bsbr.models.list_models())")
    p.add_argument("--hidden-dim", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--ff-dim", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="mechanism option, e.g. chunk_size=64")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="TrainConfig field, e.g. steps=500")
    p.add_argument("--out-dir", help="log, checkpoints and results go here; an existing run resumes")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, with the task, model "
                   "and settings it was started with (--set may change progress, device, checkpoint_every)")
    p.add_argument("--eval-split", default="test", choices=("valid", "test", "none"),
                   help="split evaluated after training (default test)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--print-spec", action="store_true", help="check that the merged spec builds, print it and exit")
    p.set_defaults(func=_cmd)
