"""Healing a converted model (bsbr.convert.healing): the transfer, distillation and fine-tune stages each lower their
loss and train only the BSBR weights; a run killed or interrupted mid-stage resumes bitwise where an uninterrupted
one ends, and the distillation teacher is the original model."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import bsbr_modules, convert_to_bsbr  # noqa: E402

from hf_models import VOCAB, tiny  # noqa: E402


class _Killed(Exception):
    pass


@pytest.mark.parametrize("how", ["killed", "sigint"])
def test_healing_transfer_lowers_its_loss_and_resumes_exactly(tmp_path, how):
    """A run killed mid-step resumes from its last periodic checkpoint; Ctrl-C lets the step finish and saves at
    once (the step loop of bsbr.train.steps, as train() runs).  Either way the resumed run ends bitwise where an
    uninterrupted one does: weights, losses and learning rates."""
    from bsbr.convert import HealConfig, heal

    def fresh():
        return convert_to_bsbr(tiny("llama").float(), chunk_size=8, retrieval="states", gate_init=0.0)

    data = torch.randint(0, VOCAB, (12, 1, 48), generator=torch.Generator().manual_seed(11))
    cfg = HealConfig(stage="transfer", steps=12, lr=3e-2, seq_len=48, warmup=2, save_every=3)
    whole = fresh()
    records = heal(whole, lambda s: data[s], cfg, tmp_path / "whole", progress=False)
    assert records[-1]["loss"] < records[0]["loss"]
    assert len(records[0]["layer_losses"]) == 2

    def interrupted_at_7(step):
        if step == 7:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise _Killed
        return data[step]

    with pytest.raises(KeyboardInterrupt if how == "sigint" else _Killed):
        heal(fresh(), interrupted_at_7, cfg, tmp_path / "part", progress=False)
    saved = json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["step"]
    assert saved == (8 if how == "sigint" else 6)
    again = fresh()  # a new process: the model starts from its conversion, the checkpoint restores it
    resumed = heal(again, lambda s: data[s], cfg, tmp_path / "part", progress=False)
    assert [(r["step"], r["loss"], r["lr"], r["layer_losses"]) for r in resumed] == [
        (r["step"], r["loss"], r["lr"], r["layer_losses"]) for r in records]
    for a, b in zip(bsbr_modules(whole), bsbr_modules(again), strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="cannot resume stage"):
        heal(fresh(), lambda s: data[s], HealConfig(stage="finetune", steps=2, seq_len=48), tmp_path / "part",
             progress=False)


def test_healing_finetune_trains_only_the_bsbr_weights(tmp_path):
    from bsbr.convert import HealConfig, heal

    conv = convert_to_bsbr(tiny("gpt2").float(), chunk_size=8, retrieval="states", gate_init=0.5)
    before = {n: p.clone() for n, p in conv.named_parameters()}
    data = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(12))
    records = heal(conv, lambda s: data, HealConfig(stage="finetune", steps=4, lr=1e-2, seq_len=40, warmup=1),
                   tmp_path, progress=False)
    assert records[-1]["loss"] < records[0]["loss"]
    for n, p in conv.named_parameters():
        assert torch.equal(p, before[n]) != (".bsbr." in n), n


def test_distillation_teacher_is_the_original_and_the_stage_lowers_its_loss(tmp_path):
    from bsbr.convert import HealConfig, heal
    from bsbr.convert.healing import distill_loss

    original = tiny("llama")  # float64
    data = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(13))
    whole = convert_to_bsbr(copy.deepcopy(original), chunk_size=64)  # one chunk covers the input: the original
    assert abs(distill_loss(whole, data).item()) < 1e-12
    conv = convert_to_bsbr(copy.deepcopy(original), chunk_size=8, retrieval="states", gate_init=0.1)
    with torch.no_grad():  # the loss is KL(original || converted) against a separate copy of the original
        p = torch.log_softmax(original(data).logits, -1)
        q = torch.log_softmax(conv(data).logits, -1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    assert distill_loss(conv, data).item() == pytest.approx(expected.item(), rel=1e-9)
    assert conv.config._attn_implementation == "bsbr"  # the teacher pass leaves BSBR attention in place
    before = {n: t.clone() for n, t in conv.named_parameters()}
    conv = conv.float()
    records = heal(conv, lambda s: data.clone(), HealConfig(stage="distill", steps=6, lr=1e-2, seq_len=40, warmup=1),
                   tmp_path, progress=False)
    assert records[-1]["loss"] < records[0]["loss"]
    for n, t in conv.named_parameters():
        assert torch.equal(t.double(), before[n]) != (".bsbr." in n), n


def test_healing_refuses_to_resume_with_other_settings(tmp_path):
    """A checkpoint of 4 steps resumed as a run of 8 would continue on another schedule: refused, naming the field,
    and the run's files are left as they were; only save_every may differ."""
    from bsbr.convert import HealConfig, heal

    conv = convert_to_bsbr(tiny("gpt2").float(), chunk_size=8, retrieval="states", gate_init=0.5)
    data = torch.randint(0, 50, (1, 40))
    cfg = HealConfig(stage="finetune", steps=4, lr=1e-2, seq_len=40, warmup=1, save_every=2)
    heal(conv, lambda s: data, cfg, tmp_path, progress=False)
    files = {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()}
    with pytest.raises(ValueError, match=r"other healing settings .*steps: 4 -> 8"):
        heal(conv, lambda s: data, HealConfig(stage="finetune", steps=8, lr=1e-2, seq_len=40, warmup=1,
                                              save_every=2), tmp_path, progress=False)
    assert {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()} == files
    again = heal(conv, lambda s: data, HealConfig(stage="finetune", steps=4, lr=1e-2, seq_len=40, warmup=1,
                                                  save_every=3), tmp_path, progress=False)
    assert [r["step"] for r in again] == [0, 1, 2, 3]
