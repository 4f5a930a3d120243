"""Converting a Hugging Face causal LM (bsbr.convert.to_bsbr): the original model at one chunk and with every chunk
selected (also left-padded), the op's definition in place of its parallel form, the default mode and the checks of
its settings, the loss, and the errors before any work."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import BSBRHFCache, convert_to_bsbr  # noqa: E402

from helpers import assert_close  # noqa: E402
from hf_models import FAMILIES, VOCAB, kl, randomise_meta, tiny  # noqa: E402


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
        convert_to_bsbr(tiny("llama"), chunk_size=8, block_summary="median")
    with pytest.raises(ValueError, match="belong to retrieval='blocks'"):
        convert_to_bsbr(tiny("llama"), chunk_size=8, retrieval="states", top_k=2)
    with pytest.raises(ValueError, match="retrieval must be one of"):
        convert_to_bsbr(tiny("llama"), chunk_size=8, retrieval="tokens")
    from bsbr.convert import HealConfig, heal

    with pytest.raises(ValueError, match="no BSBR weights to heal"):
        heal(conv, lambda s: torch.ones(1, 16, dtype=torch.long), HealConfig(stage="distill", steps=1), "unused")


def test_labels_loss_is_next_token_cross_entropy():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(9))
    out = conv(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - manual.item()) < 1e-6  # transformers computes the loss in float32
    assert out.cache is None  # a forward without a cache keeps none


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
