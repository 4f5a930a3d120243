"""Block retrieval's selection (bsbr.ops.bsbr_blocks_select): scoring rows in groups against only the chunks they may
select picks what scoring every row against every chunk picks; the selection's distillation loss against a loop over
its definition (pooled summaries, an indexer, token scores, padded rows, chunks no query selected); add_loss.

The forms of the op are tested in test_ops_bsbr_blocks.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bsbr.ops.bsbr_blocks import (
    BlockSpec,
    add_loss,
    blocks_reference,
    candidates,
    scores,
    select,
    selection_distill_loss,
    summarize,
)
from bsbr.ops.bsbr_blocks_select import select_in_row_groups

from helpers import assert_close
from helpers import blocks_qkv as _qkv


@pytest.mark.parametrize("spec", [BlockSpec(chunk=4, top_k=3), BlockSpec(chunk=3, top_k=2, sink=3, prev_chunk=True,
                                                                          summary="minmax"),
                                  BlockSpec(chunk=4, top_k=2, summary="tokens")])
@pytest.mark.parametrize("group_chunks", [1, 2, 5, None])
@pytest.mark.parametrize("first_chunk", [0, 3])
def test_selection_in_row_groups_is_the_selection_over_every_chunk(spec, group_chunks, first_chunk):
    """Scoring groups of query rows against only the chunks they may select picks the same chunks as scoring every
    row against every chunk (fp64, no ties); slots a short row cannot fill are empty in both."""
    B, H, Hk, d, ch = 2, 4, 2, 5, spec.chunk
    n = 10 * ch + 2  # query rows from chunk first_chunk on, the last chunk incomplete
    q, k, _ = _qkv(B, H, Hk, first_chunk * ch + n, d)
    q = q[:, :, first_chunk * ch:]
    C = k.shape[2] // ch
    summ = summarize(k[:, :, : C * ch].reshape(B, Hk, C, ch, d), spec.summary)
    allowed = candidates(first_chunk + torch.arange(n) // ch, C, spec)
    idx, ok, _ = select(scores(q, summ, spec), allowed, spec)
    idx_g, ok_g = select_in_row_groups(q, summ, allowed, spec, first_chunk=first_chunk, group_chunks=group_chunks)
    assert torch.equal(ok_g, ok)
    assert torch.equal(idx_g.masked_fill(~ok_g, -1).sort(-1).values, idx.masked_fill(~ok, -1).sort(-1).values)
    assert ok.any() and (first_chunk or not ok.all())  # from chunk 0 on, the first rows cannot fill every slot


def _candidates_by_hand(t, chunk, spec):
    """The chunks query t may select: earlier ones, less the previous (``prev_chunk``) and chunk 0 when the sink
    covers it."""
    return [j for j in range(t // chunk) if (not spec.prev_chunk or j != t // chunk - 1)
            and not (j == 0 and spec.sink >= chunk)]


def _distill_tokens_by_hand(q, k, chunk, spec, index_q=None, index_k=None):
    """selection_distill_loss for summary="tokens" with rows=None: per query, - sum over the candidate chunks'
    tokens s of w[s] log p[s], w the causal softmax weight (averaged over the group's query heads), p the softmax
    over those tokens of the scorer's scores (q's summed over the group, or the indexer's query)."""
    B, H, T, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    total, n = 0.0, 0
    for b, h, t in itertools.product(range(B), range(Hk), range(T)):
        cand = _candidates_by_hand(t, chunk, spec)
        if not cand:
            continue
        toks = [s for j in cand for s in range(j * chunk, (j + 1) * chunk) if s >= spec.sink]  # the sink is in view
        w = sum(torch.softmax(k[b, h, : t + 1] @ q[b, h * G + g, t].detach() / d**0.5, dim=0).detach()[toks]
                for g in range(G)) / G
        if index_q is None:
            sc = sum(k[b, h, toks] @ q[b, h * G + g, t] for g in range(G)) / d**0.5
        else:
            sc = index_k[b, h, toks] @ index_q[b, h, t] / index_q.shape[-1] ** 0.5
        total = total - (w * torch.log_softmax(sc, dim=0)).sum()
        n += 1
    return total / n


def _distill_by_hand(q, k, chunk, spec, index_q=None, index_k=None):
    """selection_distill_loss with rows=None, one query at a time with Python loops (mean, min/max or max summaries,
    the group's query heads summed for the score and averaged for the target; with an indexer (one query head per
    key/value head) the scores are its query's against its keys' summaries)."""
    B, H, T, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    total, n = 0.0, 0
    for b in range(B):
        for h in range(Hk):
            for t in range(T):
                cand = _candidates_by_hand(t, chunk, spec)
                if not cand:
                    continue
                mass = torch.zeros(len(cand), dtype=q.dtype)
                sc = torch.zeros(len(cand), dtype=q.dtype)
                for g in range(G):
                    qt = q[b, h * G + g, t]
                    w = torch.softmax(k[b, h, : t + 1] @ qt.detach() / d**0.5, dim=0).detach()
                    for i, j in enumerate(cand):
                        keys = k[b, h, j * chunk : (j + 1) * chunk]
                        mass[i] += w[max(j * chunk, spec.sink) : (j + 1) * chunk].sum() / G  # sink in view
                        if index_q is not None:
                            if g == 0:
                                e = index_q.shape[-1]
                                sc[i] = index_q[b, h, t] @ index_k[b, h, j * chunk : (j + 1) * chunk].amax(0) / e**0.5
                        elif spec.summary == "max":
                            sc[i] = sc[i] + qt @ keys.amax(0) / d**0.5
                        elif spec.summary == "mean":
                            sc[i] = sc[i] + qt @ keys.mean(0) / d**0.5
                        else:
                            lo, hi = keys.amin(0), keys.amax(0)
                            sc[i] = sc[i] + (qt @ ((hi + lo) / 2) + qt.abs() @ ((hi - lo) / 2)) / d**0.5
                total = total - (mass * torch.log_softmax(sc, dim=0)).sum()
                n += 1
    return total / n


def _agree(name, got, want, wrt):
    """A loss and its gradients with respect to ``wrt`` against the by-hand loop's (fp64, 1e-10)."""
    assert_close(name, got, want, rel_tol=1e-10)
    ours = torch.autograd.grad(got, wrt, retain_graph=True)
    for a, b in zip(ours, torch.autograd.grad(want, wrt, retain_graph=True), strict=True):
        assert_close(f"{name} gradient", a, b, rel_tol=1e-10)


@pytest.mark.parametrize("spec", [BlockSpec(chunk=4, top_k=1), BlockSpec(chunk=3, top_k=2, summary="minmax",
                                                                         prev_chunk=True),
                                  BlockSpec(chunk=3, top_k=1, summary="max"), BlockSpec(chunk=4, top_k=1, sink=2),
                                  BlockSpec(chunk=3, top_k=1, sink=3)])
def test_selection_distill_loss_is_its_definition(spec):
    """The loss and its gradient (into q and k, through the scores only) against a loop over the definition, with
    two query heads per key/value head; ``rows`` keeps the last query."""
    q, k, _ = _qkv(2, 4, 2, 17, 5, grad=True)
    got = selection_distill_loss(q, k, spec, rows=None)
    want = _distill_by_hand(q, k, spec.chunk, spec)
    _agree("loss", got, want, (q, k))
    one = selection_distill_loss(q[..., -1:, :].expand_as(q).contiguous(), k, spec, rows=1)
    assert torch.isfinite(one) and one > 0


def test_selection_distill_loss_of_an_indexer_is_its_definition():
    """With index_q / index_k the scores are the indexer's ("max" summaries), the target still q's and k's: loss and
    gradients against the loop; q and k get no gradient."""
    q, k, _ = _qkv(2, 4, 2, 17, 5, grad=True)
    iq, ik = (torch.nn.functional.softplus(t).detach().requires_grad_() for t in _qkv(2, 2, 2, 17, 3, seed=1)[:2])
    spec = BlockSpec(chunk=3, top_k=2, summary="max")
    got = selection_distill_loss(q, k, spec, rows=None, index_q=iq, index_k=ik)
    want = _distill_by_hand(q, k, spec.chunk, spec, iq, ik)
    _agree("loss", got, want, (iq, ik))
    assert torch.autograd.grad(got, (q, k), allow_unused=True) == (None, None)


@pytest.mark.parametrize("spec", [BlockSpec(chunk=3, top_k=2, summary="tokens", prev_chunk=True),
                                  BlockSpec(chunk=3, top_k=2, summary="tokens", sink=2)])
def test_selection_distill_loss_of_token_scores_is_its_definition(spec):
    """summary="tokens": the loss is taken token by token (the scorer's softmax over every candidate chunk's tokens
    against the attention's weights there), for q and k (two query heads per key/value head) and for an indexer;
    values and gradients against the loop."""
    q, k, _ = _qkv(2, 4, 2, 17, 5, grad=True)
    got = selection_distill_loss(q, k, spec, rows=None)
    want = _distill_tokens_by_hand(q, k, spec.chunk, spec)
    _agree("loss", got, want, (q, k))
    iq, ik = (torch.nn.functional.softplus(t).detach().requires_grad_() for t in _qkv(2, 2, 2, 17, 3, seed=1)[:2])
    got = selection_distill_loss(q, k, spec, rows=None, index_q=iq, index_k=ik)
    want = _distill_tokens_by_hand(q, k, spec.chunk, spec, iq, ik)
    _agree("indexer loss", got, want, (iq, ik))
    # the chunks' scores are the log-sum-exp of the tokens' (so their softmax is the tokens' chunk marginal)
    summ = summarize(ik[:, :, :15].reshape(2, 2, 5, 3, 3), "tokens")
    tok = scores(iq, summ, spec, tokens=True)
    assert_close("log-sum-exp", scores(iq, summ, spec), tok.logsumexp(dim=-1), rel_tol=1e-12)
    with pytest.raises(ValueError, match="tokens=True needs summary='tokens'"):
        scores(iq, summ, BlockSpec(chunk=3, top_k=2), tokens=True)


@pytest.mark.parametrize("spec", [BlockSpec(chunk=3, top_k=1), BlockSpec(chunk=3, top_k=2, summary="tokens")])
def test_selection_distill_loss_counts_only_real_rows(spec):
    """With num_valid the loss is the mean over real query positions only: a batch of a full row and a row of L real
    tokens padded with (finite) garbage gives the rows' own losses weighted by their counts of positions with a
    candidate, values and gradients; no real position at all gives 0 in the graph."""
    q, k, _ = _qkv(2, 4, 2, 17, 5, grad=True)
    L = 11
    got = selection_distill_loss(q, k, spec, rows=None, num_valid=torch.tensor([17, L]))
    full = selection_distill_loss(q[:1], k[:1], spec, rows=None)
    short = selection_distill_loss(q[1:, :, :L], k[1:, :, :L], spec, rows=None)
    n_full, n_short = 17 - spec.chunk, L - spec.chunk  # positions from chunk 1 on have a candidate
    want = (n_full * full + n_short * short) / (n_full + n_short)
    _agree("loss", got, want, (q, k))
    assert (selection_distill_loss(q, k, spec, rows=None) - got).abs() > 1e-6  # counting the padded rows differs
    none = selection_distill_loss(q, k, spec, rows=None, num_valid=torch.tensor([2, 0]))
    assert none == 0 and none.requires_grad


def test_selection_distill_loss_reaches_chunks_no_query_selected():
    """The gradient of the other chunks' outputs leaves the keys of a chunk nobody selected at zero (top_k 1,
    selection_grad none); the distillation loss gives them one: every candidate's score learns."""
    q, k, v = _qkv(1, 1, 1, 24, 4, grad=True)
    spec = BlockSpec(chunk=4, top_k=1)
    with torch.no_grad():
        idx, ok, _ = select(scores(q, summarize(k.reshape(1, 1, 6, 4, 4), "mean"), spec),
                            candidates(torch.arange(24) // 4, 6, spec), spec)
    unpicked = sorted(set(range(5)) - set(idx[ok].tolist()))
    assert unpicked, "every chunk was selected by some query; pick another seed"
    j = unpicked[0]
    others = (torch.arange(24) // 4 != j)[:, None].double()  # chunk j's own queries see its keys locally
    g_out = torch.autograd.grad((blocks_reference(q, k, v, spec).square() * others).sum(), k)[0]
    g_loss = torch.autograd.grad(selection_distill_loss(q, k, spec), k)[0]
    assert g_out[..., j * 4 : (j + 1) * 4, :].abs().max() == 0
    assert g_loss[..., j * 4 : (j + 1) * 4, :].abs().max() > 1e-6


def test_add_loss_adds_the_loss_gradient_and_leaves_the_value():
    q, k, v = _qkv(1, 2, 2, 13, 4, grad=True)
    spec = BlockSpec(chunk=4, top_k=1)
    o = blocks_reference(q, k, v, spec)
    carried = add_loss(o, selection_distill_loss(q, k, spec), 0.3)
    assert torch.equal(carried, o)
    want = torch.autograd.grad(blocks_reference(q, k, v, spec).sum() + 0.3 * selection_distill_loss(q, k, spec),
                               (q, k, v))
    for a, b in zip(torch.autograd.grad(carried.sum(), (q, k, v)), want, strict=True):
        assert_close("gradient", a, b, rel_tol=1e-12)
