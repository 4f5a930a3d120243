"""BSBR-specific checks: the three forms of the op agree, B >= T is softmax attention, compression stores
d*d/f numbers, attention maps reproduce the outputs, and bad options are refused."""

from __future__ import annotations

import math

import pytest
import torch

from bsbr import BSBRAttention, BSBRForCausalLM, BSBRLayer, BSBRModel
from bsbr.layers.standard import StandardAttention
from bsbr.models import ModelConfig
from bsbr.ops.bsbr import BSBRPast, bsbr_parallel, bsbr_reference

from conftest import make_attention, make_lm
from helpers import assert_close
from test_invariants import check_recurrent_gradients


def _op_inputs(B, H, T, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(5)]


def _chunk_meta(r, h, chunk, meta_query="first"):
    T = r.shape[2]
    C = math.ceil(T / chunk)
    starts = torch.arange(C) * chunk
    ends = (starts + chunk - 1).clamp(max=T - 1)
    if meta_query == "first":
        rq = r[:, :, starts]
    else:
        rq = torch.cat([torch.zeros_like(r[:, :, :1]), r[:, :, (starts - 1)[1:]]], dim=2)
    return rq, h[:, :, ends]


@pytest.mark.parametrize("T,chunk", [(1, 4), (7, 8), (8, 8), (9, 8), (63, 8), (100, 16), (130, 7)])
@pytest.mark.parametrize("variant", ["plain", "none_norm", "prev_last", "compressed", "window"])
def test_op_parallel_equals_reference_with_grads(T, chunk, variant):
    B, H, d = 2, 3, 60 if variant != "compressed" else 8
    q, k, v, r, h = _op_inputs(B, H, T, d)
    kw = {"state_norm": "none" if variant == "none_norm" else "mean"}
    if variant == "window":
        kw["window"] = 3
    meta_query = "prev_last" if variant == "prev_last" else "first"
    if variant == "compressed":
        g = torch.Generator().manual_seed(1)
        kw["compress"] = (0.1 * torch.randn(16, d * d, generator=g, dtype=torch.float64)).requires_grad_()
        kw["restore"] = (0.1 * torch.randn(d * d, 16, generator=g, dtype=torch.float64)).requires_grad_()
    leaves = [q, k, v, r, h] + [t for t in (kw.get("compress"), kw.get("restore")) if t is not None]
    ref = bsbr_reference(q, k, v, *_chunk_meta(r, h, chunk, meta_query), chunk, **kw)
    gout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * gout).sum(), leaves, allow_unused=True, materialize_grads=True)
    rq, hk = _chunk_meta(r, h, chunk, meta_query)
    par = bsbr_parallel(q, k, v, rq, hk, chunk, **kw).out
    par_grads = torch.autograd.grad((par * gout).sum(), leaves, allow_unused=True, materialize_grads=True)
    assert_close(f"output T={T} chunk={chunk} {variant}", par, ref)
    for name, a, b in zip(["q", "k", "v", "r", "h", "P", "P'"], par_grads, ref_grads, strict=False):
        assert_close(f"d/d{name} T={T} chunk={chunk} {variant}", a, b, atol=1e-12)


@pytest.mark.parametrize("group_bytes", [None, 1])
def test_op_long_sequence_all_paths(monkeypatch, group_bytes):
    """C >= 64 chunks switches on the triangular row groups; autograd and inference paths both match."""
    import bsbr.ops.bsbr as op

    if group_bytes:  # force one (batch, head) row per group in the autograd path
        monkeypatch.setattr(op, "_GROUP_BYTES", group_bytes)
    q, k, v, r, h = _op_inputs(2, 2, 301, 8)
    rq, hk = _chunk_meta(r, h, 4)
    ref = bsbr_reference(q, k, v, rq, hk, 4)
    with torch.no_grad():
        seg = bsbr_parallel(q, k, v, rq, hk, 4, need_states=True)
    assert_close("inference path", seg.out, ref)
    assert_close("autograd path", bsbr_parallel(q, k, v, rq, hk, 4).out, ref)
    # continuing from 40 past chunks (C0 < C) exercises the grouped mixture with a past
    with torch.no_grad():
        tail = bsbr_parallel(q[:, :, 160:], k[:, :, 160:], v[:, :, 160:], rq[:, :, 40:], hk[:, :, 40:], 4,
                             past=BSBRPast(states=seg.states[:, :, :40], keys=hk[:, :, :40], done=40))
    assert_close("continued inference path", tail.out, ref[:, :, 160:])


def test_op_continues_from_past_states():
    """Splitting a sequence at a chunk boundary and passing the first part's states gives the same outputs."""
    q, k, v, r, h = (t.detach() for t in _op_inputs(1, 2, 77, 16))
    rq, hk = _chunk_meta(r, h, 8)
    whole = bsbr_parallel(q, k, v, rq, hk, 8)
    first = bsbr_parallel(q[:, :, :40], k[:, :, :40], v[:, :, :40], rq[:, :, :5], hk[:, :, :5], 8, need_states=True)
    second = bsbr_parallel(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], rq[:, :, 5:], hk[:, :, 5:], 8,
                           past=BSBRPast(states=first.states, keys=hk[:, :, :5], done=5))
    assert_close("continued segment", torch.cat([first.out, second.out], 2), whole.out)


def test_large_chunk_equals_causal_softmax_attention():
    """With chunk_size >= T there is one chunk: BSBR is causal softmax attention with the same q/k/v/out."""
    torch.manual_seed(0)
    bsbr = BSBRAttention(48, 4, chunk_size=64, dropout=0.0).double().eval()
    std = StandardAttention(48, 4, dropout=0.0).double().eval()
    missing = std.load_state_dict(bsbr.state_dict(), strict=False)
    assert not missing.missing_keys  # q_proj, k_proj, v_proj, out_proj map one to one
    x = torch.randn(3, 50, 48, dtype=torch.float64)
    assert_close("BSBR(chunk >= T) vs softmax", bsbr(x), std(x))
    bsbr.chunk_size = 10  # and with several chunks it is something else
    assert (bsbr(x) - std(x)).abs().max() > 1e-3


def test_causality_catches_a_leaky_meta_query(monkeypatch):
    """The causality test is not vacuous: taking r_i from the chunk's last token (the naive reading) leaks."""
    attn = make_attention("BSBR")
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    base = attn(x)

    def leaky(self, x, first, open_query):
        T, ch = x.shape[1], self.chunk_size
        C = -(-T // ch)
        ends = (torch.arange(C) * ch + ch - 1).clamp(max=T - 1)
        meta = self._meta(self.meta_q_proj, x[:, ends]), self._meta(self.meta_k_proj, x[:, ends])
        return meta

    monkeypatch.setattr(BSBRAttention, "_chunk_meta", leaky)
    x2 = x.clone()
    x2[:, 23] += 1.0  # last token of chunk 2 (chunk_size 8)
    assert not torch.equal(attn(x2)[:, 16:23], base[:, 16:23])


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


def test_attention_weights_reproduce_outputs():
    attn = make_attention("BSBR")
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    maps = attn.attention_weights(x, parts=True)
    assert_close("local + retrieval", maps["local"] + maps["retrieval"], maps["total"])
    q, k, v = attn.qkv(x, torch.arange(29))
    y = attn.out(maps["total"] @ v)
    assert_close("sum_s w[t,s] v_s", y, attn(x))
    # local weights are zero outside the chunk, retrieval weights are zero inside it and after it
    t = torch.arange(29)
    same_chunk = (t[:, None] // 8) == (t[None, :] // 8)
    assert torch.all(maps["local"][..., ~same_chunk] == 0)
    assert torch.all(maps["retrieval"][..., same_chunk | (t[None, :] > t[:, None])] == 0)


def test_model_attention_weights_shape_and_sparsity():
    model = BSBRModel(vocab_size=50, hidden_dim=32, num_layers=2, num_heads=2, chunk_size=8, ff_dim=64)
    w = model.get_attention_weights(torch.randint(0, 50, (3, 20)))
    assert w.shape == (2, 3, 2, 20, 20)
    sparsity = (w == 0).float().mean().item()
    assert 0.45 < sparsity < 0.6  # the upper triangle (190/400 + diagonal excluded) is exactly zero
    with pytest.raises(NotImplementedError, match="compression"):
        BSBRModel(50, 32, 1, 2, 8, 64, compression_factor=2).get_attention_weights(torch.zeros(1, 5, dtype=torch.long))


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        BSBRAttention(32, 2, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        BSBRAttention(32, 2, chunk_size=2.5)
    with pytest.raises(ValueError, match="compression_factor must divide head_dim\\*head_dim=256, got 3"):
        BSBRAttention(32, 2, chunk_size=8, compression_factor=3)
    with pytest.raises(ValueError, match="hidden_dim must be divisible by num_heads"):
        BSBRLayer(30, 4, 8, 64)
    with pytest.raises(ValueError, match="state_norm"):
        BSBRAttention(32, 2, 8, state_norm="sum")
    with pytest.raises(ValueError, match="meta_query"):
        BSBRAttention(32, 2, 8, meta_query="last")
    with pytest.raises(ValueError, match="retrieval_window must be a positive integer, got 0"):
        BSBRAttention(32, 2, 8, retrieval_window=0)
    with pytest.raises(ValueError, match="unknown option"):
        BSBRModel(50, 32, 1, 2, 8, 64, window_size=3)
    with pytest.raises(ValueError, match="unknown ModelConfig key"):
        ModelConfig.from_dict({**BSBRModel(50, 32, 1, 2, 8, 64).config.to_dict(), "lr": 1})
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig(50, 32, 1, 2, 64, attention="Transformer-XL")


def test_config_round_trip_rebuilds_the_same_model():
    lm = BSBRForCausalLM(50, 32, 2, 2, 8, 64, dropout=0.0, compression_factor=4)
    again = type(lm).__mro__[1](ModelConfig.from_dict(lm.config.to_dict()))
    again.load_state_dict(lm.state_dict())
    ids = torch.randint(0, 50, (2, 30))
    assert torch.equal(again(ids).logits, lm.eval()(ids).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    lm = make_lm("BSBR").train()
    ids = torch.randint(0, 50, (2, 40))
    grads = []
    for enable in (False, True):
        lm.zero_grad()
        if enable:
            lm.gradient_checkpointing_enable()
        lm(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    for a, b in zip(*grads, strict=True):
        assert_close("checkpointed grad", b, a)


def test_streaming_cache_is_bounded():
    """The number of cached keys/values never exceeds one chunk, however long the stream."""
    lm = make_lm("BSBR", dtype=torch.float32)
    cache = lm.new_cache(1)
    with torch.inference_mode():
        for _ in range(10):
            lm(torch.randint(0, 50, (1, 97)), cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.buf_k.shape[2] == 8 and int(layer.states.filled[0]) == 970 // 8


# ------------------------------------------------------------------------------- retrieval window
def test_retrieval_window_reference_parallel_and_limits():
    """A window of W chunks: reference == parallel (fp64, with gradients), W >= number of chunks is exactly the
    unwindowed layer, and W = 1 differs from it (the option is not ignored)."""
    x = torch.randn(2, 63, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 63, 32, dtype=torch.float64)
    for options in ({"retrieval_window": 2}, {"retrieval_window": 3, "meta_query": "prev_last"},
                    {"retrieval_window": 2, "compression_factor": 4}):
        attn = make_attention("BSBR", **options)
        got = {}
        for impl in ("reference", "parallel"):
            attn.impl = impl
            x.grad = None
            y = attn(x)
            (y * g).sum().backward()
            got[impl] = (y.detach(), x.grad.clone())
        assert_close(f"window {options} output", got["parallel"][0], got["reference"][0])
        assert_close(f"window {options} d/dx", got["parallel"][1], got["reference"][1])
    with torch.no_grad():
        plain = make_attention("BSBR")(x)
        assert torch.equal(make_attention("BSBR", retrieval_window=8)(x), plain)  # 63 tokens = 8 chunks
        assert not torch.allclose(make_attention("BSBR", retrieval_window=1)(x), plain)


def test_retrieval_window_output_ignores_chunks_outside_the_window():
    """With W = 2 and chunk 8, outputs at positions >= 32 (chunk 4 on) do not depend on tokens 0..15 (chunks
    0 and 1) through retrieval; the local part never reaches them either, and layer 1 sees layer 0's outputs,
    so a one-layer check is exact."""
    attn = make_attention("BSBR", retrieval_window=2)
    x = torch.randn(1, 48, 32, dtype=torch.float64)
    y = torch.randn(1, 48, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :16] = y[:, :16]
    with torch.no_grad():
        a, b = attn(x), attn(x2)
    assert torch.equal(a[:, 32:], b[:, 32:])
    assert not torch.allclose(a[:, 16:32], b[:, 16:32])  # chunks 2 and 3 still retrieve chunk 0 / 1


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


@pytest.mark.slow
def test_million_token_forward():
    model = BSBRModel(vocab_size=256, hidden_dim=64, num_layers=2, num_heads=2, chunk_size=128, ff_dim=128,
                      dropout=0.0).eval()
    with torch.inference_mode():
        h = model(torch.randint(0, 256, (1, 1_000_000)))
    assert h.shape == (1, 1_000_000, 64) and torch.isfinite(h).all()


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


# ------------------------------------------------------------------------------------ non-finite inputs
NONFINITE = [float("nan"), float("inf")]
OP_OPTIONS = {  # multi-head; grouped-query with scaling, gate and sinks; window with compression; local only
    "mha": {}, "gqa": {"scaling": 0.3, "sink": 3, "gate": True}, "window": {"window": 2, "compress": True},
    "none": {"retrieval": "none", "sink": 2}}


def _nonfinite_op_inputs(options, B=2, H=4, Hk=2, T=37, d=8, chunk=8):
    g = torch.Generator().manual_seed(7)
    C = math.ceil(T / chunk)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, T, d, generator=g, dtype=torch.float64) for _ in range(2))
    r, h = torch.randn(B, H, C, d, generator=g, dtype=torch.float64), torch.randn(B, Hk, C, d, generator=g,
                                                                                    dtype=torch.float64)
    kw = dict(options)
    if kw.pop("gate", False):
        kw["gate"] = torch.rand(H, generator=g, dtype=torch.float64)
    if kw.pop("compress", False):
        kw["compress"] = 0.1 * torch.randn(16, d * d, generator=g, dtype=torch.float64)
        kw["restore"] = 0.1 * torch.randn(d * d, 16, generator=g, dtype=torch.float64)
    return (q, k, v, r, h), kw


def _op_form(form, chunk, kw):
    """The op's outputs [B, H, T, d] by one of its forms."""
    def run(q, k, v, r, h):
        if form == "reference":
            return bsbr_reference(q, k, v, r, h, chunk, **kw)
        if form == "autograd":  # the grouped, out-of-place path
            return bsbr_parallel(q.clone().requires_grad_(), k, v, r, h, chunk, **kw).out.detach()
        with torch.no_grad():
            if form == "inference":
                return bsbr_parallel(q, k, v, r, h, chunk, **kw).out
            # a stream in two segments: the second continues an open chunk (13 = 8 + 5) and stored states
            a = bsbr_parallel(q[:, :, :13], k[:, :, :13], v[:, :, :13], r[:, :, :2], h[:, :, :2], chunk,
                              need_states=True, **kw)
            b = bsbr_parallel(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], r[:, :, 1:], h[:, :, 1:], chunk,
                              past=a.past(), **kw)
            return torch.cat([a.out, b.out], dim=2)
    return run


@pytest.mark.parametrize("form", ["reference", "inference", "autograd", "continued"])
@pytest.mark.parametrize("options", list(OP_OPTIONS), ids=str)
def test_op_nonfinite_input_changes_no_earlier_output(form, options):
    """A NaN or inf in q, k or v at position p leaves every output before p exactly as it was (the chunked form's
    dense blocks would otherwise multiply it by the zero weights of earlier positions), and the output at p is not
    finite: the value is not hidden either."""
    (q, k, v, r, h), kw = _nonfinite_op_inputs(OP_OPTIONS[options])
    run = _op_form(form, 8, kw)
    base = run(q, k, v, r, h)
    assert torch.isfinite(base).all()
    for name in ("q", "k", "v"):
        for p in (0, 5, 8, 12, 13, 20, 36):
            for value in NONFINITE:
                inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
                inputs[name][:, :, p] = value
                out = run(inputs["q"], inputs["k"], inputs["v"], r, h)
                assert torch.equal(out[:, :, :p], base[:, :, :p]), f"{form} {options}: {value} in {name} at {p} leaked"
                assert not torch.isfinite(out[:, :, p]).all(), f"{form} {options}: {value} in {name} at {p} vanished"


def _stream(module, x, split, mask=None, **kwargs):
    """Outputs of ``module`` fed x [B, T, D] piece by piece through a fresh cache."""
    cache, start, pieces = module.new_cache(x.shape[0]), 0, []
    for n in split:
        part = None if mask is None else mask[:, start : start + n]
        pieces.append(module(x[:, start : start + n], attention_mask=part, cache=cache, **kwargs))
        start += n
    return torch.cat(pieces, dim=1)


LAYER_FORMS = {"reference": None, "parallel": None, "pieces": [5, 1, 1, 13, 3, 17], "tokens": [1] * 40}


@pytest.mark.parametrize("options", [{}, {"retrieval_window": 2, "compression_factor": 4}, {"meta_query": "prev_last"}],
                         ids=str)
def test_layer_nonfinite_hidden_state_changes_no_earlier_output(options):
    """BSBRAttention: NaN or inf hidden states at position p change no earlier output, in the reference and parallel
    forms and streamed in pieces or token by token; with a retrieval window W they also leave alone every chunk that
    can no longer retrieve p's chunk (chunk 0 here: positions >= 8 (W + 1) on)."""
    attn = make_attention("BSBR", **options)
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for form, split in LAYER_FORMS.items():
        attn.impl = "reference" if form == "reference" else "parallel"
        run = attn if split is None else (lambda x, split=split: _stream(attn, x, split))  # noqa: E731
        with torch.no_grad():
            base = run(x)
            for p in (0, 7, 8, 20, 39):
                for value in NONFINITE:
                    x2 = x.clone()
                    x2[:, p] = value
                    y = run(x2)
                    assert torch.equal(y[:, :p], base[:, :p]), f"{form}: {value} at {p} leaked backwards"
                    assert not torch.isfinite(y[:, p]).all(), f"{form}: {value} at {p} vanished"
                    W = options.get("retrieval_window")
                    if W and p < 8:
                        beyond = 8 * (W + 1)
                        assert torch.equal(y[:, beyond:], base[:, beyond:]), f"{form}: {value} at {p} left its window"


def test_layer_and_lm_padding_with_nonfinite_hidden_states_gives_the_clean_outputs():
    """Rows padded on the right and on the left whose padding positions hold NaN give their real positions exactly the
    outputs they give with finite padding (layer: reference, parallel, streamed; LM: a NaN embedding at the padding
    positions, parallel and streamed), and their padding positions zero (layer)."""
    attn = make_attention("BSBR")
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, 19:] = 0
    mask[2, :11] = 0
    x = torch.randn(3, 30, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    garbage = x.masked_fill(mask[..., None] == 0, float("nan"))
    with torch.no_grad():
        for form, split in (("reference", None), ("parallel", None), ("pieces", [7, 1, 1, 21]), ("tokens", [1] * 30)):
            attn.impl = "reference" if form == "reference" else "parallel"
            if split is None:
                clean, dirty = attn(x, attention_mask=mask), attn(garbage, attention_mask=mask)
            else:
                clean, dirty = _stream(attn, x, split, mask), _stream(attn, garbage, split, mask)
            assert torch.equal(dirty, clean), f"{form}: NaN padding changed the row's outputs"
            assert torch.all(dirty[mask == 0] == 0)
    lm = make_lm("BSBR")
    lm.model.embed.register_forward_hook(lambda m, args, out: out.masked_fill((args[0] == 0)[..., None], float("nan")))
    ids = torch.randint(1, 50, (3, 30), generator=torch.Generator().manual_seed(10))

    def logits(ids, split):
        if split is None:
            return lm(ids, attention_mask=mask).logits
        cache, start, pieces = lm.new_cache(3), 0, []
        for n in split:
            part = slice(start, start + n)
            pieces.append(lm(ids[:, part], attention_mask=mask[:, part], cache=cache, use_cache=True).logits)
            start += n
        return torch.cat(pieces, dim=1)

    with torch.no_grad():
        for split in (None, [7, 1, 1, 21]):
            clean, dirty = logits(ids, split), logits(ids.masked_fill(mask == 0, 0), split)  # token 0: NaN embedding
            assert torch.equal(dirty[mask.bool()], clean[mask.bool()]), f"LM {split}: NaN padding leaked"


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
        # another order (test_bsbr_blocks.py); the state readout is bitwise
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
