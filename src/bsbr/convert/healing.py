"""Healing a converted model: train the new weights so BSBR takes over from the attention it replaces.

Three stages, each run on the training loop's pieces (:mod:`bsbr.train.steps`: its schedule, step loop, graceful
stop and resume), so a killed run continues from its last checkpoint with the same data order:

1. ``"transfer"`` — attention transfer.  Each layer's BSBR output is trained to match the original softmax
   attention output of the same q, k, v (relative MSE), while the layer passes the *original* output on, so every
   layer learns from the activations of the original model.  One forward of the frozen model per step plus a small
   backward per layer through the BSBR weights only: cheap.
2. ``"distill"`` — end-to-end distillation: the KL divergence from the original model's next-token distribution
   (the same model run with its original attention, no gradient) to the converted model's, through the whole
   converted model.  Unlike the transfer, every layer trains on the activations it will see.
3. ``"finetune"`` — a short language-model fine-tune of the same weights through the whole converted model
   (next-token loss on the training text).

Only the BSBR weights (meta queries, meta keys, gates, compression maps) train; the pretrained weights stay as they
are.  Checkpoints hold only the trained tensors and the optimizer (safetensors), plus JSON state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from .. import _checks, _files
from ..train.checkpoint import save_checkpoint
from ..train.steps import resume, run_steps, warmup_cosine
from .backends import BSBR_IMPL
from .families import bsbr_modules
from .masks import _key_validity, bsbr_mask

TRANSFER_IMPL = "bsbr_transfer"
STAGES = ("transfer", "distill", "finetune")
MIN_LR_RATIO = 0.1  # the cosine decays to 10% of lr


def transfer_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Return the original causal softmax attention; on the side, back-propagate the relative MSE between BSBR's
    output for the same q, k, v and it into the layer's BSBR weights (recorded in ``module.bsbr.transfer_losses``)."""
    if _key_validity(attention_mask, key.shape[2]) is not None:
        raise ValueError("attention transfer takes unpadded windows (attention_mask all ones)")
    B, H, T, d = query.shape
    G = H // key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    k, v = (t.repeat_interleave(G, dim=1) if G > 1 else t for t in (key, value))
    target = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
    meta = module.bsbr
    with torch.enable_grad():
        out = meta.segment(query.detach(), key.detach(), value.detach(), scaling).out
        loss = (out - target.detach()).pow(2).mean() / target.detach().pow(2).mean().clamp(min=1e-12)
        if loss.requires_grad:
            loss.backward()
    meta.transfer_losses.append(loss.item())
    return target.transpose(1, 2).contiguous(), None


AttentionInterface.register(TRANSFER_IMPL, transfer_attention_forward)
try:  # the transfer pass needs only the padding mask, as BSBR does
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(TRANSFER_IMPL, bsbr_mask)
except ImportError:  # pragma: no cover
    pass


@dataclass
class HealConfig:
    """One healing stage.  ``steps`` optimizer steps of ``batch_size`` windows of ``seq_len`` tokens; AdamW at
    ``lr`` with ``warmup`` linear warm-up steps then cosine decay to 10%; a checkpoint every ``save_every`` steps."""

    stage: str = "transfer"
    steps: int = 100
    lr: float = 1e-3
    seq_len: int = 2048
    batch_size: int = 1
    warmup: int = 10
    weight_decay: float = 0.0
    save_every: int = 10

    def __post_init__(self):
        _checks.one_of("stage", self.stage, STAGES)
        _checks.non_negative_int("steps", self.steps)
        _checks.positive_int("seq_len", self.seq_len)
        _checks.positive_int("batch_size", self.batch_size)
        _checks.non_negative_int("warmup", self.warmup)
        _checks.positive_int("save_every", self.save_every)
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")


class _Trained(nn.Module):
    """The trained tensors of a converted model, under names safetensors accepts; shares the model's Parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = [n for n, _ in model.named_parameters() if ".bsbr." in n]
        params = dict(model.named_parameters())
        self.params = nn.ParameterDict({n.replace(".", "__"): params[n] for n in self.names})


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the BSBR weights; return those."""
    metas = bsbr_modules(model)
    if metas[0].uses_blocks:
        raise ValueError("retrieval='blocks' has no BSBR weights to heal (it is training-free); healing trains the "
                         "state readout's weights: convert with retrieval='states'")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(".bsbr." in name)
        if ".bsbr." in name:
            trained.append(p)
    return trained


def distill_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(original || converted) of the next-token distributions of ``ids`` [B, T].

    The original is the same model run with its original attention (``set_attention(model, "original")``) under
    ``no_grad``: a converted model keeps every pretrained weight, so no second copy is needed.  The model's BSBR
    attention is restored before the converted forward, whose graph carries the gradient.
    """
    from .to_bsbr import set_attention

    impl = model.config._attn_implementation
    try:
        set_attention(model, "original")
        with torch.no_grad():
            teacher = F.log_softmax(_wide(model(ids, use_cache=False).logits), dim=-1)
    finally:
        model.set_attn_implementation(impl)
    student = F.log_softmax(_wide(model(ids, use_cache=False).logits), dim=-1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision logits would round the KL away); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def heal(model: nn.Module, batch_at: Callable[[int], torch.Tensor], cfg: HealConfig, out_dir: str | Path,
         progress: bool = True) -> list[dict]:
    """Run one healing stage on a converted model, resuming from ``out_dir`` if it holds a checkpoint of it.

    ``batch_at(step)`` returns the input_ids [batch_size, seq_len] of a step (the same for the same step, so a
    resumed run sees the data a whole run would).  Writes ``out_dir/checkpoint/`` and ``out_dir/log.jsonl``
    (step, loss, per-layer transfer losses, lr, tokens, seconds) and returns the log's records.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = trainable_parameters(model)
    trained = _Trained(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    description = {"config": asdict(cfg), "trained": trained.names}

    def same_run(saved: dict, ckpt: Path) -> None:
        if saved.get("description", {}).get("config", {}).get("stage") != cfg.stage:
            raise ValueError(f"{ckpt}: a checkpoint of stage {saved.get('description', {}).get('config')} "
                             f"cannot resume stage {cfg.stage!r}; use another out_dir")
        if saved["description"]["trained"] != trained.names:
            raise ValueError(f"{ckpt}: its trained tensors are not this model's BSBR weights")
        # the rest of the settings shape the run (steps set the schedule's length): resuming with others would
        # give a run no single setting produces; how often it saves does not change it
        old = {k: v for k, v in saved["description"]["config"].items() if k != "save_every"}
        new = {k: v for k, v in description["config"].items() if k != "save_every"}
        if old != new:
            diff = "; ".join(_files.json_differences(old, json.loads(json.dumps(new))))
            raise ValueError(f"{ckpt}: a checkpoint of other healing settings (saved vs this run: {diff}); resume "
                             "with the same settings or use another out_dir")

    # a record's "step" is the 0-based step it logs: those before the checkpoint's step count are kept
    state, records = resume(out, trained, opt, lambda rec, ckpt: rec["step"] < ckpt["step"], check=same_run,
                            device=params[0].device, training_state=False)
    if state is None:
        state = {"step": 0, "tokens": 0, "seconds": 0.0}
    state.pop("description", None)
    first = state["step"]
    was_training = model.training
    model.train(False)  # no dropout: healing fits a deterministic map
    impl = model.config._attn_implementation
    model.set_attn_implementation(TRANSFER_IMPL if cfg.stage == "transfer" else BSBR_IMPL)
    metas = bsbr_modules(model)
    log = (out / "log.jsonl").open("a")

    def one_step() -> dict:
        step = state["step"]
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, MIN_LR_RATIO)
        ids = batch_at(step)
        opt.zero_grad(set_to_none=True)
        record = {"step": step, "lr": opt.param_groups[0]["lr"]}
        if cfg.stage == "transfer":
            for m in metas:
                m.transfer_losses = []
            with torch.no_grad():
                model(ids, use_cache=False)
            layers = [m.transfer_losses[-1] for m in metas]
            record["loss"] = sum(layers) / len(layers)
            record["layer_losses"] = layers
        else:
            loss = distill_loss(model, ids) if cfg.stage == "distill" else model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            record["loss"] = loss.item()
        opt.step()
        state["step"] = step + 1
        state["tokens"] += ids.numel()
        state["seconds"] += time.perf_counter() - t0
        record.update(tokens=state["tokens"], seconds=round(state["seconds"], 2))
        records.append(record)
        log.write(json.dumps(record) + "\n")
        return record

    def checkpoint() -> Path:
        log.flush()  # the log holds every step the checkpoint does
        save_checkpoint(out / "checkpoint", trained, opt, {**state, "description": description})
        return out / "checkpoint"

    try:
        run_steps(one_step, state, cfg.steps, checkpoint, checkpoint_every=cfg.save_every, desc=f"heal:{cfg.stage}",
                  progress=progress)
        if state["step"] > first and state["step"] % cfg.save_every:  # the last steps, since the last checkpoint
            checkpoint()
    finally:
        log.close()
        model.set_attn_implementation(impl)
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(False)
    return records
