"""Saving and loading converted models (bsbr.convert.loading): save_pretrained -> from_pretrained, the standard
loading path (AutoConfig, AutoModelForCausalLM, pipeline), a Python without bsbr.convert imported, a directory in
bsbr 0.2.0's format, and bad directories: hand-made ones, and fuzzed ones (fields dropped or retyped, configs and
weights truncated) that load or give a clear error and leave the directory as it was."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import convert_to_bsbr, from_pretrained  # noqa: E402

from hf_models import FAMILIES, VOCAB, randomise_meta, tiny  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(tmp_path, family):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, retrieval="states", retrieval_window=4)
    randomise_meta(conv)
    conv.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())["bsbr"]
    assert saved["chunk_size"] == 8 and saved["retrieval_window"] == 4
    back = from_pretrained(tmp_path)
    assert type(back).__name__ == type(tiny(family)).__name__
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(8))
    assert torch.equal(back(ids).logits, conv(ids).logits)
    assert torch.equal(convert_to_bsbr(tmp_path)(ids).logits, conv(ids).logits)  # a converted dir loads as one


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t0", pad_token="t0").save_pretrained(path)


@pytest.mark.parametrize("family,mode", [("llama", {"top_k": 1, "block_summary": "minmax"}),
                                         ("gpt2", {"retrieval": "states", "compression_factor": 4})], ids=str)
def test_the_standard_loading_path_returns_the_converted_model(tmp_path, family, mode):
    """AutoConfig / AutoModelForCausalLM / pipeline on a saved converted model give the converted model (the
    converted model types are registered by importing bsbr.convert), also after a second save."""
    from transformers import AutoConfig, AutoModelForCausalLM, pipeline

    conv = convert_to_bsbr(tiny(family), chunk_size=8, **mode)
    randomise_meta(conv)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(8))
    want = conv(ids).logits
    conv.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == f"bsbr_{family}"
    assert AutoConfig.from_pretrained(tmp_path / "a").bsbr["chunk_size"] == 8
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert type(back).__name__ == type(tiny(family)).__name__ and back.config._attn_implementation == "bsbr"
    # 1e-12, not bitwise: a reloaded LLaMA keeps its rotary inv_freq in float32 (transformers does that to any model)
    assert (back(ids).logits - want).abs().max().item() <= 1e-12
    back.save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert (again(ids).logits - want).abs().max().item() <= 1e-12
    assert (from_pretrained(tmp_path / "b")(ids).logits - want).abs().max().item() <= 1e-12
    _tiny_tokenizer(tmp_path / "b")
    pipe = pipeline("text-generation", model=str(tmp_path / "b"))
    assert pipe.model.config._attn_implementation == "bsbr"
    got = pipe(" ".join(f"t{int(i)}" for i in ids[0, :13]), max_new_tokens=6, do_sample=False,
               return_tensors=True)[0]["generated_token_ids"]
    assert list(got) == conv.generate(ids[:, :13], max_new_tokens=6, do_sample=False)[0].tolist()


def test_without_bsbr_the_standard_loading_path_fails_loudly(tmp_path):
    """Where bsbr.convert is not imported, transformers does not know the converted model type: it raises instead of
    returning the original attention."""
    import subprocess
    import sys

    convert_to_bsbr(tiny("llama"), chunk_size=8).save_pretrained(tmp_path)
    code = ("from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "bsbr_llama" in run.stderr
    assert "bsbr.convert" in json.loads((tmp_path / "config.json").read_text())["bsbr"]["how_to_load"]


def test_a_directory_saved_before_the_converted_model_types_still_loads(tmp_path):
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8, retrieval="states")
    randomise_meta(conv)
    conv.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["bsbr"]["retrieval"] = "llama", True  # as written by bsbr 0.2.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(8))
    assert torch.equal(from_pretrained(tmp_path)(ids).logits, conv(ids).logits)


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_to_bsbr(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        convert_to_bsbr(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="no weights"):
        convert_to_bsbr(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        convert_to_bsbr(tmp_path)


# ------------------------------------------------------------------- fuzzed model directories (issue 16)
FUZZ_EXAMPLES = 30  # mutated model directories tried (each loads a tiny model: ~0.1 s)


@pytest.fixture(scope="module", params=["states", "blocks"])
def converted_dir(request, tmp_path_factory):
    """A converted tiny LLaMA saved to a directory, in each retrieval mode (their "bsbr" fields differ)."""
    path = tmp_path_factory.mktemp(f"converted_{request.param}")
    opts = {"top_k": 2, "block_heads": "query"} if request.param == "blocks" else {}
    conv = convert_to_bsbr(tiny("llama").float(), chunk_size=8, retrieval=request.param, **opts)
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
        st.tuples(st.just("bsbr_field"), st.sampled_from(["chunk_size", "compression_factor", "retrieval_window",
                                                          "retrieval", "top_k", "sink_tokens", "prev_chunk",
                                                          "block_heads", "block_summary", "block_select"]),
                  st.sampled_from([0, -1, "x", None, 7, True, "blocks", "query"])),
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


def test_a_null_setting_is_refused_not_read_as_the_default(converted_dir, tmp_path):
    """None means "the default" to convert_to_bsbr, so a saved field edited to null would load another model than
    the one saved (top_k 2 where 48 was saved): refused with the field named.  retrieval_window may be null."""
    import shutil

    cfg = json.loads((converted_dir / "config.json").read_text())
    fields = [f for f in ("top_k", "block_summary", "block_select", "block_heads", "sink_tokens", "prev_chunk",
                          "meta_key", "state_norm", "retrieval") if f in cfg["bsbr"]]
    assert len(fields) >= 4, cfg["bsbr"]
    for field in fields:
        work = tmp_path / field
        shutil.copytree(converted_dir, work)
        edited = json.loads(json.dumps(cfg))
        edited["bsbr"][field] = None
        (work / "config.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=rf"\['{field}'\] are null"):
            convert_to_bsbr(work)
