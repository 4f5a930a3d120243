"""Every run directory, corpus and experiment cell a user hands the library is checked (the rules:
tests/fuzzing.py): resuming ``train()`` and ``bsbr train --resume`` from a mutated run, directory corpora and
``ExperimentRunner``'s finished cells."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bsbr.cli import main
from bsbr.models import build_model
from bsbr.tasks import get_task
from bsbr.train import TrainConfig, train
from bsbr.train.checkpoint import load_checkpoint
from bsbr.train.loop import make_optimizer
from bsbr.utils.research import ExperimentRunner

from fuzzing import (
    N_CELLS,
    N_CLI_RESUME,
    N_CORPUS,
    N_RESUME,
    call,
    cli,
    event,
    fuzz,
    mutated_bytes,
    mutated_file,
    mutated_json,
    mutated_safetensors,
    tree_hash,
    written,
)

# --- checkpoints and resume directories ------------------------------------------------------------------------

TASK = {"name": "mqar", "seq_len": 32, "vocab_size": 32, "num_kv_pairs": 3}


def _lm(hidden=32):
    torch.manual_seed(0)
    return build_model("BSBR", vocab_size=32, hidden_dim=hidden, num_layers=1, num_heads=2, ff_dim=64, dropout=0.0,
                       causal_lm=True, chunk_size=8)


def _cfg(out, **kw):
    return TrainConfig(steps=3, batch_size=4, warmup_steps=1, eval_every=2, eval_batches=1, progress=False,
                       out_dir=str(out), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run (hidden 32) and the checkpoint of a run of another size (hidden 48)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("runs")
    task = get_task(**TASK)
    train(_lm(), task, _cfg(base / "run"))
    train(_lm(48), task, _cfg(base / "other"))
    torch.set_num_threads(old)
    return base


RESUME_FILES = ["config.json", "log.jsonl", "checkpoint/state.json", "checkpoint/model.safetensors",
                "checkpoint/optimizer.safetensors"]


@st.composite
def mutated_run(draw, run: Path):
    """(relative path, new bytes) for one file of the run directory, or the other run's file in its place."""
    rel = draw(st.sampled_from(RESUME_FILES))
    data = (run / rel).read_bytes()
    if rel.endswith(".safetensors"):
        if draw(st.integers(0, 4)) == 0:
            return rel, (run.parent / "other" / rel).read_bytes()  # a checkpoint of another size
        return rel, draw(mutated_safetensors(data))
    if rel.endswith(".jsonl"):
        lines = [json.loads(x) for x in data.decode().splitlines()]
        return rel, draw(st.one_of(mutated_json(lines).map(lambda ls: "".join(json.dumps(x) + "\n" for x in ls)
                                                              .encode()), mutated_bytes(data)))
    return rel, draw(mutated_file(json.loads(data)))


@fuzz(N_RESUME)
@given(data=st.data())
def test_fuzz_resume_never_loses_the_run(runs, data):
    rel, content = data.draw(mutated_run(runs / "run"))
    event(f"mutated {rel}")
    task = get_task(**TASK)
    with written(rel, content, copy_of=runs / "run") as out:
        before = tree_hash(out)
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result, err = call(train, _lm(), task, _cfg(out), names=out)
        finally:
            torch.set_num_threads(old)
        if err is not None:
            assert tree_hash(out) == before, f"a failed resume changed the run's files ({err})"
        else:
            assert result.steps == 3


@fuzz(N_CLI_RESUME)
@given(data=st.data())
def test_fuzz_cli_train_resume(runs, data, capsys):
    rel, content = data.draw(mutated_run(runs / "run"))
    with written(rel, content, copy_of=runs / "run") as out:
        before = tree_hash(out)
        if cli(capsys, ["train", "--resume", str(out), "--set", "progress=false", "--eval-split", "none",
                        "--threads", "1"], out) != 0:
            assert tree_hash(out) == before


def test_checkpoint_errors_name_the_file_and_the_first_mismatched_tensor(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "run", out)
    model = out / "checkpoint" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated: its header describes [\d,]+ bytes"):
        load_checkpoint(out / "checkpoint", _lm(), None)
    shutil.copy(runs / "other" / "checkpoint" / "model.safetensors", model)
    lm = _lm()
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '[\w.]+' is F32 \[48\]; expected F32 \[32\]"):
        load_checkpoint(out / "checkpoint", lm, make_optimizer(lm, _cfg(out)))
    assert all(torch.equal(weights[k], v) for k, v in lm.state_dict().items()), "a failed load changed the model"
    shutil.copy(runs / "run" / "checkpoint" / "model.safetensors", model)
    shutil.copy(runs / "other" / "checkpoint" / "optimizer.safetensors", out / "checkpoint")
    with pytest.raises(ValueError, match=r"optimizer.safetensors: tensor '0.exp_avg' is F32 \[48, 48\]"):
        load_checkpoint(out / "checkpoint", lm, make_optimizer(lm, _cfg(out)))


def test_resume_refuses_a_directory_it_would_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs / "run", out)
    (out / "config.json").unlink()
    before = tree_hash(out)
    with pytest.raises(ValueError, match=r"holds \['checkpoint', 'log.jsonl', 'result.json'\] but no config.json"):
        train(_lm(), get_task(**TASK), _cfg(out))
    assert tree_hash(out) == before
    assert cli(capsys, ["train", "--resume", str(out)], out) == 2
    assert cli(capsys, ["train", "--resume", str(tmp_path / "nope")], tmp_path / "nope") == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(_lm(), get_task(**TASK), _cfg(tmp_path / "file"))
    assert main(["compare", "--lengths", "8", "--models", "BSBR", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err  # said before measuring
    shutil.rmtree(out)
    shutil.copytree(runs / "run", out)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    (out / "checkpoint" / "state.json").write_text(json.dumps({**state, "step": 99}))
    before = tree_hash(out)
    with pytest.raises(ValueError, match=r"state.json: field 'step' is 99; expected at most the run's 3 steps"):
        train(_lm(), get_task(**TASK), _cfg(out))
    assert tree_hash(out) == before


def test_resume_from_checkpoint_old_and_a_torn_log_line(runs, tmp_path, capsys):
    """An interruption between save_checkpoint's two renames leaves only checkpoint.old; a kill while writing
    the log leaves a last line without its newline.  Both resume."""
    out = tmp_path / "run"
    shutil.copytree(runs / "run", out)
    (out / "checkpoint").rename(out / "checkpoint.old")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert cli(capsys, ["train", "--resume", str(out), "--set", "progress=false", "--eval-split", "none",
                        "--threads", "1"], out) == 0
    assert (out / "checkpoint" / "state.json").is_file() and not (out / "checkpoint.old").exists()
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 3


# --- corpus directories ----------------------------------------------------------------------------------------

DOCS = {"a.txt": b"the quick brown fox jumps over the lazy dog. " * 200, "b.md": b"# notes\n\nsome text here\n" * 300,
        "sub/c.py": b"def f(x):\n    return x + 1\n" * 300, "d.txt": "caf\u00e9 na\u00efve \u00fcber ".encode() * 400}


@st.composite
def mutated_corpus(draw):
    docs = dict(DOCS)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(docs)))
        kind = draw(st.sampled_from(["empty", "bytes", "binary", "latin1", "remove", "all_empty"]))
        if kind == "empty":
            docs[name] = b""
        elif kind == "bytes":
            docs[name] = draw(mutated_bytes(docs[name]))
        elif kind == "binary":
            docs[name] = docs[name][:50] + b"\x00\x01\x02" + docs[name][50:]
        elif kind == "latin1":
            docs[name] = "\u00e9t\u00e9 ".encode("latin-1") * 30
        elif kind == "remove" and len(docs) > 1:
            del docs[name]
        elif kind == "all_empty":
            docs = {k: b"" for k in docs}
    return docs


@fuzz(N_CORPUS)
@given(docs=mutated_corpus())
def test_fuzz_directory_corpus(docs):
    with tempfile.TemporaryDirectory() as d:  # a fresh path each time: directory corpora are cached per path
        root = Path(d)
        for name, data in docs.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        task, err = call(get_task, "lm", seq_len=16, corpus="dir", path=str(root), names=root)
        if task is not None:
            assert task.batch("train", 2, 0).input_ids.shape == (2, 16)
        elif any(b"\x00" in v for v in docs.values()):
            assert "is binary" in str(err) or "too small" in str(err) or "fewer than seq_len" in str(err)


def test_corpus_unreadable_binary_and_empty_files_are_named(tmp_path, monkeypatch):
    for name, data in DOCS.items():
        (tmp_path / "ok" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ok" / name).write_bytes(data)
    shutil.copytree(tmp_path / "ok", tmp_path / "bin")
    (tmp_path / "bin" / "b.md").write_bytes(b"text\x00\x89PNG")
    with pytest.raises(ValueError, match=r"bin/b.md: holds a 0 byte at offset 4, so it is binary"):
        get_task("lm", seq_len=16, corpus="dir", path=str(tmp_path / "bin"))
    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "empty" / name).write_bytes(b"")
    with pytest.raises(ValueError, match="all 2 file"):
        get_task("lm", seq_len=16, corpus="dir", path=str(tmp_path / "empty"))
    shutil.copytree(tmp_path / "ok", tmp_path / "locked")
    real = Path.read_bytes

    def deny(self):
        if self.name == "a.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ValueError, match=r"locked/a.txt: cannot be read \(Permission denied\)"):
        get_task("lm", seq_len=16, corpus="dir", path=str(tmp_path / "locked"))


# --- ExperimentRunner cells ------------------------------------------------------------------------------------


class Cells(ExperimentRunner):
    def setup(self):
        self.models = {"a": None, "b": None}
        self.seq_lengths = [8, 16]

    def run_experiment(self, model, seq_length):
        return {"length": seq_length, "score": [seq_length / 2, 1.0]}


@fuzz(N_CELLS)
@given(which=st.sampled_from(["a__8", "a__16", "b__8", "b__16"]),
       data=mutated_file({"length": 8, "score": [4.0, 1.0]}))
def test_fuzz_experiment_cells_are_never_overwritten(which, data):
    with tempfile.TemporaryDirectory() as d:
        full = Cells(out_dir=d, progress=False).run()
        (Path(d) / "cells" / "b__16.json").unlink()  # one cell left to measure
        (Path(d) / "cells" / f"{which}.json").write_bytes(data)
        before = tree_hash(Path(d))
        results, err = call(Cells(out_dir=d, progress=False).run, names=Path(d) / "cells" / f"{which}.json")
        if err is not None:
            assert tree_hash(Path(d)) == before
        else:
            assert set(results) == set(full) and results["b"][16] == full["b"][16] or which == "b__16"
