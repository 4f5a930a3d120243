"""Block retrieval of tokens, the op (bsbr.ops.bsbr_blocks and its _fast, _select and _tiles parts): the reference,
parallel (explicit and fused) and step-by-step forms against each other and against causal softmax, with gradients and
grouped key/value heads; continuation from cached keys and summaries; bitwise causality; non-finite inputs that change
no earlier output; the gathered-block path of select="chunk"; straight-through and grouped (Landmark) selection
gradients; the dense form; and no [T, T] tensor in the parallel form.  The selection's own pieces (row groups, the
distillation loss, add_loss) are in test_ops_bsbr_blocks_select.py.

The registry-wide invariant suite (test_invariants.py) runs the layer as "BSBRBlocks"; the layer's own settings are in
test_layers_bsbr_blocks.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from bsbr.ops.bsbr_blocks import (
    BlockSpec,
    blocks_dense,
    blocks_parallel,
    blocks_reference,
    blocks_step,
    fused_available,
    scores,
    summarize,
)
from bsbr.ops.bsbr_blocks_select import select_in_row_groups

from helpers import assert_close
from helpers import blocks_qkv as _qkv

SPECS = [
    BlockSpec(chunk=4, top_k=2),
    BlockSpec(chunk=5, top_k=1, sink=2, prev_chunk=True, summary="minmax"),
    BlockSpec(chunk=4, top_k=3, sink=4, select="chunk"),
    BlockSpec(chunk=4, top_k=2, sink=1, grad="straight_through"),
    BlockSpec(chunk=3, top_k=1, prev_chunk=True, select="chunk", summary="minmax", grad="straight_through"),
    BlockSpec(chunk=4, top_k=2, sink=3, select="chunk"),  # chunk 0 a candidate: its sink hidden per head
    BlockSpec(chunk=4, top_k=2, sink=1, grad="grouped"),
    BlockSpec(chunk=3, top_k=9, prev_chunk=True, select="chunk", summary="minmax", grad="grouped"),
    BlockSpec(chunk=4, top_k=2, sink=1, summary="tokens"),
    BlockSpec(chunk=3, top_k=1, prev_chunk=True, select="chunk", summary="tokens", grad="straight_through"),
]
SHAPES = [(2, 4, 2, 23, 6), (1, 2, 2, 7, 4), (2, 3, 1, 3, 5), (1, 2, 1, 40, 6)]  # B, H, Hk, T, d


def _stream(q, k, v, spec):
    """Token by token through blocks_step, summaries made as a cache would."""
    B, Hk, T, d = k.shape
    ch, outs = spec.chunk, []
    for t in range(T):
        c = t // ch
        summ = summarize(k[:, :, : c * ch].reshape(B, Hk, c, ch, d), spec.summary) if c else None
        first = q[:, :, c * ch : c * ch + 1] if spec.select == "chunk" else None
        outs.append(blocks_step(q[:, :, t : t + 1], k, v, summ, torch.full((B,), t), spec, select_q=first))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize(("spec", "shape"), list(itertools.product(SPECS, SHAPES)))
def test_three_forms_agree_fp64(spec, shape):
    q, k, v = _qkv(*shape, grad=True)
    ref = blocks_reference(q, k, v, spec)
    par, _ = blocks_parallel(q, k, v, spec)
    assert_close(f"{spec} parallel", par, ref)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * g).sum(), (q, k, v))
    grads_par = torch.autograd.grad((par * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads_par, grads_ref, strict=True):
        assert_close(f"{spec} d/d{name}", a, b, atol=1e-12)
    with torch.no_grad():
        fused, _ = blocks_parallel(q, k, v, spec)  # the fused inference path
        assert_close(f"{spec} fused", fused, ref)
        assert_close(f"{spec} step by step", _stream(q, k, v, spec), ref)


def _index(B, Hk, T, e=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.softplus(2 * torch.randn(B, Hk, T, e, generator=g, dtype=torch.float64))
            for _ in range(2)]


@pytest.mark.parametrize("spec", [BlockSpec(chunk=4, top_k=2, summary="max"),
                                  BlockSpec(chunk=3, top_k=1, sink=2, prev_chunk=True, summary="minmax"),
                                  BlockSpec(chunk=4, top_k=2, sink=1, select="chunk", summary="max"),
                                  BlockSpec(chunk=4, top_k=2, sink=1, summary="tokens"),
                                  BlockSpec(chunk=3, top_k=1, select="chunk", summary="tokens")])
def test_an_indexer_selects_in_every_form(spec):
    """index_q / index_k choose the chunks: the reference against a loop that picks each query's top_k by the
    indexer's scores, then the parallel form (values and gradients), the fused path, the step and a continued
    stream against the reference."""
    B, H, Hk, T, d = 2, 4, 2, 23, 5
    q, k, v = _qkv(B, H, Hk, T, d, grad=True)
    iq, ik = _index(B, Hk, T)
    ref = blocks_reference(q, k, v, spec, index_q=iq, index_k=ik)
    ch, G = spec.chunk, H // Hk
    want = torch.empty_like(ref)
    for b, h, t in itertools.product(range(B), range(H), range(T)):
        c, hk = t // ch, h // G
        first = c * ch if spec.select == "chunk" else t
        cand = [j for j in range(c) if not (spec.prev_chunk and j == c - 1)]
        if spec.summary == "tokens":  # by hand: log sum over the chunk's tokens of exp(iq . ik / sqrt(e))
            sc = torch.stack([torch.logsumexp(ik[b, hk, j * ch : (j + 1) * ch] @ iq[b, hk, first] / 3**0.5, 0)
                              for j in cand]) if cand else torch.zeros(0)
        else:
            chunk_summ = [summarize(ik[b, hk, j * ch : (j + 1) * ch][None], spec.summary)[0] for j in cand]
            sc = torch.stack([scores(iq[b, hk, first][None, None, None], sj[None, None, None], spec)[0, 0, 0, 0]
                              for sj in chunk_summ]) if cand else torch.zeros(0)
        picked = [cand[i] for i in sc.topk(min(spec.top_k, len(cand))).indices.tolist()]
        seen = [s for s in range(t + 1) if s // ch == c or s // ch in picked or (c >= 1 and s < spec.sink)
                or (spec.prev_chunk and s // ch == c - 1)]
        w = torch.softmax(k[b, hk, seen] @ q[b, h, t] / d**0.5, dim=0)
        want[b, h, t] = w @ v[b, hk, seen]
    assert_close("reference", ref, want, rel_tol=1e-10)
    assert (ref - blocks_reference(q, k, v, spec)).abs().max() > 1e-3  # q and k would choose otherwise
    par, summ = blocks_parallel(q, k, v, spec, index_q=iq, index_k=ik)
    assert_close("parallel", par, ref)
    g = torch.randn_like(ref)
    for a, b_ in zip(torch.autograd.grad((par * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v)),
                     strict=True):
        assert_close("gradient", a, b_, atol=1e-12)
    with torch.no_grad():
        assert_close("fused", blocks_parallel(q, k, v, spec, index_q=iq, index_k=ik)[0], ref)
        steps = []
        for t in range(T):
            c = t // ch
            sm = summarize(ik[:, :, : c * ch].reshape(B, Hk, c, ch, -1), spec.summary) if c else None
            first = iq[:, :, c * ch : c * ch + 1] if spec.select == "chunk" else None
            steps.append(blocks_step(q[:, :, t : t + 1], k, v, sm, torch.full((B,), t), spec, select_q=first,
                                     index_q=iq[:, :, t : t + 1]))
        assert_close("step by step", torch.cat(steps, dim=2), ref)
        start = 2 * ch
        out, _ = blocks_parallel(q[:, :, start:], k, v, spec, start=start, summaries=summ[:, :, :2],
                                 index_q=iq[:, :, start:], index_k=ik)
        assert_close("continued", out, ref[:, :, start:])
    with pytest.raises(ValueError, match="index_q and index_k go together"):
        blocks_reference(q, k, v, spec, index_q=iq)
    with pytest.raises(ValueError, match="index_q .B, Hi, T, e. and index_k"):
        blocks_parallel(q, k, v, spec, index_q=iq[:, :, 1:], index_k=ik)


@pytest.mark.parametrize("spec", SPECS)
def test_parallel_continues_a_stream(spec):
    """Queries of a later segment over cached keys and summaries give the rows of one full forward."""
    q, k, v = _qkv(2, 4, 2, 37, 6)
    ref = blocks_reference(q, k, v, spec)
    ch = spec.chunk
    start = 2 * ch
    summ = summarize(k[:, :, :start].reshape(2, 2, 2, ch, 6), spec.summary)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, all_summ = blocks_parallel(q[:, :, start:].requires_grad_(grad), k, v, spec, start=start,
                                            summaries=summ)
        assert_close(f"{spec} continued (grad={grad})", out, ref[:, :, start:])
    assert all_summ.shape[2] == 37 // ch


@pytest.mark.parametrize("G", [1, 3])
def test_top_k_covering_every_chunk_is_causal_softmax(G):
    q, k, v = _qkv(2, 2 * G, 2, 61, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
    for spec in (BlockSpec(chunk=7, top_k=9), BlockSpec(chunk=7, top_k=9, sink=3, prev_chunk=True),
                 BlockSpec(chunk=7, top_k=8, sink=7, summary="minmax", grad="straight_through"),
                 BlockSpec(chunk=7, top_k=9, sink=2, select="chunk")):
        assert_close(f"{spec} reference", blocks_reference(q, k, v, spec), expected, rel_tol=1e-10)
        assert_close(f"{spec} parallel", blocks_parallel(q, k, v, spec)[0], expected, rel_tol=1e-10)
        with torch.no_grad():
            assert_close(f"{spec} fused", blocks_parallel(q, k, v, spec)[0], expected, rel_tol=1e-10)


def test_selection_is_a_choice_top_k_1_misses_what_top_k_all_sees():
    """With fewer chunks selected than exist, outputs differ from causal softmax (the test above is not vacuous)."""
    q, k, v = _qkv(1, 2, 2, 40, 8)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = blocks_parallel(q, k, v, BlockSpec(chunk=4, top_k=1))[0]
    assert (out[:, :, 8:] - full[:, :, 8:]).abs().max() > 1e-3
    assert_close("first two chunks", out[:, :, :8], full[:, :, :8])  # chunk 1 sees chunk 0, the only candidate


def test_fused_inference_over_several_row_groups_is_the_reference():
    """The inference path (fused kernel, rows scored in groups of 16 chunks) over 40 chunks equals the reference."""
    spec = BlockSpec(chunk=4, top_k=3, sink=4)
    q, k, v = _qkv(1, 4, 2, 40 * 4 - 1, 6)
    assert fused_available(q, k, v)
    assert_close("fused, row groups", blocks_parallel(q, k, v, spec)[0], blocks_reference(q, k, v, spec))
    with pytest.raises(ValueError, match="grad must be 'none'"):
        select_in_row_groups(q, k[:, :, :4, None, 0], torch.ones(q.shape[2], 4, dtype=torch.bool),
                             BlockSpec(chunk=4, top_k=1, grad="grouped"))


@pytest.mark.parametrize(("fused", "select"), [(False, "token"), (True, "token"), (False, "chunk"), (True, "chunk")])
def test_causality_is_bitwise_in_every_parallel_path(fused, select):
    """Changing token t changes no earlier output, bit for bit, although the tiles of queries that read each chunk
    are laid out from every query's selection (and with select="chunk" each query chunk's block is gathered)."""
    spec = BlockSpec(chunk=4, top_k=2, sink=2, select=select)
    q, k, v = _qkv(2, 4, 2, 64, 8)
    with torch.set_grad_enabled(not fused):
        base = blocks_parallel(*(t.requires_grad_(not fused) for t in (q, k, v)), spec)[0]
        for t in (5, 30, 63):
            q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
            for x in (q2, k2, v2):
                x[:, :, t] += 1.0
            out = blocks_parallel(*(x.requires_grad_(not fused) for x in (q2, k2, v2)), spec)[0]
            assert torch.equal(out[:, :, :t], base[:, :, :t]), f"token {t} changed an earlier output"
            assert not torch.equal(out[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize("spec", SPECS[:3])
def test_non_finite_values_stay_where_they_are(spec):
    """A NaN in q, k or v at position p changes no output before p, in every form (the fused path steps aside)."""
    q, k, v = _qkv(1, 2, 1, 30, 6)
    clean = blocks_reference(q, k, v, spec)
    p = 13
    for which in range(3):
        bad = [t.clone() for t in (q, k, v)]
        bad[which][:, :, p] = float("nan")
        assert not fused_available(*bad)
        forms = {"reference": blocks_reference(*bad, spec), "parallel": blocks_parallel(*bad, spec)[0],
                 "step": _stream(*bad, spec)}
        for name, out in forms.items():
            assert torch.isfinite(out[:, :, :p]).all(), f"{name}: NaN in {'qkv'[which]} at {p} leaked backwards"
            assert_close(f"{name} before the NaN", out[:, :, :p], clean[:, :, :p])


def test_chunk_selection_takes_the_gathered_block_path(monkeypatch):
    """select="chunk" runs one fused SDPA call per slab of query chunks, with and without autograd, and steps
    aside for non-finite values and for a straight-through term that needs a gradient."""
    import bsbr.ops.bsbr_blocks as ops
    import bsbr.ops.bsbr_blocks_fast as fast

    calls = []
    real = ops._parallel_chunkwise
    monkeypatch.setattr(ops, "_parallel_chunkwise", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, 4, 2, 30, 6, grad=True)
    spec = BlockSpec(chunk=4, top_k=2, sink=3, select="chunk")
    ref = blocks_reference(q, k, v, spec)
    assert_close("chunkwise", blocks_parallel(q, k, v, spec)[0], ref)
    assert len(calls) == 1
    blocks_parallel(q, k, v, BlockSpec(chunk=4, top_k=2, select="chunk", grad="straight_through"))
    assert len(calls) == 1  # the straight-through term needs the explicit path's gradient
    bad = [t.detach().clone() for t in (q, k, v)]
    bad[1][:, :, 20] = float("nan")
    out = blocks_parallel(*bad, spec)[0]
    assert len(calls) == 1 and torch.isfinite(out[:, :, :20]).all()
    with torch.no_grad():  # many slabs: a small block bound splits the query chunks
        monkeypatch.setattr(fast, "_BLOCK_BYTES", 1)
        assert_close("chunkwise, one chunk per slab", blocks_parallel(q, k, v, spec)[0], ref)


def test_straight_through_changes_gradients_not_outputs():
    q, k, v = _qkv(1, 2, 2, 40, 6, grad=True)
    plain, st = BlockSpec(chunk=4, top_k=2), BlockSpec(chunk=4, top_k=2, grad="straight_through")
    a, b = blocks_parallel(q, k, v, plain)[0], blocks_parallel(q, k, v, st)[0]
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.square().sum(), q)[0]
    gb = torch.autograd.grad(b.square().sum(), q)[0]
    assert (ga - gb).abs().max() > 1e-6, "the straight-through term gave the scores no gradient"


def _grouped_softmax_by_hand(q, k, v, chunk):
    """Landmark's grouped softmax over every earlier chunk, one query at a time with Python loops (one head, mean-key
    summaries): weight of key s for query t = exp(q_t . k_s / sqrt(d)) * (p[t, c(s)] if c(s) < c(t) else 1),
    p[t] = softmax over the earlier complete chunks j of q_t . mean key_j / sqrt(d)."""
    T, d = q.shape
    out = torch.zeros_like(v)
    for t in range(T):
        c = t // chunk
        if c:
            means = torch.stack([k[j * chunk:(j + 1) * chunk].mean(0) for j in range(c)])
            p = torch.softmax(means @ q[t] / d**0.5, dim=0)
        w = torch.stack([torch.exp(q[t] @ k[s] / d**0.5) * (p[s // chunk] if s // chunk < c else 1.0)
                         for s in range(t + 1)])
        out[t] = (w[:, None] * v[: t + 1]).sum(0) / w.sum()
    return out


def test_grouped_selection_over_every_chunk_is_landmarks_grouped_softmax():
    q, k, v = _qkv(1, 1, 1, 23, 5)
    expected = _grouped_softmax_by_hand(q[0, 0], k[0, 0], v[0, 0], 4)[None, None]
    spec = BlockSpec(chunk=4, top_k=6, grad="grouped")
    assert_close("reference", blocks_reference(q, k, v, spec), expected, rel_tol=1e-10)
    assert_close("parallel", blocks_parallel(q, k, v, spec)[0], expected, rel_tol=1e-10)
    with torch.no_grad():
        assert_close("parallel, no grad", blocks_parallel(q, k, v, spec)[0], expected, rel_tol=1e-10)
    assert_close("step", _stream(q, k, v, spec), expected, rel_tol=1e-10)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (causal[:, :, 4:] - expected[:, :, 4:]).abs().max() > 1e-3  # the log-weights change the output


@pytest.mark.parametrize("spec", [
    BlockSpec(chunk=4, top_k=9, grad="grouped"),
    BlockSpec(chunk=5, top_k=9, sink=2, prev_chunk=True, summary="minmax", grad="grouped"),
    BlockSpec(chunk=4, top_k=9, sink=4, select="chunk", grad="grouped"),
    BlockSpec(chunk=3, top_k=9, sink=1, grad="straight_through"),
    BlockSpec(chunk=4, top_k=9),
])
@pytest.mark.parametrize(("G", "T"), [(1, 23), (3, 30), (2, 3)])
def test_dense_form_is_the_reference_with_every_chunk_selected(spec, G, T):
    q, k, v = _qkv(2, 2 * G, 2, T, 5, grad=True)
    ref, dense = blocks_reference(q, k, v, spec), blocks_dense(q, k, v, spec)
    assert_close(f"{spec} output", dense, ref, rel_tol=1e-10)
    w = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad((ref * w).sum(), (q, k, v)),
                          torch.autograd.grad((dense * w).sum(), (q, k, v)), strict=True):
        assert_close(f"{spec} d{name}", b, a, rel_tol=1e-9)
    bad = [t.detach().clone() for t in (q, k, v)]
    bad[2][:, :, T - 1] = float("nan")  # a NaN in the last value: the fused kernel would spread it
    out = blocks_dense(*bad, spec)
    assert torch.isfinite(out[:, :, : T - 1]).all() and torch.isnan(out[:, :, T - 1]).all()
    with pytest.raises(ValueError, match="top_k=1 selects fewer"):
        blocks_dense(q, k, v, BlockSpec(chunk=1, top_k=1))  # T >= 3: two or more earlier chunks


def test_parallel_form_makes_no_T_by_T_tensor():
    T, d = 2048, 16
    q, k, v = _qkv(1, 1, 1, T, d, dtype=torch.float32)
    spec = BlockSpec(chunk=64, top_k=2, sink=64)
    for grad in (False, True):
        with torch.profiler.profile(profile_memory=True) as prof, torch.set_grad_enabled(grad):
            out = blocks_parallel(*(t.requires_grad_(grad) for t in (q, k, v)), spec)[0]
            if grad:
                out.sum().backward()
        largest = max(e.cpu_memory_usage for e in prof.events())  # one op call's allocation
        assert largest < T * T * 4 // 4, f"an op allocated {largest} bytes (T*T*4 = {T * T * 4}), grad={grad}"
