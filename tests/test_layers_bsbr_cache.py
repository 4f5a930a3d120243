"""Streaming BSBR through its cache (BSBRCache, bsbr.layers.bsbr): compression stores d*d/f numbers per chunk, the
cache holds at most one chunk of keys and values (and 2W + 1 states with a retrieval window W), streaming with
eviction equals one parallel forward, the recurrent gradients of BSBR's options equal the parallel ones, and a
detached cache truncates them."""

from __future__ import annotations

import pytest
import torch

from conftest import make_lm
from helpers import assert_close
from test_invariants import check_recurrent_gradients


@pytest.mark.parametrize("factor", [None, 2, 4, 8])
def test_cache_stores_d2_over_f_numbers_per_chunk(factor):
    d, chunk, n = 16, 8, 100
    lm = make_lm("BSBR", hidden_dim=32, num_heads=2, compression_factor=factor)
    ids = torch.randint(0, 50, (1, n))
    cache = lm.new_cache(1)
    with torch.no_grad():
        lm(ids, cache=cache, use_cache=True)
    m = d * d // (factor or 1)
    for layer in cache.layers:
        assert layer.states.data.shape[-1] == m
        assert int(layer.states.filled[0]) == n // chunk
        assert layer.buf_k.shape[2] == chunk  # at most one chunk of keys and values is kept
    per_layer = 2 * ((n // chunk) * (m + d) + 2 * chunk * d + d * d + d) * 8  # 2 heads, fp64
    assert cache.state_nbytes() == len(cache.layers) * per_layer + len(cache.layers) * 8  # + lengths (int64)


def test_streaming_cache_is_bounded():
    """The number of cached keys/values never exceeds one chunk, however long the stream."""
    lm = make_lm("BSBR", dtype=torch.float32)
    cache = lm.new_cache(1)
    with torch.inference_mode():
        for _ in range(10):
            lm(torch.randint(0, 50, (1, 97)), cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.buf_k.shape[2] == 8 and int(layer.states.filled[0]) == 970 // 8


@pytest.mark.parametrize("options", [{"retrieval_window": 2}, {"retrieval_window": 1, "meta_query": "prev_last"}],
                         ids=str)
def test_retrieval_window_streaming_and_gradients(options):
    """Streaming (pieces, single tokens, a ragged left-padded batch) with eviction == one parallel forward, with
    the same gradients (the shared invariant), and greedy generation == argmax re-decoding."""
    check_recurrent_gradients("BSBR", **options)
    lm = make_lm("BSBR", **options)
    ids = torch.randint(0, 50, (2, 150))
    full = lm(ids).logits
    for split in ([1] * 150, [37, 1, 7, 100, 5]):
        cache, start, pieces = lm.new_cache(2), 0, []
        for n in split:
            pieces.append(lm(ids[:, start : start + n], cache=cache, use_cache=True).logits)
            start += n
        assert_close(f"window streaming {split[:4]}", torch.cat(pieces, 1), full)
        assert cache.layers[0].dropped > 0  # eviction happened on the way
    prompt = ids[:, :11]
    out = lm.generate(prompt, max_new_tokens=60)
    assert torch.equal(lm(out).logits[:, 10:-1].argmax(-1), out[:, 11:])


def test_retrieval_window_bounds_the_cache():
    """Without a window the cache holds one state per chunk; with W it never holds more than 2W + 1 states and
    its live bytes stop growing."""
    sizes = {}
    for W in (None, 3):
        lm = make_lm("BSBR", dtype=torch.float32, retrieval_window=W)
        cache = lm.new_cache(1)
        live = []
        with torch.inference_mode():
            for _ in range(20):
                lm(torch.randint(0, 50, (1, 97)), cache=cache, use_cache=True)
                layer = cache.layers[0]
                live.append(layer.state_nbytes())
                if W is not None:
                    assert int(layer.states.filled[0]) <= 2 * W + 1
                    assert layer.states.data.shape[2] <= 2 * (2 * W + 1) + 16
        sizes[W] = live
    assert int(cache.layers[0].states.filled[0]) + cache.layers[0].dropped == 1940 // 8
    assert sizes[None][-1] > 3 * sizes[None][4]  # grows with the stream (4x the tokens)
    assert max(sizes[3][4:]) <= min(sizes[3][4:]) * 1.5  # bounded: only the eviction sawtooth remains


@pytest.mark.parametrize("options", [{"meta_query": "prev_last"}, {"compression_factor": 4}], ids=str)
def test_recurrent_gradients_equal_parallel_bsbr_variants(options):
    """BSBR's options on the shared gradient invariant (tests/test_invariants.py runs the default over the registry)."""
    check_recurrent_gradients("BSBR", **options)


def test_detached_cache_truncates_gradients():
    """LayerCache.detach cuts the history: the second piece's gradients equal those over a cache filled without
    autograd, and differ from the untruncated ones."""
    lm = make_lm("BSBR")
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(5))

    def second_piece_grads(fill):
        cache = lm.new_cache(1)
        fill(cache)
        lm.zero_grad(set_to_none=True)
        lm(ids[:, 24:], cache=cache, use_cache=True).logits.sum().backward()
        return torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None])

    def detached(cache):
        lm(ids[:, :24], cache=cache, use_cache=True)
        for layer in cache.layers:
            layer.detach()

    def no_grad(cache):
        with torch.no_grad():
            lm(ids[:, :24], cache=cache, use_cache=True)

    def tracked(cache):
        lm(ids[:, :24], cache=cache, use_cache=True)

    truncated = second_piece_grads(detached)
    assert_close("detached cache", truncated, second_piece_grads(no_grad))
    assert (truncated - second_piece_grads(tracked)).abs().max() > 1e-3
