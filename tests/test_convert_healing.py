"""Converted Hugging Face models, after conversion: the comparison metrics, the healing stages (transfer, distillation,
fine-tune; each lowers its loss and resumes exactly), the ``bsbr convert`` command and fuzzed model directories."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import bsbr_modules, convert_to_bsbr, from_pretrained  # noqa: E402

from hf_models import VOCAB, tiny  # noqa: E402


# ------------------------------------------------------------------------------ metrics and healing
def test_compare_outputs_of_a_model_with_itself_and_with_local_attention():
    from bsbr.convert import compare_outputs

    model = tiny("llama")
    batches = [torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    same = compare_outputs(model, model, batches, bucket=8, progress=False)
    assert same["kl"] < 1e-12 and same["top1"] == 1.0 and same["top5"] == 1.0 and abs(same["ppl_ratio"] - 1) < 1e-9
    assert all(abs(c - 1) < 1e-9 for c in same["cosine"]) and max(same["mse"]) < 1e-20
    local = convert_to_bsbr(copy.deepcopy(model), chunk_size=8, retrieval=False)
    res = compare_outputs(model, local, batches, bucket=8, progress=False)
    assert res["first_bucket_max_kl"] < 1e-12  # the first chunk is the original exactly
    assert res["by_position"][0]["top1"] == 1.0 and res["kl"] > 1e-6 and len(res["by_position"]) == 5
    assert res["cosine"][0] == pytest.approx(1.0)  # embeddings are untouched


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


# ------------------------------------------------------------------------------------------------ CLI
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


def test_cli_convert_with_block_retrieval_measures_without_healing(tmp_path):
    from bsbr.cli import main

    path, _ = _tiny_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(path), "--chunk-size", "8", "--top-k", "1", "--block-summary", "minmax",
                 "--seq-len", "32", "--eval-windows", "2", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["before"] and report["healing"] == {}
    assert set(report["stages"]["before"]) >= {"bsbr", "local", "sliding_window"}
    assert "Block retrieval" in (out / "report.md").read_text()
    back = from_pretrained(out / "model")
    assert back.config.bsbr["retrieval"] == "blocks" and back.config.bsbr["block_summary"] == "minmax"


@pytest.mark.parametrize("extra,match", [(["--chunk-size", "0"], "--chunk-size must be a positive integer"),
                                         (["--retrieval", "states", "--compression-factor", "7"],
                                          "must divide head_dim"),
                                         (["--heal-steps", "3"], "--heal-steps 3: only for --retrieval states"),
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


# ------------------------------------------------------------------- fuzzed model directories (issue 16)
FUZZ_EXAMPLES = 30  # mutated model directories tried (each loads a tiny model: ~0.1 s)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("converted")
    conv = convert_to_bsbr(tiny("llama").float(), chunk_size=8, retrieval="states")
    conv.save_pretrained(path)
    return path


def _mutations():
    from hypothesis import strategies as st

    return st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(["model_type", "bsbr", "hidden_size", "num_attention_heads",
                                                     "vocab_size", "num_hidden_layers"])),
        st.tuples(st.just("retype"), st.sampled_from(["model_type", "bsbr", "hidden_size", "num_key_value_heads"]),
                  st.sampled_from(["x", -3, None, [1], {"a": 1}, 2.5])),
        st.tuples(st.just("truncate_config"), st.integers(0, 400)),
        st.tuples(st.just("truncate_weights"), st.integers(0, 2000)),
        st.tuples(st.just("bsbr_field"), st.sampled_from(["chunk_size", "compression_factor", "retrieval_window"]),
                  st.sampled_from([0, -1, "x", None, 7])),
    )


def test_fuzzed_model_directories_give_clear_errors(converted_dir, tmp_path_factory):
    import hashlib
    import shutil

    from hypothesis import HealthCheck, given, settings

    def digest(p):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir())}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_mutations())
    def check(mutation):
        work = tmp_path_factory.mktemp("mut")
        shutil.rmtree(work)
        shutil.copytree(converted_dir, work)
        cfg_path, weights = work / "config.json", work / "model.safetensors"
        cfg = json.loads(cfg_path.read_text())
        kind = mutation[0]
        if kind == "drop":
            cfg.pop(mutation[1], None)
            cfg_path.write_text(json.dumps(cfg))
        elif kind == "retype":
            cfg[mutation[1]] = mutation[2]
            cfg_path.write_text(json.dumps(cfg))
        elif kind == "bsbr_field":
            cfg["bsbr"][mutation[1]] = mutation[2]
            cfg_path.write_text(json.dumps(cfg))
        elif kind == "truncate_config":
            cfg_path.write_bytes(cfg_path.read_bytes()[: mutation[1]])
        else:
            weights.write_bytes(weights.read_bytes()[: mutation[1]])
        before = digest(work)
        try:
            convert_to_bsbr(work)
        except (ValueError, TypeError, FileNotFoundError) as err:
            assert str(work) in str(err) or "must be" in str(err) or "expected" in str(err), str(err)
        assert digest(work) == before  # a failed load writes nothing

    check()


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
