"""Streaming a converted model through BSBRHFCache (bsbr.convert.cache): any split equals one forward, generate() is
the argmax chain of full forwards (also for a left-padded batch), what the cache holds, and a KV cache refused."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import BSBRHFCache, convert_to_bsbr  # noqa: E402

from helpers import assert_close  # noqa: E402
from hf_models import FAMILIES, MODES, VOCAB, randomise_meta, tiny  # noqa: E402


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


def test_a_kv_cache_is_refused_with_a_clear_error():
    from transformers import DynamicCache

    conv = convert_to_bsbr(tiny("llama"), chunk_size=8)
    cache = DynamicCache()
    conv(torch.ones(1, 5, dtype=torch.long), cache=cache, use_cache=True)  # one forward: S = T, fine
    with pytest.raises(ValueError, match="BSBRHFCache"):
        conv(torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True)
