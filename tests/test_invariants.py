"""Invariants every registered mechanism holds, run over the whole registry (DESIGN.md §2-3).

reference == parallel (outputs and gradients), parallel == streaming (any split), causality, padding
invariance, greedy generation == argmax re-decoding, and clear errors for bad input.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_attention, make_lm
from helpers import assert_close

SEQ_LENS = [1, 7, 8, 9, 23, 63]


# ----------------------------------------------------------------------------- reference == parallel
@pytest.mark.parametrize("T", SEQ_LENS)
def test_reference_equals_parallel_fp64_outputs_and_grads(model_name, T):
    attn = make_attention(model_name, hidden_dim=120, num_heads=2)  # head dim 60
    x = torch.randn(2, T, 120, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, T, 120, dtype=torch.float64)
    results = {}
    for impl in ("reference", "parallel"):
        attn.impl = impl
        attn.zero_grad()
        x.grad = None
        y = attn(x)
        (y * g).sum().backward()
        # a parameter the form never touched (e.g. BSBR's meta projections when T < chunk) has zero gradient
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in attn.named_parameters()}
        results[impl] = (y.detach(), x.grad.clone(), grads)
    y_ref, gx_ref, gp_ref = results["reference"]
    y_par, gx_par, gp_par = results["parallel"]
    assert_close(f"{model_name} output T={T}", y_par, y_ref)
    assert_close(f"{model_name} d/dx T={T}", gx_par, gx_ref)
    assert gp_ref.keys() == gp_par.keys()
    for n in gp_ref:
        assert_close(f"{model_name} d/d{n} T={T}", gp_par[n], gp_ref[n], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_low_precision_matches_fp64_reference(model_name, dtype):
    attn = make_attention(model_name, hidden_dim=64, num_heads=2)
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    attn.impl = "reference"
    expected = attn(x)
    low = make_attention(model_name, hidden_dim=64, num_heads=2, dtype=dtype)
    got = low(x.to(dtype))
    assert_close(f"{model_name} {dtype} parallel vs fp64 reference", got.double(), expected,
                 rel_tol={torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype])


# --------------------------------------------------------------------------------------- causality
def test_causality_layer_and_model(model_name):
    attn = make_attention(model_name)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    base = attn(x)
    lm = make_lm(model_name)
    ids = torch.randint(0, 50, (2, 40))
    base_logits = lm(ids).logits
    for t in (0, 7, 8, 20, 39):
        x2 = x.clone()
        x2[:, t] += torch.randn_like(x2[:, t])
        y2 = attn(x2)
        assert torch.equal(y2[:, :t], base[:, :t]), f"{model_name}: changing token {t} changed an earlier output"
        assert not torch.equal(y2[:, t:], base[:, t:]), f"{model_name}: output ignores token {t}"
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % 50
        logits2 = lm(ids2).logits
        assert torch.equal(logits2[:, :t], base_logits[:, :t]), f"{model_name} LM: token {t} leaks backwards"


# ----------------------------------------------------------------------------------------- padding
def test_padding_invariance(model_name):
    lm = make_lm(model_name)
    a = torch.randint(1, 50, (1, 30))
    b = torch.randint(1, 50, (1, 19))
    alone_a, alone_b = lm(a).logits, lm(b).logits
    pad = torch.zeros(1, 11, dtype=torch.long)
    ones_a, ones_b, zeros = torch.ones(1, 30), torch.ones(1, 19), torch.zeros(1, 11)
    # right padding
    ids = torch.cat([a, torch.cat([b, pad], 1)])
    mask = torch.cat([ones_a, torch.cat([ones_b, zeros], 1)])
    out = lm(ids, attention_mask=mask).logits
    assert_close(f"{model_name} right-padded row", out[1, :19], alone_b[0])
    assert_close(f"{model_name} unpadded row beside it", out[0], alone_a[0])
    # left padding (chunk boundaries and positions count from the first real token)
    ids = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([ones_a, torch.cat([zeros, ones_b], 1)])
    out = lm(ids, attention_mask=mask).logits
    assert_close(f"{model_name} left-padded row", out[1, 11:], alone_b[0])
    assert torch.all(out[1, :11] == 0), "padded positions must be zero"
    # padding holes and a row of padding only: no NaN anywhere
    mask = torch.ones(3, 30)
    mask[1, ::3] = 0
    mask[2] = 0
    out = lm(torch.randint(0, 50, (3, 30)), attention_mask=mask).logits
    assert torch.isfinite(out).all(), f"{model_name}: non-finite logits with padding"
    assert torch.all(out[2] == 0)


def test_padding_gradients_are_finite(model_name):
    lm = make_lm(model_name).train()
    ids = torch.randint(0, 50, (2, 20))
    mask = torch.ones(2, 20)
    mask[1] = 0
    out = lm(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    for n, p in lm.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{model_name}: non-finite gradient in {n}"


# --------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("split", [[1] * 45, [37, 1, 7], [3, 5, 8, 1, 16, 12], [45]])
def test_streaming_equals_parallel(model_name, split):
    lm = make_lm(model_name)
    ids = torch.randint(0, 50, (2, 45))
    full = lm(ids).logits
    cache = lm.new_cache(2)
    pieces, start = [], 0
    for n in split:
        out = lm(ids[:, start : start + n], cache=cache, use_cache=True)
        assert out.cache is cache
        pieces.append(out.logits)
        start += n
    assert_close(f"{model_name} streaming {split[:4]}...", torch.cat(pieces, 1), full)
    assert torch.equal(cache.lengths, torch.tensor([45, 45]))


def check_recurrent_gradients(name: str, **options) -> None:
    """With autograd recording, a loss over logits streamed through the cache (pieces, single tokens, a ragged
    left-padded batch) has the gradients of the same loss over one parallel forward."""
    lm = make_lm(name, **options)
    ids = torch.randint(0, 50, (2, 45), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: rows absorb different numbers of real tokens
    weights = torch.randn(2, 45, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    weights = weights * mask[..., None]

    def grads(logits):
        lm.zero_grad(set_to_none=True)
        (logits * weights).sum().backward()
        return [p.grad.clone() for p in lm.parameters() if p.grad is not None]

    full = grads(lm(ids, attention_mask=mask).logits)
    for split in ([20, 1, 1, 23], [37, 8], [1] * 45):
        cache, start, pieces = lm.new_cache(2), 0, []
        for n in split:
            pieces.append(lm(ids[:, start : start + n], attention_mask=mask[:, start : start + n], cache=cache,
                             use_cache=True).logits)
            start += n
        streamed = grads(torch.cat(pieces, dim=1))
        assert len(streamed) == len(full)
        for a, b in zip(streamed, full, strict=True):
            assert_close(f"{name} {options} split {split[:4]}", a, b)


def test_recurrent_gradients_equal_parallel(model_name):
    check_recurrent_gradients(model_name)


def test_streaming_long_pieces(model_name):
    lm = make_lm(model_name)
    ids = torch.randint(0, 50, (1, 300))
    full = lm(ids).logits
    cache = lm.new_cache(1)
    splits = [(0, 37), (37, 38), (38, 138), (138, 300)]
    pieces = [lm(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in splits]
    assert_close(f"{model_name} streaming 37/1/100/162", torch.cat(pieces, 1), full)


def test_streaming_ragged_batch(model_name):
    """A left-padded prompt leaves rows of different lengths; later tokens still match a full forward."""
    lm = make_lm(model_name)
    a, b = torch.randint(1, 50, (1, 30)), torch.randint(1, 50, (1, 17))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 13, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 30)
    mask[1, :13] = 0
    cache = lm.new_cache(2)
    lm(ids, attention_mask=mask, cache=cache, use_cache=True)
    assert cache.lengths.tolist() == [30, 17]
    more = torch.randint(1, 50, (2, 12))
    got = torch.cat([lm(more[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(12)], 1)
    assert_close(f"{model_name} ragged row 0", got[0], lm(torch.cat([a, more[:1]], 1)).logits[0, 30:])
    assert_close(f"{model_name} ragged row 1", got[1], lm(torch.cat([b, more[1:]], 1)).logits[0, 17:])


def test_greedy_generate_equals_argmax_redecoding(model_name):
    lm = make_lm(model_name)
    prompt = torch.randint(0, 50, (2, 11))
    out = lm.generate(prompt, max_new_tokens=20)
    assert out.shape == (2, 31) and torch.equal(out[:, :11], prompt)
    logits = lm(out).logits
    assert torch.equal(logits[:, 10:-1].argmax(-1), out[:, 11:]), f"{model_name}: generate != argmax re-decode"


def test_generate_left_padded_batch_matches_rows_alone(model_name):
    lm = make_lm(model_name)
    a, b = torch.randint(1, 50, (1, 15)), torch.randint(1, 50, (1, 9))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 15)
    mask[1, :6] = 0
    out = lm.generate(ids, 10, attention_mask=mask)
    assert torch.equal(out[0, 15:], lm.generate(a, 10)[0, 15:])
    assert torch.equal(out[1, 15:], lm.generate(b, 10)[0, 9:])


# ------------------------------------------------------------------------------------------ errors
def test_bad_input_raises_clear_errors(model_name):
    lm = make_lm(model_name)
    ids = torch.randint(0, 50, (2, 10))
    with pytest.raises(ValueError, match="input_ids"):
        lm(torch.full((2, 10), 50))
    with pytest.raises(ValueError, match="input_ids"):
        lm(torch.full((2, 10), -1))
    with pytest.raises(TypeError, match="input_ids"):
        lm(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        lm(ids[0])
    with pytest.raises(ValueError, match="empty sequence"):
        lm(ids[:, :0])
    with pytest.raises(ValueError, match="attention_mask"):
        lm(ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="attention_mask"):
        lm(ids, attention_mask=torch.full((2, 10), 2))
    attn = make_attention(model_name)
    with pytest.raises(ValueError, match="hidden_states"):
        attn(torch.randn(2, 10))
    with pytest.raises(ValueError, match="hidden_dim=32"):
        attn(torch.randn(2, 10, 31, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        attn(torch.ones(2, 10, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_dim must be divisible by num_heads"):
        make_attention(model_name, hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, -1)


def test_no_maximum_length(model_name):
    """Positions are computed, so a model runs past any length it was built or trained at."""
    lm = make_lm(model_name, dtype=torch.float32)
    with torch.inference_mode():
        out = lm(torch.randint(0, 50, (1, 5000))).logits
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- loss without the full logits
@pytest.mark.parametrize("labelled", ["sparse", "all"])
def test_loss_without_logits_equals_full_loss(model_name, labelled):
    """forward(..., return_logits=False) runs the LM head only where a label is scored: same loss, same grads."""
    lm = make_lm(model_name)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (3, 29), generator=g)
    mask = None
    labels = ids.clone()  # "all": every position scored, as in language modelling
    if labelled == "sparse":  # a few scored positions, as in MQAR, and a left-padded row
        labels = ids.masked_fill(torch.rand(3, 29, generator=g) < 0.7, -100)
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
    results = []
    for full in (True, False):
        lm.zero_grad()
        out = lm(ids, attention_mask=mask, labels=labels, return_logits=full)
        out.loss.backward()
        assert (out.logits is None) != full
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert_close(f"{model_name} loss", loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert_close(f"{model_name} d/d{n}", grads_b[n], grads_a[n], atol=1e-12)
    with pytest.raises(ValueError, match="return_logits=False needs labels"):
        lm(ids, return_logits=False)
