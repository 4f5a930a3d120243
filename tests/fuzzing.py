"""What the file-fuzzing tests (test_files_results.py, test_files_runs.py) share: hypothesis strategies that mutate a
valid file, and checks of how a reader or the ``bsbr`` command met it.

Each reader gets mutated versions of a valid file (a field dropped, a value of another type, a list made
shorter or longer, bytes truncated, flipped or replaced by random or non-UTF-8 bytes) and must either accept
it or raise a ValueError (FileNotFoundError for a missing file) whose message names the file; through the
``bsbr`` command, exit status 2 with one ``bsbr CMD: error: ...`` line and no traceback.  A failed call must
leave what is already on disk (the input, a report directory, a run's checkpoints and log, finished cells)
byte for byte as it was.

Mutated inputs tried per reader (hypothesis ``max_examples``, derandomized so every run tries the same ones;
``BSBR_FUZZ_SCALE=N`` multiplies them and draws new ones each run):

    load_results                      N_JSON    = 200   (test_files_results.py)
    bsbr analyze                      N_CLI     = 100
    bsbr report                       N_REPORT  = 12 (a report that succeeds draws plots: ~0.6 s)
    TrainConfig.from_file             N_JSON    = 200
    bsbr train --config --print-spec  N_CLI     = 100
    train() resuming an out_dir       N_RESUME  = 60    (test_files_runs.py)
    bsbr train --resume               N_CLI_RESUME = 20
    directory corpus (get_task("lm")) N_CORPUS  = 60
    ExperimentRunner finished cells   N_CELLS   = 60
    convert_to_bsbr(dir) (converted)  FUZZ_EXAMPLES = 30 per retrieval mode, states and blocks
                                      (test_convert_loading.py; its own strategy, not these)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hypothesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from bsbr.cli import main

ROOT = Path(__file__).resolve().parents[1]
N_JSON, N_CLI, N_REPORT, N_RESUME, N_CLI_RESUME, N_CORPUS, N_CELLS = 200, 100, 12, 60, 20, 60, 60

SCALE = int(os.environ.get("BSBR_FUZZ_SCALE", "1"))  # e.g. 20 for a long, randomized hunt; 1: the suite's fixed set


def fuzz(n: int):

    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@contextmanager
def written(name: str, data: bytes, *, copy_of: Path | None = None) -> Iterator[Path]:
    """A fresh temporary folder (hypothesis reuses function-scoped fixtures across examples, so ``tmp_path``
    will not do) with ``data`` written at ``name``; with ``copy_of``, the folder ``run/`` is first a copy of that
    directory and ``name`` is relative to it. Yields the written file, or the copied directory."""
    with tempfile.TemporaryDirectory() as d:
        top = Path(d) / "run" if copy_of is not None else Path(d)
        if copy_of is not None:
            shutil.copytree(copy_of, top)
        (top / name).write_bytes(data)
        yield top if copy_of is not None else top / name


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
