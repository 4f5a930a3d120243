"""Every results file and training config a user hands the library is checked (the rules: tests/fuzzing.py):
``load_results``, ``bsbr analyze``, ``bsbr report`` and ``TrainConfig.from_file`` / ``bsbr train --config``."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import given

from bsbr.cli import main
from bsbr.evals import RESULTS_SCHEMA, analyze_results, load_results, validate_results
from bsbr.train import TrainConfig

from fuzzing import N_CLI, N_JSON, N_REPORT, ROOT, call, cli, fuzz, mutated_file, tree_hash, written

# --- results files ---------------------------------------------------------------------------------------------

SMALL_RESULTS = {
    "schema": RESULTS_SCHEMA, "seq_lengths": [32, 64, 128], "models": ["BSBR", "Standard"],
    "metrics": ["inference_time", "memory_usage"],
    "settings": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "ff_dim": 32, "device": "cpu", "threads": 1},
    "noise": {"method": "proc", "cores": 2, "threads": 2, "others_before": 0.0, "loadavg_before": [0.1, 0.2, 0.3],
              "loadavg_after": [0.2, 0.2, 0.3], "others_during": [0.0, 1.5], "noise_floor": 0.3,
              "control": {"model": "BSBR", "seq_length": 64, "ratios": [1.01, 1.3, 1.6]}, "noisy": True,
              "reasons": ["the A/A control disagreed"], "noisy_cells": [["Standard", 64]]},
    "BSBR": {"inference_time": [0.001, 0.002, 0.004], "memory_usage": [1000, 2000, 4000],
             "inference_time_spread": [[0.0009, 0.0011], [0.0019, 0.0021], None],
             "inference_time_min": [0.0009, 0.0019, None],
             "inference_time_repeats": [[0.0009, 0.001, 0.0011], [0.0019, 0.002, 0.0021], None],
             "inference_time_waits": [[0.0, 0.01, None], [0.0, 0.0, 0.0], None], "parameters": 1234},
    "Standard": {"inference_time": [0.001, 0.003, 0.009], "memory_usage": [1000, 4000, 16000],
                 "inference_time_spread": [[0.0009, 0.0011], [0.0029, 0.0031], [0.0089, 0.0091]],
                 "inference_time_repeats": [[0.0009, 0.001, 0.0011], [0.0029, 0.003, 0.0031], [0.009]],
                 "parameters": 1200, "errors": {"256": "out of memory"}},
}
# runs committed before the schema field (the default run as it was, kept as a test file), and runs of schema 2
COMMITTED = [ROOT / "tests/data/compare-schema0/results.json", ROOT / "docs/results/compare-accuracy/results.json",
             ROOT / "docs/results/compare/results.json", ROOT / "docs/results/compare-hog/results.json"]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_committed_results_load_and_analyse(path):
    results = load_results(path)
    assert results.get("schema", 0) in (0, RESULTS_SCHEMA) and results["models"]
    assert load_results(path.parent) == results
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
    with written("results.json", data) as f:
        results, err = call(load_results, f, names=f)
        if results is not None:
            for metric in results["metrics"]:
                analyze_results(results, metric)  # what loads, analyses
        assert f.read_bytes() == data


@fuzz(N_CLI)
@given(data=mutated_file(SMALL_RESULTS))
def test_fuzz_cli_analyze(data, capsys):
    with written("results.json", data) as f:
        cli(capsys, ["analyze", str(f)], f)
        assert f.read_bytes() == data


@fuzz(N_REPORT)
@given(data=mutated_file(SMALL_RESULTS))
def test_fuzz_cli_report_leaves_the_directory_as_it_was_on_failure(data, capsys):
    with written("results.json", data) as f:
        out = f.parent / "report"
        out.mkdir()
        (out / "report.md").write_text("an earlier report\n")
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


def test_nan_and_bool_values_in_results_are_rejected():
    bad = copy.deepcopy(SMALL_RESULTS)
    bad["BSBR"]["memory_usage"][0] = math.nan
    with pytest.raises(ValueError, match=r"'BSBR'.'memory_usage'\[0\] is nan; expected a finite number >= 0"):
        validate_results(bad)
    bad["BSBR"]["memory_usage"][0] = True
    with pytest.raises(ValueError, match=r"is True"):
        analyze_results(bad)


# --- training configs ------------------------------------------------------------------------------------------

CONFIG = {"task": {"name": "mqar", "seq_len": 64, "vocab_size": 64, "num_kv_pairs": 4},
          "model": {"name": "BSBR", "hidden_dim": 32, "num_layers": 1, "num_heads": 2, "chunk_size": 16},
          "train": {"steps": 50, "batch_size": 16, "lr": 0.003, "warmup_steps": 5, "eval_every": 25,
                    "betas": [0.9, 0.98], "progress": False, "target_loss": None, "precision": "fp32"}}


@fuzz(N_JSON)
@given(data=mutated_file(CONFIG["train"]))
def test_fuzz_train_config_from_file(data):
    with written("train.json", data) as f:
        cfg, err = call(TrainConfig.from_file, f, names=f)
        assert cfg is None or isinstance(cfg, TrainConfig)
        assert err is None or isinstance(err, ValueError)


@fuzz(N_CLI)
@given(data=mutated_file(CONFIG))
def test_fuzz_cli_train_config(data, capsys):
    with written("config.json", data) as f:
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
