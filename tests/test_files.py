"""Every file a user hands the library is checked: fuzzed results, configs, checkpoints, corpora, cells.

Each reader gets mutated versions of a valid file (a field dropped, a value of another type, a list made
shorter or longer, bytes truncated, flipped or replaced by random or non-UTF-8 bytes) and must either accept
it or raise a ValueError (FileNotFoundError for a missing file) whose message names the file; through the
``bsbr`` command, exit status 2 with one ``bsbr CMD: error: ...`` line and no traceback.  A failed call must
leave what is already on disk (the input, a report directory, a run's checkpoints and log, finished cells)
byte for byte as it was.

Mutated inputs tried per reader (hypothesis ``max_examples``, derandomized so every run tries the same ones;
``BSBR_FUZZ_SCALE=N`` multiplies them and draws new ones each run):

    load_results                      N_JSON    = 200
    bsbr analyze                      N_CLI     = 100
    bsbr report                       N_REPORT  = 12 (a report that succeeds draws plots: ~0.6 s)
    TrainConfig.from_file             N_JSON    = 200
    bsbr train --config --print-spec  N_CLI     = 100
    train() resuming an out_dir       N_RESUME  = 60
    bsbr train --resume               N_CLI_RESUME = 20
    directory corpus (get_task("lm")) N_CORPUS  = 60
    ExperimentRunner finished cells   N_CELLS   = 60
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from bsbr.cli import main
from bsbr.evals import RESULTS_SCHEMA, analyze_results, load_results, validate_results
from bsbr.models import build_model
from bsbr.tasks import get_task
from bsbr.train import TrainConfig, train
from bsbr.train.checkpoint import load_checkpoint
from bsbr.train.loop import make_optimizer
from bsbr.utils.research import ExperimentRunner

ROOT = Path(__file__).resolve().parents[1]
N_JSON, N_CLI, N_REPORT, N_RESUME, N_CLI_RESUME, N_CORPUS, N_CELLS = 200, 100, 12, 60, 20, 60, 60
SCALE = int(os.environ.get("BSBR_FUZZ_SCALE", "1"))  # e.g. 20 for a long, randomized hunt; 1: the suite's fixed set


def fuzz(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


# --- mutations -------------------------------------------------------------------------------------------------

OTHER_TYPES = [None, True, 0, -1, 1.5, "x", "", [], {}, [1, "x"], {"k": 1}, float("nan")]


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _at(doc, path):
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated_json(draw, doc):
    """``doc`` with 1..3 mutations: drop a field or item, change a value's type, make a list shorter or longer,
    rename a field or change a string."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        depth = draw(st.sampled_from(sorted({len(p) for p in paths})))  # shallow fields as likely as deep ones
        path = draw(st.sampled_from([p for p in paths if len(p) == depth]))
        parent, key = _at(doc, path[:-1]), path[-1]
        kind = draw(st.sampled_from(["drop", "type", "length", "rename"]))
        if kind == "drop":
            del parent[key]
        elif kind == "rename":
            if isinstance(parent[key], str):
                parent[key] += "_x"
            elif isinstance(parent, dict):
                parent[f"{key}_x"] = parent.pop(key)
        elif kind == "type":
            other = draw(st.sampled_from([v for v in OTHER_TYPES if type(v) is not type(parent[key])]))
            parent[key] = copy.deepcopy(other)  # (a later mutation may edit it in place)
        elif isinstance(parent[key], list) and parent[key]:
            parent[key] = parent[key][:-1] if draw(st.booleans()) else [*parent[key], parent[key][-1]]
        else:
            parent[key] = [parent[key], parent[key]]
    return doc


@st.composite
def mutated_bytes(draw, data: bytes):
    """``data`` truncated, with a byte flipped, with non-UTF-8 bytes inserted, emptied, or random bytes."""
    kind = draw(st.sampled_from(["truncate", "flip", "non_utf8", "empty", "random"]))
    if not data:
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if kind == "non_utf8":
        i = draw(st.integers(0, len(data)))
        return data[:i] + b"\xff\xfe\xc3" + data[i:]
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=300))


def mutated_file(doc) -> st.SearchStrategy[bytes]:
    raw = json.dumps(doc, indent=1).encode()
    return st.one_of(mutated_json(doc).map(lambda d: json.dumps(d, indent=1).encode()), mutated_bytes(raw))


@st.composite
def mutated_safetensors(draw, data: bytes):
    """A safetensors file with its bytes mutated, or its header edited (a tensor renamed, dropped, reshaped,
    retyped or moved) and written back with a consistent length prefix."""
    if draw(st.booleans()):
        return draw(mutated_bytes(data))
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8: 8 + n]), data[8 + n:]
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    kind = draw(st.sampled_from(["rename", "drop", "shape", "dtype", "offsets", "append"]))
    if kind == "rename":
        header[name + ".x"] = header.pop(name)
    elif kind == "drop":
        del header[name]
    elif kind == "shape":
        header[name]["shape"] = [*header[name]["shape"], 1] if draw(st.booleans()) else [3, 5]
    elif kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(["F16", "F64", "I64", "U8", "XX"]))
    elif kind == "offsets":
        a, b = header[name]["data_offsets"]
        header[name]["data_offsets"] = [a, b + draw(st.integers(1, 64))]
    else:
        body += b"\x00" * draw(st.integers(1, 64))
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# --- checking outcomes -----------------------------------------------------------------------------------------


def event(what: str) -> None:
    """Count outcomes (``pytest --hypothesis-show-statistics``): how many mutated files were accepted."""
    if currently_in_test_context():
        hypothesis.event(what)


def tree_hash(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def call(fn, *args, names: str | Path, **kwargs):
    """fn(...) -> (result, None), or (None, error) for a ValueError / FileNotFoundError naming ``names``;
    any other exception fails the test with its traceback."""
    try:
        result = fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        assert str(names) in str(err), f"error does not name {names}: {err}"
        event(f"rejected: {type(err).__name__}")
        return None, err
    event("accepted")
    return result, None


def cli(capsys, argv: list[str], names: str | Path) -> int:
    rc = main(argv)
    event(f"exit status {rc}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if rc != 0:
        assert rc == 2, captured.err
        assert captured.err.startswith(f"bsbr {argv[0]}: error: ") and str(names) in captured.err, captured.err
        assert captured.err.count("\n") == 1, captured.err
    return rc


# --- results files ---------------------------------------------------------------------------------------------

SMALL_RESULTS = {
    "schema": RESULTS_SCHEMA, "seq_lengths": [32, 64, 128], "models": ["BSBR", "Standard"],
    "metrics": ["inference_time", "memory_usage"],
    "settings": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ff_dim": 32, "device": "cpu", "threads": 1},
    "BSBR": {"inference_time": [0.001, 0.002, 0.004], "memory_usage": [1000, 2000, 4000],
             "inference_time_spread": [[0.0009, 0.0011], [0.0019, 0.0021], None], "parameters": 1234},
    "Standard": {"inference_time": [0.001, 0.003, 0.009], "memory_usage": [1000, 4000, 16000],
                 "inference_time_spread": [[0.0009, 0.0011], [0.0029, 0.0031], [0.0089, 0.0091]],
                 "parameters": 1200, "errors": {"256": "out of memory"}},
}
COMMITTED = [ROOT / "docs/results/compare/results.json", ROOT / "docs/results/compare-accuracy/results.json"]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_committed_results_from_before_the_schema_field_still_load(path):
    results = load_results(path)
    assert "schema" not in results and results["models"] and load_results(path.parent) == results
    for metric in results["metrics"]:
        analyze_results(results, metric)


def test_results_errors_name_file_field_value_and_expectation(tmp_path):
    cases = [({}, "field 'seq_lengths' is missing; expected a non-empty list of positive integers"),
             ({**SMALL_RESULTS, "seq_lengths": [1, "x", 3]},
              "field 'seq_lengths'[1] is 'x'; expected a positive integer"),
             ({**SMALL_RESULTS, "BSBR": {**SMALL_RESULTS["BSBR"], "inference_time": [0.1]}},
              "field 'BSBR'.'inference_time' is a list of 1 item(s); expected a list of 3 item(s)"),
             ({**SMALL_RESULTS, "schema": RESULTS_SCHEMA + 1}, f"schema {RESULTS_SCHEMA + 1}, by a newer bsbr"),
             ({**SMALL_RESULTS, "models": ["BSBR", "Nope"]}, "field 'Nope' is missing")]
    for doc, message in cases:
        f = tmp_path / "r.json"
        f.write_text(json.dumps(doc))
        with pytest.raises(ValueError) as err:
            load_results(f)
        assert str(err.value).startswith(f"{f}: ") and message in str(err.value), str(err.value)
    f.write_bytes(b"not json")
    with pytest.raises(ValueError, match="is not valid JSON .* expected a results.json"):
        load_results(f)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_results(tmp_path / "nope.json")
    assert validate_results(copy.deepcopy(SMALL_RESULTS)) == SMALL_RESULTS


@fuzz(N_JSON)
@given(data=mutated_file(SMALL_RESULTS) | mutated_file(json.loads(COMMITTED[0].read_text())))
def test_fuzz_load_results(data):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "results.json"
        f.write_bytes(data)
        results, err = call(load_results, f, names=f)
        if results is not None:
            for metric in results["metrics"]:
                analyze_results(results, metric)  # what loads, analyses
        assert f.read_bytes() == data


@fuzz(N_CLI)
@given(data=mutated_file(SMALL_RESULTS))
def test_fuzz_cli_analyze(data, capsys):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "results.json"
        f.write_bytes(data)
        cli(capsys, ["analyze", str(f)], f)
        assert f.read_bytes() == data


@fuzz(N_REPORT)
@given(data=mutated_file(SMALL_RESULTS))
def test_fuzz_cli_report_leaves_the_directory_as_it_was_on_failure(data, capsys):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "report"
        out.mkdir()
        (out / "report.md").write_text("an earlier report\n")
        f = Path(d) / "results.json"
        f.write_bytes(data)
        before = tree_hash(out)
        if cli(capsys, ["report", str(f), "--out", str(out)], f) != 0:
            assert tree_hash(out) == before
        else:
            assert (out / "report.html").is_file()
        assert f.read_bytes() == data


def test_cli_analyze_and_report_on_the_issues_files(tmp_path, capsys):
    empty, text, bad = tmp_path / "empty.json", tmp_path / "text.json", tmp_path / "bad.json"
    empty.write_text("{}")
    text.write_text("hello")
    bad.write_text(json.dumps({**SMALL_RESULTS, "seq_lengths": [1, "x", 3],
                               "BSBR": {**SMALL_RESULTS["BSBR"], "inference_time": [0.1]}}))
    for cmd in ("analyze", "report"):
        for f, message in ((empty, "field 'seq_lengths' is missing"), (text, "is not valid JSON"),
                           (bad, "field 'seq_lengths'[1] is 'x'")):
            assert main([cmd, str(f)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"bsbr {cmd}: error: {f}: ") and message in err and "Traceback" not in err
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    good = tmp_path / "good"
    good.mkdir()
    (good / "results.json").write_text(json.dumps(SMALL_RESULTS))
    assert cli(capsys, ["analyze", str(good)], good) == 0


def test_report_in_place_leaves_the_results_file_as_it_was(tmp_path, capsys):
    src = tmp_path / "results.json"
    old = {k: v for k, v in SMALL_RESULTS.items() if k != "schema"}  # a file from before the schema field
    src.write_text(json.dumps(old, indent=4))
    raw = src.read_bytes()
    assert cli(capsys, ["report", str(src)], src) == 0
    assert src.read_bytes() == raw and (tmp_path / "report.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]


# --- training configs ------------------------------------------------------------------------------------------

CONFIG = {"task": {"name": "mqar", "seq_len": 64, "vocab_size": 64, "num_kv_pairs": 4},
          "model": {"name": "BSBR", "hidden_dim": 32, "num_layers": 1, "num_heads": 2, "chunk_size": 16},
          "train": {"steps": 50, "batch_size": 16, "lr": 0.003, "warmup_steps": 5, "eval_every": 25,
                    "betas": [0.9, 0.98], "progress": False, "target_loss": None, "precision": "fp32"}}


@fuzz(N_JSON)
@given(data=mutated_file(CONFIG["train"]))
def test_fuzz_train_config_from_file(data):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "train.json"
        f.write_bytes(data)
        cfg, err = call(TrainConfig.from_file, f, names=f)
        assert cfg is None or isinstance(cfg, TrainConfig)
        assert err is None or isinstance(err, ValueError)


@fuzz(N_CLI)
@given(data=mutated_file(CONFIG))
def test_fuzz_cli_train_config(data, capsys):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "config.json"
        f.write_bytes(data)
        cli(capsys, ["train", "--preset", "tiny", "--config", str(f), "--print-spec"], f)


def test_train_config_errors_name_the_file(tmp_path, capsys):
    f = tmp_path / "c.json"
    for doc, message in (("[1]", "holds a list of 1 item(s); expected a JSON object"),
                         ('{"train": {"steps": "x"}}', "section 'train': steps must be a positive integer"),
                         ('{"train": {"betas": "ab"}}', "betas must be two numbers in [0, 1), got 'ab'"),
                         ('{"train": {"progress": "false"}}', "progress must be true or false, got 'false'"),
                         ('{"model": {"chunk_size": "x"}}', "'model' section (preset, --config"),
                         ('{"oops": {}}', "unknown section(s) ['oops']")):
        f.write_text(doc)
        assert main(["train", "--preset", "tiny", "--config", str(f), "--print-spec"]) == 2
        err = capsys.readouterr().err
        assert str(f) in err and message in err, err
    f.write_bytes(b"\xff{}")
    with pytest.raises(ValueError, match=r"c.json: is not UTF-8 text \(byte 0xff at offset 0\)"):
        TrainConfig.from_file(f)


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
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        shutil.copytree(runs / "run", out)
        (out / rel).write_bytes(content)
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
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        shutil.copytree(runs / "run", out)
        (out / rel).write_bytes(content)
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


def test_nan_and_bool_values_in_results_are_rejected():
    bad = copy.deepcopy(SMALL_RESULTS)
    bad["BSBR"]["memory_usage"][0] = math.nan
    with pytest.raises(ValueError, match=r"'BSBR'.'memory_usage'\[0\] is nan; expected a finite number >= 0"):
        validate_results(bad)
    bad["BSBR"]["memory_usage"][0] = True
    with pytest.raises(ValueError, match=r"is True"):
        analyze_results(bad)
