"""The inference paths of block retrieval without an autograd graph (:func:`bsbr.ops.bsbr_blocks.blocks_parallel`
picks them): per-token selection through the CPU flash kernel's log-sum-exp (:func:`_parallel_fused`), and per-chunk
selection as one gathered key block per query chunk through ``scaled_dot_product_attention``
(:func:`_parallel_chunkwise`, differentiable too).  Both run on finite inputs only: a fused kernel multiplies masked
probabilities by every value, so a NaN at a hidden position would leak.
"""

from __future__ import annotations

import torch

from .bsbr_blocks_select import BlockSpec, _expand
from .bsbr_blocks_tiles import _slabs, _tiles


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
