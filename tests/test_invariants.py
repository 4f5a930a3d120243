"""Invariants every registered mechanism holds, run over the whole registry (docs/bsbr.md,
"Invariants" and "Three forms of one op"; docs/baselines.md, "Tests").

reference == parallel (outputs and gradients), parallel == streaming (any split), causality, padding
invariance, non-finite values that stay where they are (a NaN or inf at a later or padded position changes no other
output), greedy generation == argmax re-decoding, and clear errors for bad input.
"""

from __future__ import annotations

import pytest
import torch

from bsbr.models import list_models

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


# ------------------------------------------------------------------------------------------- non-finite values
# A NaN or an infinity at one position may reach only the outputs that depend on it: not an earlier position, not
# another row, not a real token beside padding (0 * NaN = NaN in a masked product used to carry it back; issue 27,
# item 6).  Every registered mechanism, every form: reference, parallel, streaming in pieces and in single steps,
# and the language model around them.

LAYER_FORMS = ["reference", "parallel", "pieces", "steps"]
MODEL_FORMS = ["model-reference", "model-parallel", "model-pieces", "model-steps"]
T_NF = 40
PIECES = [13, 9, 18]  # the non-finite positions (11, 20) fall inside a chunk of the parallel form and of a piece


def nonfinite_cases(forms):
    """(mechanism, form) for every registered mechanism."""
    return [(name, form) for name in list_models() for form in forms]


def run_layer(attn, x, form, mask=None):
    """attn over x [B, T, D] (mask [B, T] or None) in one form: "reference", "parallel", "pieces" or "steps"."""
    if form in ("reference", "parallel"):
        attn.impl = form
        return attn(x, mask)
    split = PIECES if form == "pieces" else [1] * x.shape[1]
    cache, start, outs = attn.new_cache(x.shape[0]), 0, []
    for n in split:
        piece = None if mask is None else mask[:, start : start + n]
        outs.append(attn(x[:, start : start + n], piece, cache=cache))
        start += n
    return torch.cat(outs, dim=1)


def run_model(lm, ids, form, mask=None):
    """The LM's logits for ids in one form ("model-reference", "model-parallel", "model-pieces", "model-steps")."""
    form = form.removeprefix("model-")
    if form in ("reference", "parallel"):
        lm.set_attention_impl(form)
        try:
            return lm(ids, attention_mask=mask).logits
        finally:
            lm.set_attention_impl("parallel")
    split = PIECES if form == "pieces" else [1] * ids.shape[1]
    cache, start, outs = lm.new_cache(ids.shape[0]), 0, []
    for n in split:
        piece = None if mask is None else mask[:, start : start + n]
        outs.append(lm(ids[:, start : start + n], attention_mask=piece, cache=cache, use_cache=True).logits)
        start += n
    return torch.cat(outs, dim=1)


def poisoned_embedding(lm, token: int, value: float):
    """A forward hook that puts ``value`` into the embedding output wherever ``token`` is (any order, any piece)."""
    def hook(module, inputs, out):
        return out.masked_fill(inputs[0][..., None] == token, value)
    return lm.model.embed.register_forward_hook(hook)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(("model_name", "form"), nonfinite_cases(LAYER_FORMS))
def test_nonfinite_token_reaches_no_earlier_position(model_name, form, value):
    """A layer whose input is NaN / inf at position s of row 1: row 0 and row 1's positions before s are the clean
    run's, finite; position s itself stays non-finite (the value is not hidden)."""
    attn = make_attention(model_name)
    x = torch.randn(2, T_NF, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    clean = run_layer(attn, x, form)
    for s in (11, 20):
        bad = x.clone()
        bad[1, s] = value
        y = run_layer(attn, bad, form)
        assert_close(f"{model_name} {form}: the row without {value}", y[0], clean[0])
        assert_close(f"{model_name} {form}: positions before a {value} at {s}", y[1, :s], clean[1, :s])
        assert not torch.isfinite(y[1, s]).any(), f"{model_name} {form}: the {value} at {s} vanished from its output"


@pytest.mark.parametrize(("model_name", "form"), nonfinite_cases(MODEL_FORMS))
def test_nonfinite_embedding_reaches_no_earlier_logits(model_name, form):
    """The language model with a NaN put into the embedding output at position s of row 1: the logits of row 0 and
    of row 1 before s are the clean run's, finite; the logits at s are NaN."""
    lm = make_lm(model_name)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 50, (2, T_NF), generator=g)
    for s in (11, 20):
        marked = ids.clone()
        marked[1, s] = 0  # token 0 appears only here; its embedding output becomes NaN
        clean = run_model(lm, marked, form)
        hook = poisoned_embedding(lm, 0, float("nan"))
        try:
            logits = run_model(lm, marked, form)
        finally:
            hook.remove()
        assert_close(f"{model_name} {form}: the row without NaN", logits[0], clean[0])
        assert_close(f"{model_name} {form}: logits before a NaN embedding at {s}", logits[1, :s], clean[1, :s])
        assert torch.isnan(logits[1, s]).all(), f"{model_name} {form}: the NaN at {s} vanished from its logits"


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("model_name", "form"), nonfinite_cases(LAYER_FORMS))
def test_padding_garbage_changes_no_real_output(model_name, form, side):
    """A layer whose padded positions hold NaN and inf: every real position is the clean run's (padding filled with
    ordinary numbers), padded outputs are zero, and the gradients of a loss on the real positions (parameters and
    input) are finite and the clean run's."""
    attn = make_attention(model_name)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, T_NF, 32, dtype=torch.float64, generator=g)
    mask = torch.ones(2, T_NF, dtype=torch.long)
    pad = slice(T_NF - 11, None) if side == "right" else slice(0, 11)
    mask[1, pad] = 0
    garbage = x.clone()
    garbage[1, pad] = float("nan")
    garbage[1, pad.start or 0] = float("inf")
    weights = torch.randn(2, T_NF, 32, dtype=torch.float64, generator=g) * mask[..., None]
    results = []
    for inp in (x, garbage):
        attn.zero_grad(set_to_none=True)
        inp = inp.clone().requires_grad_(True)
        y = run_layer(attn, inp, form, mask)
        (y.masked_fill(mask[..., None] == 0, 0.0) * weights).sum().backward()
        grads = {n: p.grad for n, p in attn.named_parameters() if p.grad is not None}
        results.append((y.detach(), inp.grad.masked_fill(mask[..., None] == 0, 0.0), grads))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    real = mask.bool()
    assert_close(f"{model_name} {form} {side}-padded: real outputs", y1[real], y0[real])
    assert torch.all(y1[~real] == 0), f"{model_name} {form}: padded outputs must be zero"
    assert_close(f"{model_name} {form} {side}-padded: d/dx at real positions", gx1, gx0)
    assert gp0.keys() == gp1.keys()
    for n in gp0:
        assert_close(f"{model_name} {form} {side}-padded: d/d{n}", gp1[n], gp0[n], atol=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("model_name", "form"), nonfinite_cases(["model-reference", "model-parallel",
                                                                  "model-pieces"]))
def test_padding_garbage_changes_no_real_logit(model_name, form, side):
    """The language model with NaN in the embedding output at padded positions: real logits are the clean run's,
    padded ones zero, and (one parallel forward) the loss and its parameter gradients are finite and the clean
    run's."""
    lm = make_lm(model_name)
    ids = torch.randint(1, 50, (2, T_NF), generator=torch.Generator().manual_seed(10))
    mask = torch.ones(2, T_NF, dtype=torch.long)
    pad = slice(T_NF - 11, None) if side == "right" else slice(0, 11)
    mask[1, pad] = 0
    ids[1, pad] = 0  # the padding token; its embedding output becomes NaN
    clean = run_model(lm, ids, form, mask)
    hook = poisoned_embedding(lm, 0, float("nan"))
    try:
        logits = run_model(lm, ids, form, mask)
    finally:
        hook.remove()
    real = mask.bool()
    assert_close(f"{model_name} {form} {side}-padded: real logits", logits[real], clean[real])
    assert torch.all(logits[~real] == 0), f"{model_name} {form}: padded logits must be zero"
    if form != "model-parallel":
        return
    results = []
    for poisoned in (False, True):
        lm.zero_grad(set_to_none=True)
        hook = poisoned_embedding(lm, 0, float("nan")) if poisoned else None
        try:
            out = lm(ids, attention_mask=mask, labels=ids)
        finally:
            if hook is not None:
                hook.remove()
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()
                                            if p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    assert_close(f"{model_name} {side}-padded loss", loss1, loss0)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert_close(f"{model_name} {side}-padded d/d{n}", g1[n], g0[n], atol=1e-12)
