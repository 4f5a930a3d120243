"""Conversion of Hugging Face causal LMs to BSBR: the op against its definition, then the converted models'
invariants (exact at one chunk, causality, padding, streaming, generate, save/load) and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bsbr.convert import BSBRCache, bsbr_modules, convert_to_bsbr, from_pretrained, set_attention  # noqa: E402
from bsbr.convert.attention import BSBRMeta  # noqa: E402
from bsbr.ops.bsbr import bsbr_reference  # noqa: E402
from bsbr.ops.bsbr_gqa import gqa_bsbr_reference  # noqa: E402

from helpers import assert_close  # noqa: E402

VOCAB = 97


def tiny(family: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                         eos_token_id=0, attn_implementation="sdpa")
        model = GPT2LMHeadModel(cfg)
    else:  # LLaMA with grouped-query attention: 6 query heads share 2 key/value heads
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa")
        model = LlamaForCausalLM(cfg)
    return model.double().eval()


def randomise_meta(model, seed: int = 0) -> None:
    """Move the new weights away from their initialisation (identity maps, gate 1 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for meta in bsbr_modules(model):
            for p in meta.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def kl(p_logits, q_logits) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).max().item()


FAMILIES = ["gpt2", "llama"]


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
    ref = gqa_bsbr_reference(q, k, v, r, h, chunk, scaling=0.3, gate=meta.gate, state_norm=meta.state_norm,
                             window=meta.retrieval_window, compress=meta.compress, restore=meta.restore,
                             sink=meta.sink_tokens)
    assert_close("out", out, ref)
    wrt = (q, k, v, *meta.parameters())
    g1 = torch.autograd.grad(out.square().sum(), wrt, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad(ref.square().sum(), wrt, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["q", "k", "v", *(n for n, _ in meta.named_parameters())], g1, g2, strict=True):
        assert_close(f"grad {name}", a, b)


def test_gqa_op_equals_the_library_reference_with_one_group():
    """An independent oracle: with G = 1, gate 1 and identity-free meta maps the op is bsbr_reference."""
    q, k, v = _op_inputs(H=3, Hk=3, T=29, d=8)
    meta = BSBRMeta(3, 3, 8, 6).double()
    with torch.no_grad():
        meta.meta_q.add_(0.3 * torch.randn_like(meta.meta_q))
        meta.meta_k.add_(0.3 * torch.randn_like(meta.meta_k))
    out = meta.segment(q, k, v, scaling=8**-0.5).out
    r_all = meta.meta_query(q)  # meta query at every position; the reference picks each chunk's first
    h_all = torch.einsum("bhnd,hed->bhne", k, meta.meta_k)  # meta key at every position; it picks the last
    assert_close("out", out, bsbr_reference(q, k, v, r_all, h_all, 6))


# -------------------------------------------------------------------------------- converted models
@pytest.mark.parametrize("family", FAMILIES)
def test_one_chunk_is_the_original_model_also_left_padded(family):
    model = tiny(family)
    ids = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[1, :9] = 0
    mask[2, :30] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = model(ids, attention_mask=mask, position_ids=pos).logits
    conv = convert_to_bsbr(copy.deepcopy(model), chunk_size=64)
    randomise_meta(conv)  # the retrieval weights cannot matter with one chunk
    out = conv(ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    assert (out - ref)[keep].abs().max().item() <= 1e-10
    assert kl(ref[keep], out[keep]) <= 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
    conv = convert_to_bsbr(tiny(family), chunk_size=8)
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
def test_left_padded_rows_equal_rows_alone(family):
    conv = convert_to_bsbr(tiny(family), chunk_size=8)
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
@pytest.mark.parametrize("options", [{}, {"retrieval_window": 2, "compression_factor": 4, "meta_key": "mean"},
                                     {"sink_tokens": 3}, {"sink_tokens": 2, "retrieval": False}])
def test_streaming_in_any_split_equals_one_forward(family, options):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, **options)
    randomise_meta(conv)
    ids = torch.randint(0, VOCAB, (2, 61), generator=torch.Generator().manual_seed(4))
    full = conv(ids).logits
    for split in ([61], [1] * 61, [5, 1, 1, 13, 3, 17, 21], [8, 8, 16, 29]):
        cache = BSBRCache()
        pieces = [conv(part, cache=cache, use_cache=True).logits for part in ids.split(split, dim=1)]
        assert_close(f"split {split[:4]}", torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_the_argmax_chain_and_the_cache_holds_one_state_per_chunk(family):
    conv = convert_to_bsbr(tiny(family), chunk_size=8)
    randomise_meta(conv)
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(5))
    cache = BSBRCache()
    out = conv.generate(ids, max_new_tokens=30, do_sample=False, cache=cache)
    seq = ids
    for _ in range(30):
        seq = torch.cat([seq, conv(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    n = out.shape[1] - 1  # the last token is never fed back
    row = cache.layers[0].rows[0]
    assert row.states.shape[2] == n // 8 and row.open_k.shape[2] == n % 8
    # generate() makes the BSBR cache by itself
    assert torch.equal(conv.generate(ids, max_new_tokens=30, do_sample=False), seq)


def test_generate_left_padded_batch_equals_rows_alone():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
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


def test_retrieval_window_bounds_the_cache():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=4, retrieval_window=3)
    randomise_meta(conv)
    cache = BSBRCache()
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(7))
    sizes = []
    for part in ids.split(4, dim=1):
        conv(part, cache=cache, use_cache=True)
        sizes.append(cache.nbytes())
    assert max(sizes[10:]) == sizes[10] and cache.layers[0].rows[0].states.shape[2] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(tmp_path, family):
    conv = convert_to_bsbr(tiny(family), chunk_size=8, retrieval_window=4)
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
                                          ({"compression_factor": 7}, "compression_factor must divide"),
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
    with pytest.raises(ValueError, match="BSBRCache"):
        conv(torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True)


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


def test_healing_transfer_lowers_its_loss_and_resumes_exactly(tmp_path):
    from bsbr.convert import HealConfig, heal

    def fresh():
        return convert_to_bsbr(tiny("llama").float(), chunk_size=8, gate_init=0.0)

    data = torch.randint(0, VOCAB, (12, 1, 48), generator=torch.Generator().manual_seed(11))
    cfg = HealConfig(stage="transfer", steps=12, lr=3e-2, seq_len=48, warmup=2, save_every=3)
    whole = fresh()
    records = heal(whole, lambda s: data[s], cfg, tmp_path / "whole", progress=False)
    assert records[-1]["loss"] < records[0]["loss"]
    assert len(records[0]["layer_losses"]) == 2

    def dies_at_7(step):
        if step == 7:
            raise _Killed
        return data[step]

    part = fresh()
    with pytest.raises(_Killed):
        heal(part, dies_at_7, cfg, tmp_path / "part", progress=False)
    again = fresh()  # a new process: the model starts from its conversion, the checkpoint (step 6) restores it
    resumed = heal(again, lambda s: data[s], cfg, tmp_path / "part", progress=False)
    assert [r["step"] for r in resumed] == list(range(12))
    for a, b in zip(bsbr_modules(whole), bsbr_modules(again), strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="cannot resume stage"):
        heal(fresh(), lambda s: data[s], HealConfig(stage="finetune", steps=2, seq_len=48), tmp_path / "part",
             progress=False)


def test_healing_finetune_trains_only_the_bsbr_weights(tmp_path):
    from bsbr.convert import HealConfig, heal

    conv = convert_to_bsbr(tiny("gpt2").float(), chunk_size=8, gate_init=0.5)
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
    conv = convert_to_bsbr(copy.deepcopy(original), chunk_size=8, gate_init=0.1)
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
    args = ["convert", str(path), "--chunk-size", "8", "--transfer-steps", "2", "--heal-steps", "1",
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


@pytest.mark.parametrize("extra,match", [(["--chunk-size", "0"], "--chunk-size must be a positive integer"),
                                         (["--compression-factor", "7"], "must divide head_dim"),
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
    conv = convert_to_bsbr(tiny("llama").float(), chunk_size=8)
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
