"""Training: a tiny model learns, resume equals an uninterrupted run, schedule, config, evaluate, CLI, DDP."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsbr.cli import main as cli_main
from bsbr.models import build_model
from bsbr.tasks import get_task
from bsbr.train import TrainConfig, evaluate, lr_at, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run far faster (and reproducibly) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_lm(task, name="BSBR", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    opts = {"chunk_size": 8} if name == "BSBR" else {}
    return build_model(name, vocab_size=task.vocab_size, hidden_dim=32, num_layers=2, num_heads=2, ff_dim=64,
                       dropout=dropout, causal_lm=True, **opts)


def quick(**kw) -> TrainConfig:
    base = {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "eval_every": 0, "eval_batches": 1,
            "progress": False}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name", ["BSBR", "Standard"])
def test_tiny_model_learns_recall(name):
    # MQAR with 2 pairs, values from 8 tokens.  Loss on the scored values: ln 16 = 2.77 for a uniform guess over
    # the vocabulary, ln 8 = 2.08 for a uniform guess over the values, ln 2 = 0.69 for a guess between the row's
    # two values, 0 for perfect recall.  Bound: 1.4 (measured: about 1.1 for BSBR at 150 steps).
    task = get_task("mqar", seq_len=32, vocab_size=16, num_kv_pairs=2)
    lm = tiny_lm(task, name)
    before = evaluate(lm, task, "valid", 32, 2)["loss"]
    result = train(lm, task, quick(steps=150, batch_size=32, lr=1e-2, warmup_steps=10, weight_decay=0.0))
    assert before > 2.5
    assert result.final["loss"] < 1.4, f"{name} valid loss {result.final['loss']:.3f} after 150 steps"
    assert result.history[-1]["step"] == 150 and len(result.history) == 150


@pytest.mark.parametrize("how", ["exception", "sigint"])
def test_resume_after_interrupt_equals_uninterrupted(tmp_path, how):
    task = get_task("mqar", seq_len=32, vocab_size=32, num_kv_pairs=3)
    cfg = dict(steps=12, eval_every=4, eval_batches=1)  # dropout on: the RNG state must be restored too
    ref = tiny_lm(task, dropout=0.1)
    full = train(ref, task, quick(**cfg))

    def interrupt(record):
        if record["step"] == 7:
            if how == "sigint":  # Ctrl-C: the loop finishes the step, saves, then raises KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt

    lm = tiny_lm(task, dropout=0.1)
    indices = []
    with pytest.raises(KeyboardInterrupt):
        train(lm, task, quick(**cfg, out_dir=str(tmp_path)), callback=interrupt, before_step=indices.append)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 7
    lm2 = tiny_lm(task, dropout=0.1, seed=123)  # a fresh process: different initial weights, restored from disk
    resumed = train(lm2, task, quick(**cfg, out_dir=str(tmp_path)), before_step=indices.append)
    assert indices == list(range(12))  # before every step, the resumed session from its first new step
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in full.evals]
    for (k, a), b in zip(ref.state_dict().items(), lm2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert resumed.final["loss"] == full.final["loss"]
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "event" not in r] == list(range(1, 13))
    with pytest.raises(ValueError, match=r"holds a different run \(saved vs this run: .*train\.steps: 12 -> 13\)"):
        train(tiny_lm(task), task, quick(steps=13, out_dir=str(tmp_path)))


def test_resume_refusal_names_an_option_the_saved_run_lacks(tmp_path):
    """A run directory written before a task option existed is refused with that option named."""
    task = get_task("mqar", seq_len=32, vocab_size=16, num_kv_pairs=2)  # as MQAR runs were before 2026-12-04
    cfg = quick(steps=2, out_dir=str(tmp_path))
    train(tiny_lm(task), task, cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["task"].pop("answers_in_input") is False
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=re.escape("(saved vs this run: task.answers_in_input: (absent) -> False)")):
        train(tiny_lm(task), task, cfg)


def test_lr_schedule():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_train_config_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['step'\]"):
        TrainConfig.from_dict({"step": 3})
    with pytest.raises(TypeError):
        TrainConfig(stepz=3)
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig.preset("huge")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        TrainConfig.from_file(tmp_path / "missing.json")
    cfg = TrainConfig.preset("mqar-small", steps=7)
    assert cfg.steps == 7 and TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_evaluate_matches_model_loss_and_checks_vocab():
    task = get_task("listops", seq_len=48, max_depth=3)
    lm = tiny_lm(task).eval()
    metrics = evaluate(lm, task, "test", batch_size=4, num_batches=2)
    losses, counts = [], []
    for i in range(2):
        b = task.batch("test", 4, i)
        with torch.no_grad():
            losses.append(float(lm(b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss))
        counts.append(int((b.labels[:, 1:] != -100).sum()))
    expected = sum(x * c for x, c in zip(losses, counts, strict=True)) / sum(counts)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5) and metrics["total"] == sum(counts) == 8
    small = build_model("Standard", vocab_size=8, hidden_dim=16, num_layers=1, num_heads=2, ff_dim=32,
                        causal_lm=True)
    with pytest.raises(ValueError, match="vocab_size=8 is smaller than task 'listops' vocab_size=17"):
        evaluate(small, task)
    with pytest.raises(ValueError, match="vocab_size=8 is smaller"):
        train(small, task, quick())


def test_gradient_checkpointing_and_early_stop():
    task = get_task("mqar", seq_len=32, vocab_size=32, num_kv_pairs=3)
    plain = train(tiny_lm(task), task, quick(steps=4))
    ckpt = train(tiny_lm(task), task, quick(steps=4, gradient_checkpointing=True))
    for a, b in zip(plain.history, ckpt.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    stopped = train(tiny_lm(task), task, quick(steps=40, eval_every=2, target_loss=100.0))
    assert stopped.stopped == "target_loss" and stopped.steps == 2 and stopped.steps_to_target == 2
    bf16 = train(tiny_lm(task), task, quick(steps=2, precision="bf16"))
    assert math.isfinite(bf16.history[-1]["loss"]) and bf16.peak_memory_bytes > 0


def test_cli_train_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--set", "steps=6", "--set", "progress=false", "--set", "eval_every=3",
            "--out-dir", str(out), "--threads", "1"]
    assert cli_main(args) == 0
    assert "BSBR on mqar: 6 steps" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and "final_test" in summary
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert len([x for x in (out / "log.jsonl").read_text().splitlines() if '"event"' not in x]) == 6
    assert cli_main(["train", "--preset", "tiny", "--set", "stepz=3"]) == 2
    assert "unknown TrainConfig key(s) ['stepz']" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err


def _run_cli(extra: list[str], out: Path, nproc: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    common = ["-m", "bsbr", "train", "--preset", "tiny", "--set", "steps=8", "--set", "progress=false",
              "--set", "batch_size=8", "--set", "eval_every=0", "--eval-split", "none", "--threads", "1",
              "--out-dir", str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               *common]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert json.loads((out / "summary.json").read_text())["world_size"] == nproc
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines() if '"event"' not in x]


def test_ddp_two_processes_match_single_process(tmp_path):
    # ~20 s on the shared 2-core machine (two torchrun workers plus a single-process run)
    single = _run_cli([], tmp_path / "single", 1)
    ddp = _run_cli([], tmp_path / "ddp", 2)
    assert len(single) == len(ddp) == 8
    for step, (a, b) in enumerate(zip(single, ddp, strict=True)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), f"step {step + 1}: single {a} vs 2-process DDP {b}"
