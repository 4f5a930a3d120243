"""train(): one loop for every registered model and every task.

AdamW (no weight decay on biases, norms and embeddings), linear warmup then cosine decay, gradient
clipping, bf16 autocast where supported, optional gradient checkpointing, periodic evaluation on the valid
split with early stopping, a JSONL log line per step, safetensors checkpoints, and exact resumption: the
data of step s depends only on (task, seed, s), and the checkpoint holds weights, optimizer and RNG states,
so an interrupted run resumed from its out_dir ends where an uninterrupted one does.

Under ``torchrun --nproc_per_node=N`` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA) and each process takes its contiguous share of every global batch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist

from .. import _files as F
from ..tasks import Task
from ..tasks.base import derive_seed
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .evaluate import _autocast, evaluate
from .peak_memory import PeakMemory
from .steps import resume, run_steps, warmup_cosine


@dataclass
class TrainResult:
    history: list[dict]  # one record per optimizer step: step, loss, lr, grad_norm, tokens_per_second, ...
    final: dict  # evaluate() on the valid split after the last step
    seconds: float  # wall-clock training time, summed over resumed sessions (evaluation included)
    peak_memory_bytes: int  # see PeakMemory: CUDA allocator peak, or process peak RSS on CPU
    steps: int  # steps done (fewer than cfg.steps after an early stop)
    evals: list[dict] = field(default_factory=list)  # every periodic evaluation, with its step
    stopped: str = "completed"  # "completed", "early_stop" or "target_loss"
    steps_to_target: int | None = None  # first evaluated step with valid loss <= cfg.target_loss
    memory_kind: str = ""
    world_size: int = 1  # processes that trained (torchrun)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio * lr."""
    return warmup_cosine(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)


def make_optimizer(lm: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in lm.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _setup_distributed(device_kind: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(kind)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision == "fp32":
        return False
    supported = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if cfg.precision == "bf16" and not supported:
        raise ValueError(f"precision='bf16' is not supported on device {device}; use precision='fp32'")
    return cfg.precision == "bf16" or (device.type == "cuda" and supported)


def _run_description(lm, task: Task, cfg: TrainConfig) -> dict:
    model_cfg = lm.config.to_dict() if hasattr(lm, "config") and hasattr(lm.config, "to_dict") else None
    skip = ("out_dir", "progress", "device", "checkpoint_every")
    return {"model": model_cfg, "task": {"name": task.name, **task.options},
            "train": {k: v for k, v in cfg.to_dict().items() if k not in skip}}


def train(lm: torch.nn.Module, task: Task, cfg: TrainConfig, callback=None, before_step=None) -> TrainResult:
    """Train ``lm`` (a CausalLM whose vocab covers ``task.vocab_size``) on ``task`` with ``cfg``.

    With ``cfg.out_dir`` set: writes ``config.json`` (model, task, training settings), ``log.jsonl`` (one JSON
    object per step and per evaluation), ``checkpoint/`` and ``result.json``; if a checkpoint of the same run is
    there, training resumes from it.  Ctrl-C / SIGTERM finish the current step, save a checkpoint and raise
    KeyboardInterrupt.  ``callback(record)`` is called after every step (it may raise to stop the run);
    ``before_step(index)`` before every optimizer step with its 0-based index, a resumed run's first new step
    included, so a schedule that changes the model by step (e.g. the chunks a layer selects while training) gives
    a resumed run what an uninterrupted one had.
    Returns a :class:`TrainResult`.
    """
    _check_arguments(lm, task, cfg)
    run = _Run.start(lm, task, cfg)
    memory = PeakMemory(run.device)
    lm.train()
    session_start = time.perf_counter()
    seconds_before = run.state["seconds"]

    def one_step() -> dict:
        if before_step is not None:
            before_step(run.state["step"])
        record = run.step()
        run.state["step"] = record["step"]
        run.state["seconds"] = record["seconds"] = seconds_before + time.perf_counter() - session_start
        record["peak_memory_bytes"] = memory.peak()
        run.log_record(record)
        if cfg.eval_every and run.state["step"] % cfg.eval_every == 0 and run.state["step"] < cfg.steps:
            _evaluate_and_check(lm, task, cfg, run.device, run.bf16, run.state, run.evals, run.log)
        run.state["peak_memory_bytes"] = max(run.state["peak_memory_bytes"], memory.peak())
        if callback is not None:
            callback(record)
        return record

    try:
        run_steps(one_step, run.state, cfg.steps, run.checkpoint, checkpoint_every=cfg.checkpoint_every,
                  desc=f"train {task.name}", progress=cfg.progress and run.rank == 0)
    finally:
        if run.log is not None:
            run.log.close()
    return run.finish(memory, seconds_before, session_start)


def _check_arguments(lm: torch.nn.Module, task: Task, cfg: TrainConfig) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a bsbr.tasks.Task (from get_task), got {type(task).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    vocab = getattr(getattr(lm, "config", None), "vocab_size", None)
    if vocab is not None and vocab < task.vocab_size:
        raise ValueError(f"model vocab_size={vocab} is smaller than task {task.name!r} vocab_size={task.vocab_size}")


@dataclass
class _Run:
    """What one call of :func:`train` works with: the model (``model`` is its DDP wrapper under torchrun), the
    optimizer, device and process rank, the run's state (step, seconds, early-stop bookkeeping; what a checkpoint
    holds besides weights, optimizer and RNG), the history and evaluations so far, and where it writes."""

    lm: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    task: Task
    cfg: TrainConfig
    device: torch.device
    bf16: bool
    rank: int
    world: int
    out: Path | None
    state: dict
    history: list[dict]
    evals: list[dict]
    log: TextIO | None = None

    @classmethod
    def start(cls, lm: torch.nn.Module, task: Task, cfg: TrainConfig) -> _Run:
        """Place the model, build the optimizer, seed the process, and resume from ``cfg.out_dir`` if it holds a
        checkpoint of the same run."""
        rank, world, local_rank = _setup_distributed("cuda" if cfg.device in ("auto", "cuda") and
                                                     torch.cuda.is_available() else "cpu")
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
        device = _resolve_device(cfg, local_rank)
        bf16 = _use_bf16(cfg, device)
        lm.to(device)
        if cfg.gradient_checkpointing:
            if not hasattr(lm, "gradient_checkpointing_enable"):
                raise ValueError("gradient_checkpointing=True needs a model with gradient_checkpointing_enable()")
            lm.gradient_checkpointing_enable()
        optimizer = make_optimizer(lm, cfg)
        torch.manual_seed(derive_seed("train", cfg.seed, rank))

        out = Path(cfg.out_dir) if cfg.out_dir else None
        history: list[dict] = []
        evals: list[dict] = []
        state = {"step": 0, "seconds": 0.0, "best_loss": None, "bad_evals": 0, "stopped": None,
                 "steps_to_target": None, "peak_memory_bytes": 0}
        if out is not None:
            state, history, evals = _prepare_out_dir(out, lm, optimizer, _run_description(lm, task, cfg), device,
                                                     state, rank)
        model = lm
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(lm, device_ids=[device.index] if device.type == "cuda"
                                                              else None)
        log = open(out / "log.jsonl", "a") if out is not None and rank == 0 else None  # noqa: SIM115
        return cls(lm, model, optimizer, task, cfg, device, bf16, rank, world, out, state, history, evals, log)

    def step(self) -> dict:
        """One optimizer step on this process's share of the global batch of step ``state["step"]``; returns the
        step's record (step, loss averaged over processes, lr, grad_norm, tokens_per_second)."""
        cfg, step = self.cfg, self.state["step"]
        per_rank = cfg.batch_size // self.world
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.task.batch("train", cfg.batch_size, step).rows(self.rank * per_rank, (self.rank + 1) * per_rank)
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.bf16):
            loss = self.model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                              return_logits=False).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.lm.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else
                                              float("inf"))
        self.optimizer.step()
        loss_value = loss.detach().float()
        if self.world > 1:
            dist.all_reduce(loss_value)
            loss_value /= self.world
        dt = time.perf_counter() - t0
        tokens = cfg.batch_size * batch.input_ids.shape[1]  # (a curriculum's rows change length)
        return {"step": step + 1, "loss": float(loss_value), "lr": lr, "grad_norm": float(norm),
                "tokens_per_second": tokens / dt}

    def log_record(self, record: dict) -> None:
        self.history.append(record)
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")

    def checkpoint(self) -> Path | None:
        """Save a checkpoint of the run as it stands (process 0 with an out_dir only); returns where, or None."""
        if self.out is None or self.rank != 0:
            return None
        if self.log is not None and not self.log.closed:
            self.log.flush()  # the log holds every step the checkpoint does
        save_checkpoint(self.out / "checkpoint", self.lm, self.optimizer, self.state)
        return self.out / "checkpoint"

    def finish(self, memory: PeakMemory, seconds_before: float, session_start: float) -> TrainResult:
        """Evaluate on the valid split, save the last checkpoint and result.json, and return the result (its seconds
        count this session from ``session_start``, the final evaluation included, plus ``seconds_before``)."""
        cfg, state = self.cfg, self.state
        final = evaluate(self.lm, self.task, "valid", cfg.batch_size, cfg.eval_batches, self.device, self.bf16)
        final["step"] = state["step"]
        state["seconds"] = seconds_before + time.perf_counter() - session_start
        if state["stopped"] is None:
            state["stopped"] = "completed"
        result = TrainResult(history=self.history, final=final, seconds=state["seconds"],
                             peak_memory_bytes=max(state["peak_memory_bytes"], memory.peak()), steps=state["step"],
                             evals=self.evals, stopped=state["stopped"], steps_to_target=state["steps_to_target"],
                             memory_kind=memory.kind, world_size=self.world)
        if self.checkpoint() is not None:
            summary = {k: v for k, v in result.__dict__.items() if k != "history"}
            (self.out / "result.json").write_text(json.dumps(summary, indent=1))
        return result


def _evaluate_and_check(lm, task, cfg, device, bf16, state, evals, log) -> None:
    metrics = evaluate(lm, task, "valid", cfg.batch_size, cfg.eval_batches, device, bf16)
    lm.train()
    record = {"event": "eval", "step": state["step"], **{k: v for k, v in metrics.items() if not isinstance(v, list)}}
    evals.append(record)
    if log is not None:
        log.write(json.dumps(record) + "\n")
    loss = metrics["loss"]
    if state["best_loss"] is None or loss < state["best_loss"]:
        state["best_loss"], state["bad_evals"] = loss, 0
    else:
        state["bad_evals"] += 1
    if cfg.target_loss is not None and loss <= cfg.target_loss:
        if state["steps_to_target"] is None:
            state["steps_to_target"] = state["step"]
        state["stopped"] = "target_loss"
    elif cfg.early_stop_patience and state["bad_evals"] >= cfg.early_stop_patience:
        state["stopped"] = "early_stop"


def _prepare_out_dir(out: Path, lm, optimizer, description: dict, device, state: dict, rank: int):
    """Create ``out`` or resume from its checkpoint; returns (state, history, evals) so far.

    Everything in ``out`` is read and checked before anything there is written: a damaged or foreign
    config.json, checkpoint or log.jsonl is a ValueError naming the file, and the run's files stay as they were.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file; expected a directory for the run (new or to resume)")
    cfg_path = out / "config.json"
    history: list[dict] = []
    evals: list[dict] = []
    if cfg_path.is_file():
        saved = F.read_json(cfg_path, "the run description bsbr train writes (model, task, train)")
        if not isinstance(saved, dict):
            F.fail(cfg_path, (), saved, "an object with the run's 'model', 'task' and 'train'")
        wanted = json.loads(json.dumps(description))
        if saved != wanted:
            diff = "; ".join(F.json_differences(saved, wanted))
            raise ValueError(f"out_dir {str(out)!r} holds a different run (saved vs this run: {diff}); use a new "
                             f"out_dir")
        steps = description["train"]["steps"]

        def at_most_steps(meta: dict, ckpt: Path) -> None:
            if meta["step"] > steps:
                raise ValueError(f"{ckpt / 'state.json'}: field 'step' is {meta['step']}; expected at most the "
                                 f"run's {steps} steps")

        loaded, records = resume(out, lm, optimizer, lambda rec, ckpt: rec["step"] <= ckpt["step"],
                                 check=at_most_steps, device=device, write=rank == 0)
        if loaded is not None:
            state = loaded
            state["stopped"] = None if state.get("stopped") == "completed" else state.get("stopped")
            for rec in records:
                (evals if rec.get("event") == "eval" else history).append(rec)
    else:
        found = [n for n in ("checkpoint", "checkpoint.old", "log.jsonl", "result.json") if (out / n).exists()]
        if found:
            raise ValueError(f"out_dir {str(out)!r} holds {found} but no config.json, so it is not a run this "
                             "version can resume; use a new out_dir (nothing there was changed)")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(json.dumps(description, indent=1))
            (out / "log.jsonl").write_text("")
    return state, history, evals
