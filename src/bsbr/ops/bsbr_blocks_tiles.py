"""The explicit, differentiable parallel path of block retrieval (:func:`bsbr.ops.bsbr_blocks.blocks_parallel`):
the fixed part (sink, previous and own chunk) per query chunk, and the (query, selected chunk) pairs laid out in
fixed-shape tiles of queries that read one chunk, each returned as (max logit, sum of exp, unnormalised output) for
a log-sum-exp merge.  The fused inference path (:mod:`bsbr.ops.bsbr_blocks_fast`) reuses the tile layout.
"""

from __future__ import annotations

import torch

from .bsbr_blocks_select import BlockSpec, _attend


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
