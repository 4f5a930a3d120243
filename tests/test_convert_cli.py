"""The ``bsbr convert`` command (bsbr.convert.cli): it writes the converted model and its report and resumes finished
stages, measures block retrieval without healing, and refuses bad input (options, a missing directory, a truncated
weights file) with exit status 2, no traceback and nothing written."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import from_pretrained  # noqa: E402

from hf_models import tiny  # noqa: E402


def _tiny_dir(tmp_path):
    """A tiny LLaMA and a byte-level BPE tokenizer trained on a few lines, saved as a user's checkpoint is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 20,
                           trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               special_tokens=["<s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<s>")
    model = tiny("llama", vocab=len(tok)).float()
    path = tmp_path / "mine"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, len(tok)


def test_cli_convert_writes_model_and_report_and_resumes(tmp_path, capsys):
    from bsbr.cli import main

    path, _ = _tiny_dir(tmp_path)
    out = tmp_path / "out"
    args = ["convert", str(path), "--retrieval", "states", "--chunk-size", "8", "--transfer-steps", "2",
            "--heal-steps", "1",
            "--finetune-steps", "1", "--seq-len", "32", "--eval-windows", "2", "--chunk-sweep", "4", "16",
            "--length-sweep", "16", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["before", "transfer", "distill", "finetune"]
    assert set(report["stages"]["before"]) >= {"bsbr", "local", "sliding_window"}
    assert (out / "report.md").is_file() and (out / "similarity_by_layer.png").is_file()
    assert (out / "perplexity_by_chunk.png").is_file() and (out / "perplexity_by_length.png").is_file()
    assert report["length_sweep"]["results"]["16"]["tokens"] == 32  # 2 windows of 16 tokens
    assert "By sequence length" in (out / "report.md").read_text()
    back = from_pretrained(out / "model")
    assert back.config.bsbr["chunk_size"] == 8
    stamp = (out / "stages" / "before.json").stat().st_mtime_ns
    assert main(args) == 0  # a re-run continues: finished stages are read, not recomputed
    assert (out / "stages" / "before.json").stat().st_mtime_ns == stamp
    # another plan in the same directory would read this plan's finished stages into its report: refused
    files = {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    changed = list(args)
    changed[changed.index("--chunk-size") + 1] = "16"
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "holds a run of another plan" in err and "chunk_size: 8 -> 16" in err, err
    assert {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == files


def test_cli_convert_with_block_retrieval_measures_without_healing(tmp_path):
    from bsbr.cli import main

    path, _ = _tiny_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(path), "--chunk-size", "8", "--top-k", "1", "--block-summary", "minmax",
                 "--block-heads", "query", "--seq-len", "32", "--eval-windows", "2", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["before"] and report["healing"] == {}
    assert set(report["stages"]["before"]) >= {"bsbr", "local", "sliding_window"}
    assert "Block retrieval" in (out / "report.md").read_text()
    back = from_pretrained(out / "model")
    assert back.config.bsbr["retrieval"] == "blocks" and back.config.bsbr["block_summary"] == "minmax"
    assert back.config.bsbr["block_heads"] == "query" and report["plan"]["block_heads"] == "query"


@pytest.mark.parametrize("extra,match", [(["--chunk-size", "0"], "--chunk-size must be a positive integer"),
                                         (["--retrieval", "states", "--compression-factor", "7"],
                                          "must divide head_dim"),
                                         (["--heal-steps", "3"], "--heal-steps 3: only for --retrieval states"),
                                         (["--retrieval", "states", "--block-heads", "query"],
                                          "--block-heads query: only for --retrieval blocks"),
                                         ([], None)])
def test_cli_convert_refuses_bad_input_before_any_work(tmp_path, capsys, extra, match):
    from bsbr.cli import main

    out = tmp_path / "out"
    if match is None:  # a missing model directory
        assert main(["convert", str(tmp_path / "nothing"), "--out", str(out)]) == 2
        assert "no such directory" in capsys.readouterr().err
    else:
        path, _ = _tiny_dir(tmp_path)
        assert main(["convert", str(path), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_cli_convert_on_a_truncated_weights_file_is_a_clear_error(tmp_path, capsys):
    from bsbr.cli import main

    path, _ = _tiny_dir(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    out = tmp_path / "out"
    assert main(["convert", str(path), "--out", str(out), "--heal-steps", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert not out.exists()  # nothing written
