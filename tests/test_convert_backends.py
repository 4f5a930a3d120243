"""The attention of a converted model (bsbr.convert.backends, with its masks and padded rows): causality, left-padded
rows equal to the rows alone, padding between tokens refused, the local-only and sliding-window forms BSBR is
compared with, and non-finite embeddings that change no earlier logit (one forward and streamed)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import LlamaConfig  # noqa: E402

from bsbr.convert import convert_to_bsbr, set_attention  # noqa: E402

from helpers import assert_close  # noqa: E402
from hf_models import FAMILIES, MODES, VOCAB, randomise_meta, tiny  # noqa: E402


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


def test_padding_holes_are_refused():
    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="padding between tokens"):
        conv(torch.ones(1, 20, dtype=torch.long), attention_mask=mask)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("options", [{"retrieval": "states"},
                                     {"retrieval": "states", "sink_tokens": 3, "retrieval_window": 2},
                                     {"retrieval": False, "sink_tokens": 2}, {"retrieval": "blocks", "top_k": 1},
                                     {"retrieval": "blocks", "top_k": 2, "block_summary": "minmax", "sink_tokens": 3,
                                      "prev_chunk": True}], ids=str)
def test_converted_model_nonfinite_hidden_state_changes_no_earlier_output(family, options):
    """The conversion path (Hugging Face attention backend and BSBRHFCache; GPT-2, and LLaMA with grouped-query
    attention): a NaN input embedding at position p changes no earlier logit, in one forward and streamed in any
    split; NaN embeddings at the padding of left- and right-padded rows leave their real positions' logits exact."""
    pytest.importorskip("transformers", minversion="5.0")
    from bsbr.convert import BSBRHFCache, convert_to_bsbr

    from hf_models import VOCAB, randomise_meta, tiny

    conv = convert_to_bsbr(tiny(family), chunk_size=8, **options)
    randomise_meta(conv)
    embed = conv.get_input_embeddings()
    e = embed(torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(11))).detach()

    def streamed(e, split):
        cache, start, pieces = BSBRHFCache(), 0, []
        for n in split:
            pieces.append(conv(inputs_embeds=e[:, start : start + n], cache=cache, use_cache=True).logits)
            start += n
        return torch.cat(pieces, dim=1)

    def same(a, b):
        # block retrieval's op steps off its fused path when any value is non-finite: the same sums, rounded in
        # another order (test_ops_bsbr_blocks.py); the state readout is bitwise
        if options.get("retrieval") != "blocks":
            return torch.equal(a, b)
        return bool(torch.isfinite(a).all()) and (a.numel() == 0 or (a - b).abs().max().item() <= 1e-12)

    with torch.no_grad():
        forms = {"one forward": lambda e: conv(inputs_embeds=e).logits,
                 "pieces": lambda e: streamed(e, [5, 1, 1, 13, 3, 18]), "tokens": lambda e: streamed(e, [1] * 41)}
        for form, run in forms.items():
            base = run(e)
            for p in (0, 7, 8, 20, 40):
                e2 = e.clone()
                e2[:, p] = float("nan")
                out = run(e2)
                assert same(out[:, :p], base[:, :p]), f"{form}: NaN at {p} leaked backwards"
                assert not torch.isfinite(out[:, p]).all()
        mask = torch.ones(3, 30, dtype=torch.long)
        mask[1, 19:] = 0
        mask[2, :11] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        e = embed(torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(12))).detach()
        clean = conv(inputs_embeds=e, attention_mask=mask, position_ids=pos).logits
        dirty = conv(inputs_embeds=e.masked_fill(mask[..., None] == 0, float("nan")), attention_mask=mask,
                     position_ids=pos).logits
        assert same(dirty[mask.bool()], clean[mask.bool()])
