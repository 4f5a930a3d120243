"""BSBR's block retrieval of tokens (``retrieval="blocks"``): chunk summaries select earlier chunks, and each query
attends with ONE exact softmax to the tokens of its own chunk (causal), the selected chunks and the chunks always
in view.  Pure tensor functions; see docs/bsbr.md ("Block retrieval of tokens").

Shapes: q [B, H, T, d]; k, v [B, Hk, T, d] with Hk dividing H (G = H / Hk query heads share a key/value head and
its selection; the native layer has Hk = H); chunk size ``chunk``; chunk of position t is c(t) = t // chunk.

    summary_j   = the mean key of complete chunk j ("mean"), or its per-channel centre and radius ("minmax":
                  q . centre + |q| . radius is the largest q . k any key inside the chunk's min/max box can give)
    score[t, j] = scaling * sum over the G query heads of the group of  q'_t . summary_j
                  (q'_t = q_t for ``select="token"``; the query at the first position of c(t) for ``"chunk"``)
    cand(t)     = chunks j < c(t), less the chunks always in view
    sel(t)      = the top_k chunks of cand(t) by score
    in view     = the first ``sink`` tokens (for queries after chunk 0) and, with ``prev_chunk``, chunk c(t) - 1
    o[t]        = softmax over s in {own chunk, s <= t} U sel(t)'s tokens U in view  of  scaling * q_t . k_s, on v_s

A token is counted once: the sink tokens of a selected chunk 0 are taken from the sink, and the previous chunk is
never a candidate when it is always in view.  With top_k >= c(t) every earlier chunk is seen and o is causal
softmax attention exactly.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUMMARIES = ("mean", "minmax")
SELECTIONS = ("token", "chunk")
GRADS = ("none", "straight_through", "grouped")


@dataclass(frozen=True)
class BlockSpec:
    """The settings of block retrieval (checked by the layer; see the module docstring)."""

    chunk: int
    top_k: int
    sink: int = 0  # first tokens of the stream always in view after chunk 0 (<= chunk; == chunk: all of chunk 0)
    prev_chunk: bool = False  # the previous chunk always in view
    summary: str = "mean"
    select: str = "token"
    grad: str = "none"
    scaling: float | None = None  # softmax scale; None = 1 / sqrt(d)

    def scale(self, d: int) -> float:
        return d**-0.5 if self.scaling is None else self.scaling


# ------------------------------------------------------------------------------------------ selection
def summarize(k_chunks: torch.Tensor, summary: str) -> torch.Tensor:
    """Summaries of complete chunks: k_chunks [..., C, chunk, d] -> [..., C, S] (S = d for "mean", 2d for
    "minmax": centre then radius)."""
    if summary == "mean":
        return k_chunks.mean(dim=-2, dtype=torch.float32 if k_chunks.dtype in (torch.float16, torch.bfloat16)
                             else None)
    lo, hi = k_chunks.amin(dim=-2), k_chunks.amax(dim=-2)
    return torch.cat([(hi + lo) / 2, (hi - lo) / 2], dim=-1)


def scores(q: torch.Tensor, summaries: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    """Chunk scores, summed over each key/value group's query heads: q [B, H, n, d], summaries [B, Hk, C, S]
    -> [B, Hk, n, C]."""
    B, H, n, d = q.shape
    Hk = summaries.shape[1]
    if q.dtype in (torch.float16, torch.bfloat16):  # a choice, not a weight: scored in fp32 (fewer flipped ties)
        q, summaries = q.float(), summaries.float()
    qq = q if spec.summary == "mean" else torch.cat([q, q.abs()], dim=-1)
    s = qq.reshape(B, Hk, H // Hk * n, -1) @ summaries.transpose(-1, -2)  # [B, Hk, G * n, C]
    return s.view(B, Hk, H // Hk, n, -1).sum(dim=2) * spec.scale(d)


def candidates(query_chunks: torch.Tensor, num_chunks: int, spec: BlockSpec) -> torch.Tensor:
    """query_chunks [n] (the chunk of each query; any shape [...]) -> bool [..., num_chunks]: which complete chunks
    each query may select (earlier ones, less those always in view)."""
    j = torch.arange(num_chunks, device=query_chunks.device)
    c = query_chunks[..., None]
    ok = j < c
    if spec.prev_chunk:
        ok = ok & (j != c - 1)
    if spec.sink >= spec.chunk:
        ok = ok & (j != 0)
    return ok


def select(score: torch.Tensor, allowed: torch.Tensor, spec: BlockSpec):
    """The top_k allowed chunks of each query: score [..., C], allowed bool broadcastable to it.

    Returns (idx [..., K] long, ok [..., K] bool, bias [..., K] or None) with K = min(top_k, C); ``bias`` is the
    log-weight added to each selected chunk's logits: log p - stopgrad(log p) (zero in value) for
    ``"straight_through"``, log p for ``"grouped"``."""
    C = score.shape[-1]
    K = min(spec.top_k, C)
    masked = score.masked_fill(~allowed, float("-inf"))
    if K == 0:
        empty = score.new_zeros(*score.shape[:-1], 0)
        return empty.long(), empty.bool(), None
    vals, idx = masked.topk(K, dim=-1)
    ok = allowed.expand_as(score).gather(-1, idx)
    bias = None
    if spec.grad != "none":
        logp = torch.log_softmax(masked, dim=-1).gather(-1, idx)
        logp = torch.where(ok, logp, 0.0)
        bias = logp - logp.detach() if spec.grad == "straight_through" else logp
    return idx, ok, bias


def _selection_queries(q: torch.Tensor, spec: BlockSpec, offset: int = 0) -> torch.Tensor:
    """The query each position selects with: q itself ("token") or the query at its chunk's first position
    ("chunk"); q [B, H, n, d] holds positions offset .. offset + n - 1 with offset % chunk == 0."""
    if spec.select == "token":
        return q
    firsts = (torch.arange(q.shape[2], device=q.device) // spec.chunk) * spec.chunk
    return q[:, :, firsts]


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hk, ...] -> [B, Hk * groups, ...]."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _attend(p: torch.Tensor, v: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """p @ v where p is zero outside ``seen``, without letting a non-finite value outside ``seen`` in (0 * NaN):
    p [..., n, m], v [..., m, d], seen bool broadcastable to p.  Rows that see a non-finite value get NaN."""
    bad = ~torch.isfinite(v).all(dim=-1)  # [..., m]
    if not bool(bad.any()):
        return p @ v
    out = p @ torch.where(bad[..., None], 0.0, v)
    hit = (seen & bad[..., None, :]).any(dim=-1, keepdim=True)
    return torch.where(hit, float("nan"), out)


# ------------------------------------------------------------------------------------------ reference
def blocks_reference(q, k, v, spec: BlockSpec, *, return_weights: bool = False):
    """The definition with a dense [T, T] mask (slow in memory; tests and attention maps).

    q [B, H, T, d]; k, v [B, Hk, T, d].  Returns o [B, H, T, d]; with ``return_weights`` also the softmax weights
    [B, H, T, T] (o = weights @ v, v repeated over each group)."""
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
        summ = summarize(k[:, :, : Cc * ch].reshape(B, Hk, Cc, ch, d), spec.summary)
        sc = scores(_selection_queries(q, spec), summ, spec)  # [B, Hk, T, Cc]
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


# ------------------------------------------------------------------------------------------- parallel
def _fixed_part(q, k, v, spec: BlockSpec, start: int, G: int):
    """Sink, previous and own chunk for the queries of chunks start // chunk .. (query chunks Cq):
    q [B, Hk, Cq, G * chunk, d] (grouped), k, v [B, Hk, Lp, d] padded to whole chunks.
    Returns (m, l, o): the logits' max [B, Hk, Cq, G * chunk], sum of exp, and unnormalised output."""
    B, Hk, Cq, n, d = q.shape
    ch, s = spec.chunk, spec.sink
    ci = start // ch + torch.arange(Cq, device=q.device)  # [Cq] stream chunk of each query chunk
    cols, valid = [], []
    if s:
        sink_seen = ci >= 1
        if spec.prev_chunk:
            sink_seen = sink_seen & (ci != 1)  # chunk 0 is the previous chunk: its sink tokens are in view already
        cols.append(torch.arange(s, device=q.device).expand(Cq, s))
        valid.append(sink_seen[:, None, None].expand(Cq, ch, s))
    if spec.prev_chunk:
        cols.append(((ci - 1).clamp(min=0) * ch)[:, None] + torch.arange(ch, device=q.device))
        valid.append((ci >= 1)[:, None, None].expand(Cq, ch, ch))
    cols.append((ci * ch)[:, None] + torch.arange(ch, device=q.device))
    valid.append(torch.ones(ch, ch, dtype=torch.bool, device=q.device).tril().expand(Cq, ch, ch))
    cols = torch.cat(cols, dim=1)  # [Cq, nf] key positions
    seen = torch.cat(valid, dim=2)  # [Cq, ch, nf]
    seen = seen[:, None].expand(Cq, G, ch, -1).reshape(Cq, n, -1)  # rows are (head in group, position)
    kf, vf = k[:, :, cols], v[:, :, cols]  # [B, Hk, Cq, nf, d]
    logits = (q @ kf.transpose(-1, -2)) * spec.scale(d)
    logits = logits.masked_fill(~seen, float("-inf"))
    m = logits.amax(dim=-1)
    e = torch.exp(logits - m[..., None])
    return m, e.sum(dim=-1), _attend(e, vf, seen)


# Pairs (query, selected chunk) are computed in tiles of ``tile`` queries against one chunk's keys: batched matmuls
# of fixed-shape [tile * G, d] x [d, chunk] products.  A matmul's row can round differently when the number of rows
# changes (size-dependent kernels), so a tile shape fixed by the settings alone keeps each query's output independent
# of which other queries chose the same chunk (bitwise causality).  ``tile`` follows the chunk (16 .. 128) so that
# a tile gathers about as many keys as queries; tiles go in slabs to bound the gathered keys.
_SLAB_BYTES = 16 * 2**20


def _tile(chunk: int) -> int:
    return min(128, max(16, chunk))


def _tiles(idx, ok, Tq: int, Ctot: int, ch: int):
    """Lay the (query, selected chunk) pairs out in tiles of queries that read one chunk.

    idx, ok [B, Hk, Tq, K].  Returns (pair, row, slots, tile_chunk): ``pair`` [P] the flat (b, hk, t, slot) of each
    real pair (sorted by chunk), ``row`` [P] its flat (b, hk, t), ``slots`` [tiles, tile] the pair index held by each
    tile entry (-1 = empty), ``tile_chunk`` [tiles] the flat (b, hk, chunk) each tile reads."""
    K = idx.shape[-1]
    dev = idx.device
    pair = ok.reshape(-1).nonzero().squeeze(-1)
    row = pair // K
    group = (row // Tq) * Ctot + idx.reshape(-1)[pair]
    order = torch.argsort(group, stable=True)
    pair, row, group = pair[order], row[order], group[order]
    uniq, counts = torch.unique_consecutive(group, return_counts=True)
    tile = _tile(ch)
    rank = torch.arange(pair.numel(), device=dev) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    tiles = (counts + tile - 1) // tile
    tile_of_pair = (torch.cumsum(tiles, 0) - tiles).repeat_interleave(counts) + rank // tile
    slots = torch.full((int(tiles.sum()), tile), -1, dtype=torch.long, device=dev)
    slots[tile_of_pair, rank % tile] = torch.arange(pair.numel(), device=dev)
    return pair, row, slots, uniq.repeat_interleave(tiles)


def _slabs(slots: torch.Tensor, ch: int, d: int, itemsize: int):
    """Row ranges of ``slots`` processed together (bounded gathered keys)."""
    step = max(1, _SLAB_BYTES // (2 * ch * d * itemsize))
    return [(t0, min(t0 + step, slots.shape[0])) for t0 in range(0, slots.shape[0], step)]


def _to_slots(parts: list, dests: list, pair, P: int, fill: torch.Tensor, size: int) -> torch.Tensor:
    """Scatter per-pair results (in tile order) back to slot order with one gather; empty slots get ``fill``."""
    where = torch.full((size,), P, dtype=torch.long, device=fill.device)
    if dests:
        where[pair[torch.cat(dests)]] = torch.arange(P, device=fill.device)
    return torch.cat([*parts, fill[None]])[where]


def _selected_part(q, k, v, spec: BlockSpec, idx, ok, bias, Ctot: int, G: int):
    """Each selected chunk's keys against the queries that chose it (explicit logits; differentiable).

    q [B, Hk, Tq, G, d] (queries, grouped, already multiplied by the softmax scale); k, v [B, Hk, Lp, d];
    idx, ok [B, Hk, Tq, K].  Returns (m, l, o) per query and selected slot: [B, Hk, Tq, K, G] (m = -inf where a
    slot is empty) and o [B, Hk, Tq, K, G, d] (unnormalised: sum of exp(logit - m) v)."""
    B, Hk, Tq, K = idx.shape
    d, ch = q.shape[-1], spec.chunk
    pair, row, slots, tile_chunk = _tiles(idx, ok, Tq, Ctot, ch)
    tile = slots.shape[1]
    qrows = q.reshape(B * Hk * Tq, G, d)
    kchunks, vchunks = k.reshape(B * Hk * Ctot, ch, d), v.reshape(B * Hk * Ctot, ch, d)
    ms, ls, os_, dests = [], [], [], []
    for t0, t1 in _slabs(slots, ch, d, q.element_size()):
        sl, chunks = slots[t0:t1], tile_chunk[t0:t1]
        n, filled = sl.shape[0], sl >= 0
        logits = qrows[row[sl.clamp(min=0)]].reshape(n, tile * G, d) @ kchunks[chunks].transpose(-1, -2)
        if spec.sink:  # chunk 0's sink tokens are counted in the fixed part
            first = (chunks % Ctot == 0).nonzero().squeeze(-1)
            if first.numel():
                hidden = torch.arange(ch, device=q.device) < spec.sink
                logits = logits.index_put((first,), logits[first].masked_fill(hidden, float("-inf")))
        m = logits.amax(dim=-1)
        e = torch.exp(logits - m[..., None])
        o = e @ vchunks[chunks]  # [n, tile * G, d]
        ms.append(m.view(n, tile, G)[filled])
        ls.append(e.sum(dim=-1).view(n, tile, G)[filled])
        os_.append(o.view(n, tile, G, d)[filled])
        dests.append(sl[filled])
    P, size = pair.numel(), B * Hk * Tq * K
    m_out = _to_slots(ms, dests, pair, P, q.new_full((G,), float("-inf")), size).view(B, Hk, Tq, K, G)
    l_out = _to_slots(ls, dests, pair, P, q.new_zeros(G), size).view(B, Hk, Tq, K, G)
    o_out = _to_slots(os_, dests, pair, P, q.new_zeros(G, d), size).view(B, Hk, Tq, K, G, d)
    if bias is not None:  # shift the slot's logits by its log-weight (straight-through: = 0 in value)
        m_out = m_out + bias.to(m_out.dtype)[..., None]
    return m_out, l_out, o_out


# ------------------------------------------------------------------------------- fused inference path
def _flash(q, k, v, scale: float, causal: bool = False, mask=None):
    """CPU flash attention that also returns the log-sum-exp: q [N, h, n, d], k, v [N, h, m, d] -> (o, lse [N, h, n]).
    Used without autograd only (the kernel passes no gradient through the log-sum-exp)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                       scale=scale)


def fused_available(*tensors: torch.Tensor) -> bool:
    """True where the fused path may run: CPU, fp32/fp64, no autograd graph, every value finite (the fused kernel
    multiplies masked probabilities by every value, so a NaN anywhere would reach other positions)."""
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return False
    return _all_finite(*tensors)


def _parallel_fused(q, k, v, spec: BlockSpec, idx, ok, start: int, Ctot: int):
    """Inference form of :func:`blocks_parallel` on padded inputs (q [B, H, Tqp, d], k, v [B, Hk, Lp, d]): partial
    softmaxes through the fused CPU kernel (own chunk, sink tokens, previous chunk, selected chunks in tiles), merged
    by their log-sum-exp without gathering keys for the parts every query of a chunk shares.  Returns
    o [B, H, Tqp, d]."""
    B, H, Tqp, d = q.shape
    Hk = k.shape[1]
    G, ch, s = H // Hk, spec.chunk, spec.sink
    Cq, c0, scale = Tqp // ch, start // ch, spec.scale(d)
    dev = q.device
    kx, vx = _expand(k, G), _expand(v, G)
    kc, vc = kx.view(B, H, Ctot, ch, d), vx.view(B, H, Ctot, ch, d)
    qa = q.reshape(B, H * Cq, ch, d)
    ci = c0 + torch.arange(Cq, device=dev)
    dense = []  # (o [B, H, Tqp, d], lse [B, H, Tqp]) of the parts every query of a chunk shares
    # own chunk, causal: one [chunk, chunk] block per (row, head, chunk)
    o, lse = _flash(qa, kc[:, :, c0:].reshape(B, H * Cq, ch, d), vc[:, :, c0:].reshape(B, H * Cq, ch, d), scale,
                    causal=True)
    dense.append((o.reshape(B, H, Tqp, d), lse.reshape(B, H, Tqp)))
    if s:  # the sink tokens, for query chunks after the first (and after chunk 1 when chunk 0 is the previous one)
        o, lse = _flash(q, kx[:, :, :s], vx[:, :, :s], scale)
        sees = (ci >= 1) & ~((ci == 1) & spec.prev_chunk)
        lse = lse.reshape(B, H, Cq, ch).masked_fill(~sees[:, None], float("-inf"))
        dense.append((o.reshape(B, H, Tqp, d), lse.reshape(B, H, Tqp)))
    if spec.prev_chunk:  # the previous chunk: query chunk i against chunk i - 1 (none for the stream's chunk 0)
        first = 1 if c0 == 0 else 0
        o = q.new_zeros(B, H, Cq, ch, d)
        lse = q.new_full((B, H, Cq, ch), float("-inf"))
        if Cq > first:
            qp = q.view(B, H, Cq, ch, d)[:, :, first:].reshape(B, H * (Cq - first), ch, d)
            kp = kc[:, :, c0 - 1 + first : c0 - 1 + Cq].reshape(B, H * (Cq - first), ch, d)
            vp = vc[:, :, c0 - 1 + first : c0 - 1 + Cq].reshape(B, H * (Cq - first), ch, d)
            op, lp = _flash(qp, kp, vp, scale)
            o[:, :, first:] = op.reshape(B, H, Cq - first, ch, d)
            lse[:, :, first:] = lp.reshape(B, H, Cq - first, ch)
        dense.append((o.reshape(B, H, Tqp, d), lse.reshape(B, H, Tqp)))
    # the selected chunks, in tiles of queries that read one chunk
    K = idx.shape[-1]
    tiles = []
    if K and bool(ok.any()):
        pair, row, slots, tile_chunk = _tiles(idx, ok, Tqp, Ctot, ch)
        tile = slots.shape[1]
        qrows = q.view(B, Hk, G, Tqp, d).transpose(2, 3).reshape(B * Hk * Tqp, G, d)
        kchunks, vchunks = k.reshape(B * Hk * Ctot, ch, d), v.reshape(B * Hk * Ctot, ch, d)
        g = torch.arange(G, device=dev)
        hide_sink = 0 < s < ch  # chunk 0 is a candidate and its sink tokens are counted with the sink part
        slabs = _slabs(slots, ch, d, q.element_size())
        most = max(t1 - t0 for t0, t1 in slabs)  # gathers reuse three buffers (fresh pages per slab cost ~1 s at 32k)
        qbuf, kbuf, vbuf = q.new_empty(most * tile, G * d), k.new_empty(most, ch * d), v.new_empty(most, ch * d)
        qflat, kflat, vflat = qrows.reshape(-1, G * d), kchunks.reshape(-1, ch * d), vchunks.reshape(-1, ch * d)
        for t0, t1 in slabs:
            sl, chunks = slots[t0:t1], tile_chunk[t0:t1]
            n = sl.shape[0]
            qt = torch.index_select(qflat, 0, row[sl.clamp(min=0)].reshape(-1), out=qbuf[: n * tile])
            qt = qt.view(1, n, tile * G, d)
            kt = torch.index_select(kflat, 0, chunks, out=kbuf[:n]).view(1, n, ch, d)
            vt = torch.index_select(vflat, 0, chunks, out=vbuf[:n]).view(1, n, ch, d)
            mask = None
            if hide_sink and bool((chunks % Ctot == 0).any()):
                hidden = (chunks % Ctot == 0)[:, None] & (torch.arange(ch, device=dev) < s)
                mask = q.new_zeros(1, n, 1, ch).masked_fill(hidden[None, :, None], float("-inf"))
                mask = mask.expand(1, n, tile * G, ch)
            o, lse = _flash(qt, kt, vt, scale, mask=mask)
            # flat (b, hk, g, t) of [B, H, Tqp] each entry adds to; empty entries go to a spare row at the end
            r = row[sl.clamp(min=0)]
            dest = ((r // Tqp)[..., None] * G + g) * Tqp + (r % Tqp)[..., None]  # [n, tile, G]
            dest = dest.masked_fill((sl < 0)[..., None], B * H * Tqp)
            tiles.append((o.reshape(n, tile, G, d), lse.reshape(n, tile, G), dest))
    # log-sum-exp over every part, then o = sum_p exp(lse_p - LSE) o_p (row B * H * Tqp: the spare row)
    m = torch.stack([lse for _, lse in dense]).amax(dim=0).reshape(-1)
    m = torch.cat([m, m.new_zeros(1)])
    for _, lse, dest in tiles:
        m = m.scatter_reduce(0, dest.reshape(-1), lse.reshape(-1), reduce="amax")
    total = torch.cat([sum(torch.exp(lse.reshape(-1) - m[:-1]) for _, lse in dense), m.new_ones(1)])
    for _, lse, dest in tiles:
        total.index_add_(0, dest.reshape(-1), torch.exp(lse.reshape(-1) - m[dest.reshape(-1)]))
    big = m + torch.log(total)
    out = torch.cat([sum(o.reshape(-1, d) * torch.exp(lse.reshape(-1) - big[:-1])[:, None] for o, lse in dense),
                     q.new_zeros(1, d)])
    for o, lse, dest in tiles:
        w = torch.exp(lse.reshape(-1) - big[dest.reshape(-1)])
        out.index_add_(0, dest.reshape(-1), o.reshape(-1, d) * w[:, None])
    out = out[:-1]
    return out.view(B, H, Tqp, d)


# ------------------------------------------------------------------ per-chunk selection: one gathered block
_BLOCK_BYTES = 64 * 2**20  # bound on the keys, values and mask gathered at once


def _chunkwise_available(q, k, spec: BlockSpec, *tensors) -> bool:
    """True where :func:`_parallel_chunkwise` may run: no straight-through term that needs a gradient (the scores
    depend on q and k), and finite values (masked keys are multiplied by 0 inside the fused kernel, so a NaN at a
    hidden position would leak)."""
    if spec.grad == "straight_through" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    return _all_finite(*tensors)


def _all_finite(*tensors: torch.Tensor) -> bool:
    """True when every value is finite: one reduction per tensor (a NaN or inf makes the sum non-finite; a sum
    that overflows reads as non-finite too, which only sends the caller to the slower, NaN-safe path)."""
    acc = lambda t: torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None  # noqa: E731
    return all(bool(torch.isfinite(t.sum(dtype=acc(t)))) for t in tensors)


def _parallel_chunkwise(q, k, v, spec: BlockSpec, idx, ok, start: int):
    """``select="chunk"``: every query of a chunk shares its selection, so each query chunk attends to ONE gathered
    key block [sink | previous chunk | K selected chunks | own chunk] through one fused
    ``scaled_dot_product_attention`` call with a mask (causal inside the own chunk; empty slots and a selected
    chunk 0's sink tokens hidden).  Differentiable; every query chunk is its own batch entry of a fixed shape, so a
    query's output does not depend on later chunks (bitwise causality).

    q [B, H, Tqp, d] (padded to whole chunks); k, v [B, Hk, start + Tqp, d]; idx, ok [B, Hk, Cq, K]: the selection
    of each query chunk.  Returns o [B, H, Tqp, d]."""
    B, H, Tqp, d = q.shape
    Hk = k.shape[1]
    G, ch, s = H // Hk, spec.chunk, spec.sink
    Cq, c0, K = Tqp // ch, start // ch, idx.shape[-1]
    dev = q.device
    ci = c0 + torch.arange(Cq, device=dev)
    ar = torch.arange(ch, device=dev)
    # the key block of each query chunk, in whole chunks: [chunk 0 (sink) | previous | K selected | own]
    parts, vis = [], []  # chunk index [B, Hk, Cq, 1 or K] and visibility [B, Hk, Cq, that * ch] of each part
    full = lambda c: c.expand(B, Hk, Cq, c.shape[-1])  # noqa: E731
    if s:  # the sink: chunk 0's first s tokens (the rest of chunk 0 is hidden here; it may be selected)
        sink_seen = (ci >= 1) & ~((ci == 1) & spec.prev_chunk)
        parts.append(full(torch.zeros(Cq, 1, dtype=torch.long, device=dev)))
        vis.append(full(sink_seen[:, None] & (ar < s)))
    if spec.prev_chunk:
        parts.append(full((ci - 1).clamp(min=0)[:, None]))
        vis.append(full((ci >= 1)[:, None].expand(Cq, ch)))
    sel_vis = ok[..., None].expand(B, Hk, Cq, K, ch)
    if 0 < s < ch:  # chunk 0 is a candidate; its sink tokens are counted in the sink part
        sel_vis = sel_vis & ~((idx == 0)[..., None] & (ar < s))
    parts += [idx, full(ci[:, None])]
    vis += [sel_vis.reshape(B, Hk, Cq, K * ch), full(torch.ones(Cq, ch, dtype=torch.bool, device=dev))]
    chunks, colvis = torch.cat(parts, dim=-1), torch.cat(vis, dim=-1)  # [B, Hk, Cq, m], [B, Hk, Cq, m * ch]
    m = chunks.shape[-1]
    n = m * ch
    Ck = k.shape[2] // ch
    rows = torch.arange(B * Hk, device=dev).view(B, Hk, 1, 1) * Ck + chunks  # rows of k.view(-1, ch * d)
    kf, vf = k.reshape(-1, ch * d), v.reshape(-1, ch * d)
    tril = (ar[None, :] <= ar[:, None]).repeat(G, 1)  # [G * ch, ch]: own chunk, causal
    # chunks whose visibility is the usual one (all slots filled, only the sink's tail hidden) share one
    # broadcast mask; the first chunks of a stream (empty slots) and head-dependent hidden columns get their own
    usual = torch.ones(n, dtype=torch.bool, device=dev)
    if s:
        usual[:ch] = ar < s
    clean = (colvis == usual).all(dim=3).all(dim=1).all(dim=0)  # [Cq]
    clean_mask = torch.cat([usual[None, : n - ch].expand(G * ch, n - ch), tril], dim=1)
    clean_bias = torch.where(clean_mask, 0.0, float("-inf")).to(q.dtype)[None, None]  # [1, 1, G * ch, n]
    qc = q.view(B, Hk, G, Cq, ch, d).permute(0, 3, 1, 2, 4, 5).reshape(B, Cq, Hk, G * ch, d)
    per = max(1, _BLOCK_BYTES // (Hk * n * (2 * d + G * ch) * q.element_size()))
    groups = [(ids, False) for ids in (~clean).nonzero().squeeze(-1).split(per) if ids.numel()]
    groups += [(ids, True) for ids in clean.nonzero().squeeze(-1).split(per) if ids.numel()]
    outs, order = [], []
    reuse = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    if reuse:
        most = max(B * (ids.numel() if isinstance(ids, torch.Tensor) else 0) * Hk * m for ids, _ in groups)
        kbuf, vbuf = kf.new_empty(most, ch * d), vf.new_empty(most, ch * d)
    for ids, is_clean in groups:
        nc = ids.numel()
        if int(ids[-1]) - int(ids[0]) + 1 == nc:  # a run of chunks (the usual case): views, not copies
            ids = slice(int(ids[0]), int(ids[0]) + nc)
        r = rows[:, :, ids].transpose(1, 2).reshape(-1)  # [B, nc, Hk, m] flattened
        if reuse:  # no autograd: gather into the same two buffers slab after slab (no fresh pages each time)
            kx = torch.index_select(kf, 0, r, out=kbuf[: r.numel()]).view(B * nc, Hk, n, d)
            vx = torch.index_select(vf, 0, r, out=vbuf[: r.numel()]).view(B * nc, Hk, n, d)
        else:
            kx, vx = kf.index_select(0, r).view(B * nc, Hk, n, d), vf.index_select(0, r).view(B * nc, Hk, n, d)
        if is_clean:
            bias = clean_bias
        else:
            cv = colvis[:, :, ids].transpose(1, 2)  # [B, nc, Hk, n]
            if bool((cv == cv[:, :, :1]).all()):  # no head-dependent hidden column: one mask for every head
                cv = cv[:, :, :1]
            seen = torch.cat([cv[..., None, : n - ch].expand(*cv.shape[:-1], G * ch, n - ch),
                              tril.expand(*cv.shape[:-1], G * ch, ch)], dim=-1)
            bias = torch.where(seen, 0.0, float("-inf")).to(q.dtype).reshape(B * nc, -1, G * ch, n)
        o = torch.nn.functional.scaled_dot_product_attention(qc[:, ids].reshape(-1, Hk, G * ch, d), kx, vx,
                                                             attn_mask=bias, scale=spec.scale(d))
        outs.append(o.view(B, nc, Hk, G, ch, d))
        order.append(torch.arange(Cq, device=dev)[ids])
    o = torch.cat(outs, dim=1)  # [B, Cq, Hk, G, ch, d] in the order of ``order``
    order = torch.cat(order)
    if not bool((order == torch.arange(Cq, device=dev)).all()):
        o = o[:, torch.argsort(order)]
    return o.permute(0, 2, 3, 1, 4, 5).reshape(B, H, Tqp, d)


def blocks_parallel(q, k, v, spec: BlockSpec, *, start: int = 0, summaries: torch.Tensor | None = None):
    """Block retrieval for queries at positions start .. start + Tq - 1 (``start`` a multiple of chunk) over keys at
    positions 0 .. start + Tq - 1.

    q [B, H, Tq, d]; k, v [B, Hk, start + Tq, d]; ``summaries`` [B, Hk, C0, S]: the summaries of the first C0
    complete chunks if already known (a stream's cache), computed here otherwise.  No [T, T] tensor is made.
    Returns (o [B, H, Tq, d], summaries of every complete chunk [B, Hk, (start + Tq) // chunk, S]).
    """
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
    Cc = L // ch
    C0 = 0 if summaries is None else summaries.shape[2]
    new = summarize(k[:, :, C0 * ch : Cc * ch].reshape(B, Hk, Cc - C0, ch, d), spec.summary)
    summ = new if summaries is None else torch.cat([summaries, new], dim=2)
    qchunk = (start + torch.arange(Tqp, device=q.device)) // ch
    allowed = candidates(qchunk, Cc, spec) & (torch.arange(Tqp, device=q.device) < Tq)[:, None]
    if spec.select == "chunk" and spec.grad != "grouped" and _chunkwise_available(q, k, spec, q, k, v):
        # the rows of a chunk share its selection: score the chunks' first rows only
        idx, ok, _ = select(scores(q[:, :, ::ch], summ, spec), allowed[::ch], spec)
        return _parallel_chunkwise(q, k, v, spec, idx, ok, start)[:, :, :Tq], summ
    sc = scores(_selection_queries(q, spec), summ, spec)  # [B, Hk, Tqp, Cc]
    idx, ok, bias = select(sc, allowed, spec)
    if spec.grad != "grouped" and fused_available(q, k, v):  # (the fused path takes no log-weights)
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
def blocks_step(q, keys, values, summaries, lengths, spec: BlockSpec, select_q: torch.Tensor | None = None):
    """One new token per row, its key and value already written at position ``lengths[b]`` of ``keys``/``values``.

    q [B, H, 1, d]; keys, values [B, Hk, N, d] (N > max(lengths); rows hold their tokens 0 .. lengths[b]);
    summaries [B, Hk, C, S] of each row's complete chunks (rows may have fewer than C; the rest are ignored);
    lengths [B] long: the position of the new token in each row; ``select_q`` [B, H, 1, d]: with
    ``select="chunk"``, the query at the first position of each row's chunk (kept by the caller).
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
        sc = scores(q if spec.select == "token" else select_q, summaries, spec)[:, :, 0]  # [B, Hk, C]
        idx, ok, bias = select(sc, allowed[:, None, :], spec)  # [B, Hk, K]
        K = idx.shape[-1]
        sel_pos = (idx[..., None] * ch + ar).reshape(B, Hk, K * ch)  # [B, Hk, K * ch]
        sel_seen = ok[..., None].expand(B, Hk, K, ch)
        if s:
            sel_seen = sel_seen & ~((idx == 0)[..., None] & (ar < s))
        sel_seen = sel_seen.reshape(B, Hk, K * ch)
    else:
        K = 0
    fixed_pos = torch.cat(cols, dim=1)  # [B, nf]
    fixed_seen = torch.cat(seen, dim=1)
    nf = fixed_pos.shape[1]
    pos = fixed_pos[:, None].expand(B, Hk, nf)
    vis = fixed_seen[:, None].expand(B, Hk, nf)
    if K:
        pos = torch.cat([pos, sel_pos], dim=2)
        vis = torch.cat([vis, sel_seen], dim=2)
    pos = pos.clamp(max=keys.shape[2] - 1)  # the own chunk's later slots may lie past the buffer (never seen)
    kx = keys.gather(2, pos[..., None].expand(*pos.shape, d))  # [B, Hk, n, d]
    vx = values.gather(2, pos[..., None].expand(*pos.shape, d))
    logits = (q.view(B, Hk, G, d) @ kx.transpose(-1, -2)) * spec.scale(d)  # [B, Hk, G, n]
    if bias is not None:
        b = torch.cat([logits.new_zeros(B, Hk, nf), bias.to(logits.dtype).repeat_interleave(ch, dim=-1)], dim=2)
        logits = logits + b[:, :, None]
    vis = vis[:, :, None]
    logits = logits.masked_fill(~vis, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return _attend(p, vx, vis).view(B, H, 1, d)
