"""BSBR's block retrieval of tokens (``retrieval="blocks"``): chunk summaries select earlier chunks, and each query
attends with ONE exact softmax to the tokens of its own chunk (causal), the selected chunks and the chunks always
in view.  Pure tensor functions; see docs/bsbr.md ("Block retrieval of tokens").

Shapes: q [B, H, T, d]; k, v [B, Hk, T, d] with Hk dividing H (G = H / Hk query heads share a key/value head and
its selection; the native layer has Hk = H); chunk size ``chunk``; chunk of position t is c(t) = t // chunk.

    summary_j   = the mean key of complete chunk j ("mean"), or its per-channel centre and radius ("minmax":
                  q . centre + |q| . radius is the largest q . k any key inside the chunk's min/max box can give)
                  (its per-channel maximum for "max"; for "tokens" no summary: every key of the chunk is kept)
    score[t, j] = scaling * sum over the G query heads of the group of  q'_t . summary_j
                  (q'_t = q_t for ``select="token"``; the query at the first position of c(t) for ``"chunk"``;
                  for "tokens" the log-sum-exp over the chunk's keys s of that score with k_s for summary_j)
    cand(t)     = chunks j < c(t), less the chunks always in view
    sel(t)      = the top_k chunks of cand(t) by score
    in view     = the first ``sink`` tokens (for queries after chunk 0) and, with ``prev_chunk``, chunk c(t) - 1
    o[t]        = softmax over s in {own chunk, s <= t} U sel(t)'s tokens U in view  of  scaling * q_t . k_s, on v_s

A token is counted once: the sink tokens of a selected chunk 0 are taken from the sink, and the previous chunk is
never a candidate when it is always in view.  With top_k >= c(t) every earlier chunk is seen and o is causal
softmax attention exactly.

An indexer may select instead of q and k (``index_q`` [B, Hi, T, e] with Hk dividing Hi, ``index_k`` [B, Hk, T, e],
as DeepSeek's sparse attention scores with a lightning indexer of its own): the summaries are then index_k's and
the scores index_q's; nothing else changes.

A hard top-k gives the scores no gradient.  ``grad="straight_through"`` adds log p[t, j] - stopgrad(log p[t, j])
(p = softmax of the scores over cand(t)) to the logits of the tokens a query sees through selected chunk j: zero
in value (outputs are unchanged, exactness holds), and the gradient of Landmark Attention's grouped softmax, so the
scores learn which chunks the attention used.  ``grad="grouped"`` adds log p[t, j] itself: Landmark's grouped
softmax, in which a token of selected chunk j is weighted by p[t, j] (the chunks always in view and the own chunk
by 1).  It changes the outputs (top_k >= c(t) is then the grouped softmax over every earlier chunk, not causal
softmax attention), and trained with every chunk selected (the layer's ``train_top_k``) the scores get a gradient
from every chunk, not only from the few a hard top-k picked.

Three forms compute the same thing:

* :func:`blocks_reference` — a dense [T, T] mask from the definition (tests, attention maps);
* :func:`blocks_parallel` — no [T, T] tensor: a fixed part (sink, previous and own chunk: [chunk, s + 2 chunk]
  blocks per query chunk) and, for the selected chunks, each chunk's keys against the queries that chose it
  (pairs grouped by chunk, in fixed-shape tiles: batched matmuls), merged by log-sum-exp; it continues
  a stream from cached keys and summaries;
* :func:`blocks_step` — one token per row from the cache: O((top_k + in view + 1) * chunk * d + C * d).

Files: this one holds the definition, the reference, the parallel form's dispatch and the step;
:mod:`~bsbr.ops.bsbr_blocks_select` the settings and the selection; :mod:`~bsbr.ops.bsbr_blocks_tiles` the explicit
(differentiable) parallel path; :mod:`~bsbr.ops.bsbr_blocks_fast` the fused inference paths.
"""

from __future__ import annotations

import math

import torch

from .bsbr_blocks_fast import _all_finite, _chunkwise_available, _parallel_chunkwise, _parallel_fused, fused_available
from .bsbr_blocks_select import (
    GRADS,
    SELECTIONS,
    SUMMARIES,
    BlockSpec,
    _attend,
    _expand,
    _selection_queries,
    _selectors,
    add_loss,
    candidates,
    scores,
    select,
    select_in_row_groups,
    selection_distill_loss,
    summarize,
    summary_width,
)
from .bsbr_blocks_tiles import _fixed_part, _selected_part

__all__ = ["GRADS", "SELECTIONS", "SUMMARIES", "BlockSpec", "blocks_dense", "blocks_parallel", "blocks_reference",
           "blocks_step", "candidates", "fused_available", "scores", "select", "selection_distill_loss", "summarize",
           "summary_width", "add_loss"]


# ------------------------------------------------------------------------------------------ reference
def blocks_reference(q, k, v, spec: BlockSpec, *, return_weights: bool = False, index_q=None, index_k=None):
    """The definition with a dense [T, T] mask (slow in memory; tests and attention maps).

    q [B, H, T, d]; k, v [B, Hk, T, d]; an indexer's index_q [B, Hi, T, e], index_k [B, Hk, T, e] select if given.
    Returns o [B, H, T, d]; with ``return_weights`` also the softmax weights [B, H, T, T] (o = weights @ v, v
    repeated over each group)."""
    sq, sk = _selectors(q, k, index_q, index_k)
    B, H, T, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    ch = spec.chunk
    Cc = T // ch  # complete chunks
    pos = torch.arange(T, device=q.device)
    tc = pos // ch
    own = (tc[:, None] == tc[None, :]) & (pos[None, :] <= pos[:, None])
    view = (tc[:, None] >= 1) & (pos[None, :] < spec.sink)
    if spec.prev_chunk:
        view = view | (tc[None, :] == tc[:, None] - 1)
    fixed = own | view  # [T, T]
    picked = torch.zeros(B, Hk, T, T, dtype=torch.bool, device=q.device)
    bias_tok = q.new_zeros(B, Hk, T, T)
    if Cc:
        summ = summarize(sk[:, :, : Cc * ch].reshape(B, Hk, Cc, ch, sk.shape[-1]), spec.summary)
        sc = scores(_selection_queries(sq, spec), summ, spec)  # [B, Hk, T, Cc]
        idx, ok, bias = select(sc, candidates(tc, Cc, spec), spec)
        chosen = torch.zeros_like(sc, dtype=torch.bool).scatter(-1, idx, ok)  # [B, Hk, T, Cc]
        in_chunk = tc[None, :] < Cc
        key_chunk = tc.clamp(max=max(Cc - 1, 0))
        picked = chosen[..., key_chunk] & in_chunk & ~fixed
        if bias is not None:
            bias_tok = q.new_zeros(sc.shape).scatter(-1, idx, bias.to(q.dtype))[..., key_chunk]
            bias_tok = bias_tok.masked_fill(~picked, 0.0)
    seen = fixed | picked  # [B, Hk, T, T]
    seen_h, bias_h = _expand(seen, G), _expand(bias_tok, G)
    logits = (q @ _expand(k, G).transpose(-1, -2)) * spec.scale(d) + bias_h
    logits = logits.masked_fill(~seen_h, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = _attend(p, _expand(v, G), seen_h)
    return (out, p) if return_weights else out



def blocks_dense(q, k, v, spec: BlockSpec, *, index_q=None, index_k=None):
    """Every earlier chunk selected (``top_k`` >= the chunks before the last query's chunk; training as Landmark
    Attention trains): one causal ``scaled_dot_product_attention`` call.  The selection's log-weights (``grad``
    other than "none") ride along as C extra dimensions: each key gets the one-hot of its chunk (zeros for the sink
    tokens), each query its log p[t, j] / scale, so q' . k' = q . k + log p[t, c(s)] / scale and the fused causal
    kernel (no [T, T] mask, gradients included) computes the grouped softmax.  Nothing is skipped at this top_k.

    q [B, H, T, d]; k, v [B, Hk, T, d] -> o [B, H, T, d]; index_q, index_k as in :func:`blocks_reference`.
    Differentiable.  Non-finite values go to :func:`blocks_reference` (the fused kernel multiplies masked
    probabilities by every value)."""
    sq, sk = _selectors(q, k, index_q, index_k)
    B, H, T, d = q.shape
    Hk, ch = k.shape[1], spec.chunk
    G, Cc = H // Hk, T // ch
    if spec.top_k < (T - 1) // ch:  # the last query's chunk has (T - 1) // chunk earlier chunks
        raise ValueError(f"blocks_dense: top_k={spec.top_k} selects fewer than the {(T - 1) // ch} chunks before "
                         f"the last query's chunk (T={T}, chunk={ch})")
    if not _all_finite(q, k, v):
        return blocks_reference(q, k, v, spec, index_q=index_q, index_k=index_k)
    scale = spec.scale(d)
    kx, vx = _expand(k, G), _expand(v, G)
    if spec.grad != "none" and Cc:
        pos = torch.arange(T, device=q.device)
        tc = pos // ch
        summ = summarize(sk[:, :, : Cc * ch].reshape(B, Hk, Cc, ch, sk.shape[-1]), spec.summary)
        sc = scores(_selection_queries(sq, spec), summ, spec)  # [B, Hk, T, Cc]
        allowed = candidates(tc, Cc, spec)  # [T, Cc]: own chunk, later chunks and chunks in view get 0
        logp = torch.log_softmax(sc.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
        if spec.grad == "straight_through":
            logp = logp - logp.detach()
        onehot = (tc[:, None] == torch.arange(Cc, device=q.device)) & (pos >= spec.sink)[:, None]  # [T, Cc]
        q = torch.cat([q, _expand(logp, G).to(q.dtype) / scale], dim=-1)
        kx = torch.cat([kx, onehot.to(q.dtype).expand(B, H, T, Cc)], dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True, scale=scale)


def blocks_parallel(q, k, v, spec: BlockSpec, *, start: int = 0, summaries: torch.Tensor | None = None,
                    index_q=None, index_k=None):
    """Block retrieval for queries at positions start .. start + Tq - 1 (``start`` a multiple of chunk) over keys at
    positions 0 .. start + Tq - 1.

    q [B, H, Tq, d]; k, v [B, Hk, start + Tq, d]; ``summaries`` [B, Hk, C0, S]: the summaries of the first C0
    complete chunks if already known (a stream's cache), computed here otherwise; an indexer's index_q
    [B, Hi, Tq, e] and index_k [B, Hk, start + Tq, e] select if given (the summaries are then index_k's).  No [T, T]
    tensor is made.  Returns (o [B, H, Tq, d], summaries of every complete chunk [B, Hk, (start + Tq) // chunk, S]).
    """
    sq, sk = _selectors(q, k, index_q, index_k)
    B, H, Tq, d = q.shape
    Hk, L = k.shape[1], k.shape[2]
    G, ch = H // Hk, spec.chunk
    if start % ch or start + Tq != L:
        raise ValueError(f"blocks_parallel: start must be a multiple of chunk={ch} and keys must cover start + Tq "
                         f"positions, got start={start}, Tq={Tq}, keys={L}")
    Cq = math.ceil(Tq / ch)
    Tqp, Ctot = Cq * ch, start // ch + Cq
    if Tqp != Tq:
        pad = Tqp - Tq
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v))
        sq, sk = (q, k) if index_k is None else (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (sq, sk))
    Cc = L // ch
    C0 = 0 if summaries is None else summaries.shape[2]
    new = summarize(sk[:, :, C0 * ch : Cc * ch].reshape(B, Hk, Cc - C0, ch, sk.shape[-1]), spec.summary)
    summ = new if summaries is None else torch.cat([summaries, new], dim=2)
    qchunk = (start + torch.arange(Tqp, device=q.device)) // ch
    allowed = candidates(qchunk, Cc, spec) & (torch.arange(Tqp, device=q.device) < Tq)[:, None]
    if spec.select == "chunk" and spec.grad != "grouped" and _chunkwise_available(sq, sk, spec, q, k, v):
        # the rows of a chunk share its selection: score the chunks' first rows only
        idx, ok, _ = select(scores(sq[:, :, ::ch], summ, spec), allowed[::ch], spec, inplace=True)
        return _parallel_chunkwise(q, k, v, spec, idx, ok, start)[:, :, :Tq], summ
    fused = spec.grad != "grouped" and fused_available(q, k, v)  # (the fused path takes no log-weights)
    if spec.grad == "none" and spec.select == "token":
        # a choice with no gradient: each group of query rows scored against only the chunks it may select, and no
        # graph kept for the [Tq, C] scores (in training they would otherwise be saved for nothing)
        with torch.no_grad():
            idx, ok = select_in_row_groups(sq, summ, allowed, spec, first_chunk=start // ch)
        bias = None
    else:
        sc = scores(_selection_queries(sq, spec), summ, spec)  # [B, Hk, Tqp, Cc]
        idx, ok, bias = select(sc, allowed, spec, inplace=True)
    if fused:
        return _parallel_fused(q, k, v, spec, idx, ok, start, Ctot)[:, :, :Tq], summ
    qg = q.view(B, Hk, G, Tqp, d)
    # 1. the fixed part: sink, previous chunk and own chunk (causal), one [G * chunk, nf] block per query chunk
    qf = qg.view(B, Hk, G, Cq, ch, d).transpose(2, 3).reshape(B, Hk, Cq, G * ch, d)
    m_f, l_f, o_f = _fixed_part(qf, k, v, spec, start, G)
    m_f = m_f.view(B, Hk, Cq, G, ch).transpose(2, 3).reshape(B, Hk, G, Tqp)
    l_f = l_f.view(B, Hk, Cq, G, ch).transpose(2, 3).reshape(B, Hk, G, Tqp)
    o_f = o_f.view(B, Hk, Cq, G, ch, d).transpose(2, 3).reshape(B, Hk, G, Tqp, d)
    # 2. the selected chunks
    if idx.shape[-1] and bool(ok.any()):
        qs = qg.transpose(2, 3) * spec.scale(d)
        m_s, l_s, o_s = _selected_part(qs, k, v, spec, idx, ok, bias, Ctot, G)
        # 3. merge: one softmax over the union, by log-sum-exp
        m_s, l_s = m_s.permute(0, 1, 4, 2, 3), l_s.permute(0, 1, 4, 2, 3)  # [B, Hk, G, Tqp, K]
        o_s = o_s.permute(0, 1, 4, 2, 3, 5)  # [B, Hk, G, Tqp, K, d]
        m = torch.maximum(m_f, m_s.amax(dim=-1))
        w_f = torch.exp(m_f - m)
        w_s = torch.exp(m_s - m[..., None])  # 0 for empty slots (m_s = -inf)
        num = o_f * w_f[..., None] + (o_s * w_s[..., None]).sum(dim=-2)
        den = l_f * w_f + (l_s * w_s).sum(dim=-1)
    else:
        num, den = o_f, l_f
    out = (num / den[..., None]).reshape(B, H, Tqp, d)[:, :, :Tq]
    return out, summ


# ------------------------------------------------------------------------------------------ recurrent
def blocks_step(q, keys, values, summaries, lengths, spec: BlockSpec, select_q: torch.Tensor | None = None,
                index_q: torch.Tensor | None = None):
    """One new token per row, its key and value already written at position ``lengths[b]`` of ``keys``/``values``.

    q [B, H, 1, d]; keys, values [B, Hk, N, d] (N > max(lengths); rows hold their tokens 0 .. lengths[b]);
    summaries [B, Hk, C, S] of each row's complete chunks (rows may have fewer than C; the rest are ignored);
    lengths [B] long: the position of the new token in each row; ``select_q`` [B, H, 1, d]: with
    ``select="chunk"``, the query at the first position of each row's chunk (kept by the caller; an indexer's
    query there if one selects); ``index_q`` [B, Hi, 1, e]: an indexer's query for ``select="token"`` (the summaries
    are then its keys').
    Cost per row and head: O((top_k + in view + 1) * chunk * d + C * d).  Returns o [B, H, 1, d].
    """
    B, H, _, d = q.shape
    Hk = keys.shape[1]
    G, ch, s = H // Hk, spec.chunk, spec.sink
    dev = q.device
    ci = lengths // ch  # [B] chunk of the new token
    ar = torch.arange(ch, device=dev)
    # positions each row sees besides its selection: sink, previous chunk, own chunk up to the new token
    cols, seen = [], []
    if s:
        sink_seen = ci >= 1
        if spec.prev_chunk:
            sink_seen = sink_seen & (ci != 1)
        cols.append(torch.arange(s, device=dev).expand(B, s))
        seen.append(sink_seen[:, None].expand(B, s))
    if spec.prev_chunk:
        cols.append(((ci - 1).clamp(min=0) * ch)[:, None] + ar)
        seen.append((ci >= 1)[:, None].expand(B, ch))
    cols.append((ci * ch)[:, None] + ar)
    seen.append(ar[None, :] <= (lengths % ch)[:, None])
    bias = None
    if summaries is not None and summaries.shape[2]:
        C = summaries.shape[2]
        allowed = candidates(ci, C, spec) & (torch.arange(C, device=dev)[None, :] < (lengths // ch)[:, None])
        if spec.select == "chunk" and select_q is None:
            raise ValueError("blocks_step: select='chunk' needs select_q, the query at the chunk's first position")
        token_q = q if index_q is None else index_q
        sc = scores(token_q if spec.select == "token" else select_q, summaries, spec)[:, :, 0]  # [B, Hk, C]
        idx, ok, bias = select(sc, allowed[:, None, :], spec, inplace=True)  # [B, Hk, K]
        K = idx.shape[-1]
        sel_seen = ok[..., None].expand(B, Hk, K, ch)
        if s:
            sel_seen = sel_seen & ~((idx == 0)[..., None] & (ar < s))
        sel_seen = sel_seen.reshape(B, Hk, K * ch)
    else:
        K = 0
    fixed_pos = torch.cat(cols, dim=1)  # [B, nf]
    fixed_seen = torch.cat(seen, dim=1)
    nf = fixed_pos.shape[1]
    vis = fixed_seen[:, None].expand(B, Hk, nf)
    # the own chunk's later slots may lie past the buffer (never seen)
    fixed_pos = fixed_pos.clamp(max=keys.shape[2] - 1)[:, None, :]  # [B, 1, nf]
    bi, hi = torch.arange(B, device=dev).view(B, 1, 1), torch.arange(Hk, device=dev).view(1, Hk, 1)
    # rows of d numbers by advanced indexing (the selected chunks as whole [chunk, d] blocks), not an element-wise
    # gather (benchmarks/bench_convert_decode.py measures the step before and after: docs/convert.md)
    kx, vx = keys[bi, hi, fixed_pos], values[bi, hi, fixed_pos]  # [B, Hk, nf, d]
    if K:
        C = summaries.shape[2]
        ks = keys[:, :, : C * ch].unflatten(2, (C, ch))[bi, hi, idx].flatten(2, 3)  # [B, Hk, K * ch, d]
        vs = values[:, :, : C * ch].unflatten(2, (C, ch))[bi, hi, idx].flatten(2, 3)
        kx, vx = torch.cat([kx, ks], dim=2), torch.cat([vx, vs], dim=2)
        vis = torch.cat([vis, sel_seen], dim=2)
    logits = (q.view(B, Hk, G, d) @ kx.transpose(-1, -2)) * spec.scale(d)  # [B, Hk, G, n]
    if bias is not None:
        b = torch.cat([logits.new_zeros(B, Hk, nf), bias.to(logits.dtype).repeat_interleave(ch, dim=-1)], dim=2)
        logits = logits + b[:, :, None]
    vis = vis[:, :, None]
    logits = logits.masked_fill(~vis, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return _attend(p, vx, vis).view(B, H, 1, d)
