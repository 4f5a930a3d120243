"""The forms of :class:`~bsbr.layers.bsbr.BSBRAttention` with ``retrieval="blocks"`` (or ``"none"``, local
attention only): the layer owns the projections, these functions call :mod:`bsbr.ops.bsbr_blocks` and keep the
streaming cache.

The cache keeps every key and value (any earlier chunk may be selected later) and one summary per complete chunk:
2 n d + C S numbers per head for n tokens, against the state readout's C (d^2 + d) and no old tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.bsbr_blocks import (
    BlockSpec,
    add_loss,
    blocks_dense,
    blocks_parallel,
    blocks_reference,
    blocks_step,
    selection_distill_loss,
    summarize,
)
from .cache import GrowableBuffer, LayerCache


@dataclass
class BlocksCache(LayerCache):
    """What block retrieval keeps while streaming, per row and key/value head.

    keys, values: GrowableBuffer [B, H, n, d]   every token's (rotated) key and value
    summaries:    GrowableBuffer [B, H, C, S]   one summary per complete chunk (S = d, 2d for "minmax",
                                                chunk * d for "tokens"; of the indexer's keys where the layer has
                                                one)
    index_keys:   GrowableBuffer [B, H, n, e]   the indexer's keys (layers with ``indexer_dim``)
    select_q:     [B, H, d]                     the query at the open chunk's first position (``select="chunk"``;
                                                the indexer's, [B, H, e], where the layer has one)
    """

    keys: GrowableBuffer = field(default_factory=lambda: GrowableBuffer(min_capacity=128))
    values: GrowableBuffer = field(default_factory=lambda: GrowableBuffer(min_capacity=128))
    summaries: GrowableBuffer = field(default_factory=GrowableBuffer)
    index_keys: GrowableBuffer = field(default_factory=lambda: GrowableBuffer(min_capacity=128))
    select_q: torch.Tensor | None = None


def spec(layer) -> BlockSpec:
    """The layer's settings as the op takes them (top_k = 0 for ``retrieval="none"``; ``train_top_k`` in training
    mode when set; ``selection_grad="distill"`` is the layer's loss, the op selects as with "none")."""
    top_k = 0
    if layer.retrieval == "blocks":
        top_k = layer.train_top_k if layer.training and layer.train_top_k is not None else layer.top_k
    return BlockSpec(chunk=layer.chunk_size, top_k=top_k, sink=layer.sink_tokens, prev_chunk=layer.prev_chunk,
                     summary=layer.block_summary, select=layer.block_select,
                     grad="none" if layer.selection_grad == "distill" else layer.selection_grad)


def index(layer, x: torch.Tensor):
    """The indexer's selection queries and keys, ([B, H, T, e], [B, H, T, e]), from x [B, T, D] with no gradient
    into x; (None, None) for a layer without one."""
    if layer.indexer is None:
        return None, None
    B, T, _ = x.shape
    # softplus: positive (so q . max is a bound, as for "minmax") and never exactly 0 (ReLU zeros tie every score)
    f = torch.nn.functional.softplus(layer.indexer(x.detach())).view(B, T, 2, layer.num_heads, layer.indexer_dim)
    f = f.permute(2, 0, 3, 1, 4)
    return f[0], f[1]


def _distill(layer, o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, s: BlockSpec, iq=None, ik=None):
    """o, carrying the selection's distillation loss in training mode with ``selection_grad="distill"``."""
    if not (layer.training and layer.selection_grad == "distill" and s.top_k and torch.is_grad_enabled()):
        return o
    return add_loss(o, selection_distill_loss(q, k, s, index_q=iq, index_k=ik,
                                              num_valid=getattr(layer, "_num_valid", None)))


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    q, k, v = layer.qkv(x, 0)
    iq, ik = index(layer, x)
    s = spec(layer)
    o = blocks_reference(q, k, v, s, index_q=iq, index_k=ik)
    return layer.out(_distill(layer, o, q, k, s, iq, ik))


def parallel(layer, x: torch.Tensor) -> torch.Tensor:
    q, k, v = layer.qkv(x, 0)
    iq, ik = index(layer, x)
    s = spec(layer)
    if s.top_k and s.top_k >= x.shape[1] // s.chunk and (layer.training or s.grad == "grouped"):
        # every earlier chunk selected (training as Landmark does): nothing to skip, so one causal SDPA call (with
        # the log-weights of selection_grad != "none" riding along), where the sparse path would gather every chunk.
        # In eval mode only where the grouped weights need it: there the sparse path is the one whose FLOPs
        # analytic_flops counts
        return layer.out(_distill(layer, blocks_dense(q, k, v, s, index_q=iq, index_k=ik), q, k, s, iq, ik))
    o = blocks_parallel(q, k, v, s, index_q=iq, index_k=ik)[0]
    return layer.out(_distill(layer, o, q, k, s, iq, ik))


def attention_weights(layer, x: torch.Tensor) -> dict:
    q, k, v = layer.qkv(x, 0)
    iq, ik = index(layer, x)
    _, p = blocks_reference(q, k, v, spec(layer), return_weights=True, index_q=iq, index_k=ik)
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    own = (pos[:, None] // layer.chunk_size == pos[None, :] // layer.chunk_size)
    return {"total": p, "local": p * own, "retrieval": p * ~own}


def extend(layer, x: torch.Tensor, cache: BlocksCache) -> torch.Tensor:
    """Continue every row (all equally long, L0 tokens) by the T tokens of x [B, T, D]."""
    s = spec(layer)
    ch = s.chunk
    L0 = int(cache.lengths[0])
    f = L0 % ch  # tokens of the open chunk seen already
    q, k, v = layer.qkv(x, L0)
    iq, ik = index(layer, x)
    B, H, T, d = q.shape
    cache.keys.append(k)
    cache.values.append(v)
    keys, values = cache.keys.view(), cache.values.view()
    index_keys = None
    if ik is not None:
        cache.index_keys.append(ik)
        index_keys = cache.index_keys.view()
    if f:  # dummy queries for the open chunk's earlier tokens (outputs dropped); the first selects for the chunk
        q = torch.cat([q.new_zeros(B, H, f, d), q], dim=2)
        if iq is not None:
            iq = torch.cat([iq.new_zeros(B, H, f, iq.shape[-1]), iq], dim=2)
    sq = q if iq is None else iq  # the queries that select
    if s.select == "chunk":
        if f:
            sq[:, :, 0] = cache.select_q
        else:
            cache.select_q = sq[:, :, 0]
    if s.select == "chunk" and T + f > ch:  # the stream's open chunk after x: its first query
        last_start = (L0 + T - 1) // ch * ch - (L0 - f)
        cache.select_q = sq[:, :, last_start]
    out, summ = blocks_parallel(q, keys, values, s, start=L0 - f, summaries=cache.summaries.view(),
                                index_q=iq, index_k=index_keys)
    C0 = 0 if cache.summaries.filled is None else int(cache.summaries.filled[0])
    if summ.shape[2] > C0:
        cache.summaries.append(summ[:, :, C0:])
    return layer.out(out[:, :, f:])


def step(layer, x: torch.Tensor, valid: torch.Tensor, cache: BlocksCache) -> torch.Tensor:
    """One token per row (x [B, D]); rows where ``valid`` is False keep their cache."""
    s = spec(layer)
    ch = s.chunk
    lengths = cache.lengths
    q, k, v = layer.qkv(x[:, None], lengths[:, None])  # [B, H, 1, d]
    iq, ik = index(layer, x[:, None])  # [B, H, 1, e] or None
    cache.keys.append_rows(k[:, :, 0], valid)
    cache.values.append_rows(v[:, :, 0], valid)
    if ik is not None:
        cache.index_keys.append_rows(ik[:, :, 0], valid)
    sq = q if iq is None else iq
    if s.select == "chunk":
        opening = (valid & (lengths % ch == 0))[:, None, None]
        cache.select_q = sq[:, :, 0] if cache.select_q is None else torch.where(opening, sq[:, :, 0],
                                                                                   cache.select_q)
    o = blocks_step(q, cache.keys.data, cache.values.data, cache.summaries.view(), lengths, s,
                    select_q=None if cache.select_q is None else cache.select_q[:, :, None], index_q=iq)
    closing = valid & (lengths % ch == ch - 1)
    if bool(closing.any()):  # summarise the chunk each closing row has just completed
        pos = (lengths // ch * ch)[:, None] + torch.arange(ch, device=x.device)  # [B, ch]
        sel_keys = cache.keys.data if ik is None else cache.index_keys.data
        B, H, _, e = sel_keys.shape
        idx = pos.clamp(max=sel_keys.shape[2] - 1)[:, None, :, None].expand(B, H, ch, e)
        chunk_keys = sel_keys.gather(2, idx)  # [B, H, ch, e]
        cache.summaries.append_rows(summarize(chunk_keys[:, :, None], s.summary)[:, :, 0], closing)
    return layer.out(o)[:, 0]
