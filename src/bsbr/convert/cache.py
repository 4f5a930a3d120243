"""The streaming cache of a converted model: :class:`BSBRHFCache`, a transformers ``Cache``.

(Not the native layers' :class:`bsbr.layers.BSBRCache`, which streams a :class:`~bsbr.layers.BSBRAttention`.)
It holds, per layer (:class:`BSBRCacheLayer`) and row, for ``"states"`` one state per completed chunk (per
key/value head), the meta keys, and the keys and values of the open chunk (:class:`StreamRow`); for ``"blocks"``
every key and value and one summary per complete chunk (:class:`BlocksRow`).  Its ``update`` returns only the new
tokens' keys and values and hands the attention function (:func:`bsbr.convert.backends.bsbr_attention_forward`) its
layer through the ``kwargs`` dict that the attention modules pass to both ``cache.update`` and the attention
function, under :data:`_CACHE_KEY`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..ops.bsbr import BSBRPast, bsbr_step
from ..ops.bsbr_blocks import blocks_parallel, blocks_step, summarize, summary_width
from .meta import BSBRMeta

_CACHE_KEY = "bsbr_cache_layer"


@dataclass
class StreamRow(BSBRPast):
    """One row's stream in a converted model's cache: what the op continues (:class:`~bsbr.ops.bsbr.BSBRPast`) and
    the open chunk's meta query [1, H, d] (a segment recomputes the open chunk's mixture from it) and retrieved
    mixture [1, H, d, d] (a decode step reuses it)."""

    open_query: torch.Tensor | None = None
    open_mixture: torch.Tensor | None = None


@dataclass
class BlocksRow:
    """One row's stream under block retrieval: every key and value so far ([1, Hk, capacity, d], the first
    ``length`` filled; capacity doubles), one summary per complete chunk [1, Hk, C, S], and with
    ``block_select="chunk"`` the open chunk's first query [1, H, d]."""

    keys: torch.Tensor
    values: torch.Tensor
    summaries: torch.Tensor
    length: int = 0
    select_q: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes of the live contents (keys and values of ``length`` tokens, summaries, the chunk's query)."""
        kv = 2 * self.keys[:, :, : self.length].numel() * self.keys.element_size()
        rest = [t for t in (self.summaries, self.select_q) if t is not None]
        return kv + sum(t.numel() * t.element_size() for t in rest)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write n new keys and values [1, Hk, n, d] after the row's tokens."""
        end = self.length + k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or self.keys.requires_grad):  # keep autograd's history
            self.keys = torch.cat([self.keys[:, :, : self.length], k], dim=2)
            self.values = torch.cat([self.values[:, :, : self.length], v], dim=2)
        else:
            if end > self.keys.shape[2]:
                cap = max(end, 2 * self.keys.shape[2], 64)
                grow = (lambda t: torch.cat([t[:, :, : self.length], t.new_empty(*t.shape[:2], cap - self.length,
                                                                                   t.shape[3])], dim=2))
                self.keys, self.values = grow(self.keys), grow(self.values)
            self.keys[:, :, self.length : end] = k
            self.values[:, :, self.length : end] = v
        self.length = end


class BSBRCacheLayer(CacheLayerMixin):
    """One layer's BSBR stream state, per batch row (rows may stand at different positions after left padding).

    Per row (:class:`StreamRow`): states [1, Hk, C, m] (raw sums K_j^T V_j of the kept chunks), meta keys
    [1, Hk, C, d], the open chunk's keys and values [1, Hk, f, d] (f < chunk), its meta query [1, H, d] and retrieved
    mixture [1, H, d, d], the sink tokens.  With a retrieval window W only the W latest states are kept, so the
    layer's size is bounded.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.rows: list[StreamRow | None] = []
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.rows = [None] * key_states.shape[0]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        channel = kwargs.get("kwargs")
        if channel is None:
            raise ValueError("BSBRHFCache.update needs the attention module's kwargs (transformers >= 5 passes them)")
        channel[_CACHE_KEY] = self
        self.seen += key_states.shape[2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.seen  # the mask covers the new tokens only

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.rows = [None] * len(self.rows)
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.rows = [self.rows[int(i)] for i in beam_idx]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BSBRHFCache cannot be cropped: chunk states cannot give back single tokens")

    def nbytes(self) -> int:
        """Bytes held by the layer's tensors (states, meta keys, open chunk, meta query, mixture, sinks; under
        block retrieval the live keys, values and summaries)."""
        total = 0
        for row in self.rows:
            if isinstance(row, BlocksRow):
                total += row.nbytes()
            elif row is not None:
                total += sum(t.numel() * t.element_size() for t in vars(row).values() if isinstance(t, torch.Tensor))
        return total

    def process(self, meta: BSBRMeta, q, k, v, valid, scaling: float) -> torch.Tensor:
        """BSBR outputs [B, H, T, d] of the new tokens, continuing each row's stream; the padding positions of a
        row (``valid`` False) are skipped and give zeros.  One new token is a decode step; more are a segment."""
        out = q.new_zeros(q.shape)
        for b in range(q.shape[0]):
            idx = slice(None) if valid is None else valid[b].nonzero().squeeze(-1)
            qb, kb, vb = q[b : b + 1, :, idx], k[b : b + 1, :, idx], v[b : b + 1, :, idx]
            n = qb.shape[2]
            if n == 0:
                continue
            past = self.rows[b]
            if meta.uses_blocks:
                out[b : b + 1, :, idx] = self._blocks(meta, qb, kb, vb, b, scaling)
                continue
            if past is not None and n == 1:
                o = self._step(meta, qb, kb, vb, past, scaling)
            else:
                seg = meta.segment(qb, kb, vb, scaling, past=past, need_states=True)
                o = seg.out
                tail = seg.open_k.shape[2]
                open_query = None
                if tail and meta.retrieval:  # the open chunk began in this segment, or is the past's
                    start = n - tail
                    open_query = past.open_query if start < 0 else meta.meta_query(qb[:, :, start : start + 1])[:, :, 0]
                row = StreamRow(**vars(seg.past(past)), open_query=open_query, open_mixture=seg.mixture)
                self.rows[b] = self._evict(meta, row)
            out[b : b + 1, :, idx] = o
        return out

    def _step(self, meta: BSBRMeta, q, k, v, row: StreamRow, scaling: float) -> torch.Tensor:
        """One new token q [1, H, 1, d], k, v [1, Hk, 1, d] of a row through the op's decode step."""
        f = row.open_len
        keys, values = torch.cat([row.open_k, k], dim=2), torch.cat([row.open_v, v], dim=2)
        if f == 0 and meta.retrieval:  # a chunk opens: its meta query
            row.open_query = meta.meta_query(q)[:, :, 0]
        options = meta.op_options(q.dtype)
        del options["sink"]  # the step is given the sink tokens themselves, once chunk 0 is complete
        sinks = (row.sink_k, row.sink_v) if row.done >= 1 else (None, None)
        step = bsbr_step(q, keys, values, torch.full((1,), f, device=q.device), meta.chunk_size, r=row.open_query,
                         mixture=row.open_mixture, states=row.states, keys=row.keys, scaling=scaling,
                         sink_k=sinks[0], sink_v=sinks[1], **options)
        row.open_k, row.open_v, row.open_mixture = keys, values, step.mixture
        if keys.shape[2] == meta.chunk_size:  # the chunk is complete: store its state and meta key
            if meta.sink_tokens and row.done == 0:
                row.sink_k, row.sink_v = keys[:, :, : meta.sink_tokens], values[:, :, : meta.sink_tokens]
            row.done += 1
            if meta.retrieval:
                row.states = torch.cat([row.states, step.state[:, :, None]], dim=2)
                row.keys = torch.cat([row.keys, meta.meta_key(keys[:, :, None])], dim=2)
            row.open_k, row.open_v = keys[:, :, :0], values[:, :, :0]
            row.open_query = row.open_mixture = None
            self._evict(meta, row)
        return step.out

    def _blocks(self, meta: BSBRMeta, q, k, v, b: int, scaling: float) -> torch.Tensor:
        """Block retrieval for row b's n new tokens q [1, H, n, d], k, v [1, Hk, n, d], continuing its stream: one
        token is the op's decode step (:func:`blocks_step`), more go through :func:`blocks_parallel` from the
        start of the open chunk (the open chunk's earlier queries are zero-filled rows whose outputs are dropped)."""
        spec = meta.block_spec(scaling)
        k, v = meta.block_kv(k, v, q.shape[1])
        ch, n = spec.chunk, q.shape[2]
        row = self.rows[b]
        if row is None:
            S = summary_width(spec.summary, k.shape[3], spec.chunk)
            row = self.rows[b] = BlocksRow(k[:, :, :0], v[:, :, :0], k.new_zeros(1, k.shape[1], 0, S))
        L0 = row.length
        f = L0 % ch  # tokens of the open chunk seen already
        row.append(k, v)
        keys, values = row.keys[:, :, : row.length], row.values[:, :, : row.length]
        chunk_q = spec.select == "chunk"
        if n == 1 and L0:
            if chunk_q and f == 0:
                row.select_q = q[:, :, 0]
            sq = row.select_q[:, :, None] if chunk_q else None
            out = blocks_step(q, keys, values, row.summaries, torch.tensor([L0], device=q.device), spec, select_q=sq)
            if f == ch - 1:  # the step completed a chunk: its summary
                new = summarize(keys[:, :, L0 + 1 - ch : L0 + 1][:, :, None], spec.summary)
                row.summaries = torch.cat([row.summaries, new.to(row.summaries.dtype)], dim=2)
            return out
        qs = q
        if f:  # zero rows for the open chunk's earlier tokens; with per-chunk selection the first is its query
            head = q.new_zeros(1, q.shape[1], f, q.shape[3])
            if chunk_q:
                head[:, :, 0] = row.select_q
            qs = torch.cat([head, q], dim=2)
        elif chunk_q:
            row.select_q = q[:, :, 0]
        if chunk_q and (L0 + n) % ch and (L0 + n - 1) // ch > L0 // ch:  # a new open chunk began in this piece
            row.select_q = qs[:, :, (L0 + n - 1) // ch * ch - (L0 - f)]
        out, summ = blocks_parallel(qs, keys, values, spec, start=L0 - f, summaries=row.summaries)
        row.summaries = summ
        return out[:, :, f:]

    @staticmethod
    def _evict(meta: BSBRMeta, row: StreamRow) -> StreamRow:
        W = meta.retrieval_window
        if W is not None and row.states is not None and row.states.shape[2] > W:  # no later chunk can retrieve these
            row.states = row.states[:, :, -W:].clone()
            row.keys = row.keys[:, :, -W:].clone()
        return row


class BSBRHFCache(Cache):
    """The streaming cache of a converted model: pass it as ``cache=`` (``past_key_values=``) or let ``generate()``
    make one (converted models do by default).  ``nbytes()`` is what it holds, for comparison with a KV cache.
    Formerly ``bsbr.convert.BSBRCache`` (that name still imports, with a DeprecationWarning)."""

    def __init__(self, *args, **kwargs):
        super().__init__(layer_class_to_replicate=BSBRCacheLayer)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
