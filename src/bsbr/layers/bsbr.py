"""BSBRAttention: the layer that owns BSBR's weights and its streaming cache, and picks the reference, parallel or
recurrent form of the op (:mod:`bsbr.ops.bsbr`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _checks
from ..ops.bsbr import STATE_NORMS, BSBRPast, bsbr_parallel, bsbr_reference, bsbr_step
from ..ops.bsbr_blocks import GRADS, SELECTIONS, SUMMARIES
from . import bsbr_blocks
from .block import Block
from .cache import GrowableBuffer, LayerCache, write_slot
from .qkv import QKVAttention, split_heads

META_QUERIES = ("first", "prev_last")
RETRIEVALS = ("states", "blocks", "none")
LAYER_GRADS = (*GRADS, "distill")  # "distill": the layer's own (a training loss), the op sees "none"


@dataclass
class BSBRCache(LayerCache):
    """What BSBR keeps while streaming, per row and head.

    states:    GrowableBuffer [B, H, C, m]  each completed chunk's K^T V (raw sum; m = d*d, or d*d/f compressed)
    meta_keys: GrowableBuffer [B, H, C, d]  meta key of each completed chunk
    buf_k, buf_v: [B, H, chunk, d]           keys and values of the open (incomplete) chunk
    retrieved: [B, H, d, d]                  raw mixture S of the open chunk (fixed once the chunk opens)
    open_query: [B, H, d]                    meta query of the open chunk (``prev_last``: of the next one)
    dropped: int                             oldest chunks evicted from states / meta_keys (retrieval window)

    Size: C*(m + d) + 2*chunk*d + d*d + d numbers per head, against 2*n*d for a KV cache.  With a retrieval
    window W, chunks no row can retrieve again are evicted, so C stays at most 2W + 1: the cache is bounded.
    """

    states: GrowableBuffer = field(default_factory=GrowableBuffer)
    meta_keys: GrowableBuffer = field(default_factory=GrowableBuffer)
    buf_k: torch.Tensor | None = None
    buf_v: torch.Tensor | None = None
    retrieved: torch.Tensor | None = None
    open_query: torch.Tensor | None = None
    dropped: int = 0

    def _allocate(self, B: int, H: int, chunk: int, d: int, like: torch.Tensor) -> None:
        if self.buf_k is None:
            self.buf_k = like.new_zeros(B, H, chunk, d)
            self.buf_v = like.new_zeros(B, H, chunk, d)
            self.retrieved = like.new_zeros(B, H, d, d)
            self.open_query = like.new_zeros(B, H, d)


class BSBRAttention(QKVAttention):
    """Block Sparse attention with Block Retrieval.

    Args:
        hidden_dim: model width D; num_heads: H (head dim d = D / H).
        chunk_size: tokens per chunk (B in the paper).  Softmax attention runs inside chunks; between chunks
            each chunk retrieves a softmax mixture of earlier chunks' K^T V states.
        dropout: dropout on the attention output (training only).
        compression_factor: store each state in d*d/f numbers through a learned map P (and restore with P');
            f must divide d*d.  None stores full d x d states.
        state_norm: "mean" (default) divides each chunk's K^T V by the chunk size so the retrieved term is on
            the scale of the local one; "none" keeps the raw sum of the original formula.
        meta_query: where the chunk's meta query r_i comes from: "first" (default) the chunk's first token,
            the latest position every token of the chunk may see; "prev_last" the previous chunk's last token.
        retrieval_window: chunk i retrieves from the W = retrieval_window most recent completed chunks only
            (i - W .. i - 1).  None (default, the paper's definition) retrieves from all earlier chunks, and the
            streaming cache grows by one state per chunk; with a window it is bounded (older states are evicted).
        retrieval: what a chunk takes from earlier chunks.  "states" (default): the state readout above.
            "blocks": block retrieval of tokens — each query scores the earlier chunks' summaries, selects the
            ``top_k`` best and attends with one exact softmax to their tokens, its own chunk (causal) and the
            chunks always in view (:mod:`bsbr.ops.bsbr_blocks`); the cache keeps every key and value.  "none":
            local attention only (plus the chunks always in view).
        top_k, sink_tokens, prev_chunk, block_summary, block_select, selection_grad: block retrieval's settings
            (``retrieval="blocks"``; sink_tokens and prev_chunk also for "none"): chunks selected per query; the
            stream's first ``sink_tokens`` (<= chunk_size) always in view; the previous chunk always in view;
            the chunk summary scored ("mean" key, "minmax" bound, "max" per channel, or "tokens": no summary, the
            log-sum-exp of the chunk's token scores, a [T, T] product); one selection per "token" or per "chunk"
            (by the chunk's first query); how the scores learn ("none": only through q and k, as in MoBA;
            "straight_through": Landmark's grouped-softmax gradient, zero in value; "grouped": Landmark's grouped
            softmax itself, each selected chunk's tokens weighted by the chunk's selection probability; "distill":
            in training mode a loss, added through the layer's output, that pulls the scores over every earlier
            chunk towards where causal softmax attention puts its weight (as DeepSeek's sparse attention trains
            its indexer), outputs as "none"; :func:`bsbr.ops.bsbr_blocks.selection_distill_loss`).
            docs/bsbr.md has the numbers that chose the defaults.
        train_top_k: chunks selected per query in training mode (None: ``top_k``).  A number at least the
            chunks of the training length selects every earlier chunk while training, as Landmark Attention
            trains: with ``selection_grad="grouped"`` every chunk's score then gets a gradient.
        indexer_dim: e > 0 gives block retrieval an indexer of its own, as DeepSeek's sparse attention has: per
            head, softplus(W x) split into an e-dimensional selection query and key, from the layer's input with no
            gradient back into it; chunks are then scored by the indexer's query against a summary of its keys
            (``block_summary="max"`` suits its positive features; "tokens" scores every key of it), and it learns from
            ``selection_grad="distill"`` alone (required).  None (default): q and k select.  Extra weights:
            ``indexer`` (D x 2 H e).
        rope, rope_base, bias: see :class:`~bsbr.layers.qkv.QKVAttention`.

    Shapes: hidden_states [B, T, D] -> [B, T, D].  Extra weights beyond standard attention: ``meta_q_proj``
    (W_r) and ``meta_k_proj`` (W_h), each D x D, and with compression ``compress`` (m x d*d) and
    ``restore`` (d*d x m), shared by the heads.
    """

    segmented_prefill = True

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, dropout: float = 0.1,
                 compression_factor: int | None = None, *, state_norm: str = "mean", meta_query: str = "first",
                 retrieval_window: int | None = None, retrieval: str = "states", top_k: int = 4,
                 sink_tokens: int = 0, prev_chunk: bool = False, block_summary: str = "mean",
                 block_select: str = "token", selection_grad: str = "none", train_top_k: int | None = None,
                 indexer_dim: int | None = None, rope: bool = True, rope_base: float = 10000.0, bias: bool = False):
        super().__init__(hidden_dim, num_heads, dropout, bias=bias, rope=rope, rope_base=rope_base)
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size)
        self.retrieval = _checks.one_of("retrieval", retrieval, RETRIEVALS)
        self.top_k = _checks.positive_int("top_k", top_k)
        self.sink_tokens = _checks.non_negative_int("sink_tokens", sink_tokens)
        if self.sink_tokens > self.chunk_size:
            raise ValueError(f"sink_tokens must be at most chunk_size={chunk_size}, got {sink_tokens}")
        if not isinstance(prev_chunk, bool):
            raise TypeError(f"prev_chunk must be a bool, got {prev_chunk!r}")
        self.prev_chunk = prev_chunk
        self.block_summary = _checks.one_of("block_summary", block_summary, SUMMARIES)
        self.block_select = _checks.one_of("block_select", block_select, SELECTIONS)
        self.selection_grad = _checks.one_of("selection_grad", selection_grad, LAYER_GRADS)
        self.train_top_k = None if train_top_k is None else _checks.positive_int("train_top_k", train_top_k)
        self.indexer_dim = None if indexer_dim is None else _checks.positive_int("indexer_dim", indexer_dim)
        self.indexer = None
        if self.indexer_dim is not None:
            if self.retrieval != "blocks" or self.selection_grad != "distill":
                raise ValueError(f"indexer_dim={indexer_dim} needs retrieval='blocks' (what it selects for) and "
                                 f"selection_grad='distill' (how it learns), got retrieval={retrieval!r}, "
                                 f"selection_grad={selection_grad!r}")
            self.indexer = nn.Linear(hidden_dim, 2 * num_heads * self.indexer_dim, bias=False)
        if self.retrieval != "states":
            given = {"compression_factor": (compression_factor, None), "retrieval_window": (retrieval_window, None),
                     "state_norm": (state_norm, "mean"), "meta_query": (meta_query, "first")}
            for name, (value, default) in given.items():
                if value != default:
                    raise ValueError(f"{name}={value!r} belongs to the state readout; retrieval={retrieval!r} "
                                     f"takes {name}={default!r}")
            self.segmented_prefill = False  # the cache holds every key, as a KV cache does
        elif (sink_tokens, prev_chunk, train_top_k) != (0, False, None):
            raise ValueError(f"sink_tokens, prev_chunk and train_top_k belong to retrieval='blocks' or 'none', got "
                             f"sink_tokens={sink_tokens}, prev_chunk={prev_chunk}, train_top_k={train_top_k} with "
                             f"retrieval='states'")
        self.state_norm = _checks.one_of("state_norm", state_norm, STATE_NORMS)
        self.meta_query = _checks.one_of("meta_query", meta_query, META_QUERIES)
        self.retrieval_window = (None if retrieval_window is None
                                 else _checks.positive_int("retrieval_window", retrieval_window))
        d = self.head_dim
        if self.retrieval != "states":  # no meta projections or states: selection scores the chunks' own keys
            self.compression_factor = None
            self.compress = self.restore = None
            self.state_size = 0
            return
        self.meta_q_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)  # W_r: meta queries
        self.meta_k_proj = nn.Linear(hidden_dim, hidden_dim, bias=bias)  # W_h: meta keys
        self.compression_factor = compression_factor
        if compression_factor is not None:
            f = _checks.positive_int("compression_factor", compression_factor)
            if (d * d) % f:
                raise ValueError(
                    f"compression_factor must divide head_dim*head_dim={d * d}, got {compression_factor}"
                )
            m = d * d // f
            self.compress = nn.Linear(d * d, m, bias=False)  # P
            self.restore = nn.Linear(m, d * d, bias=False)  # P'
            self.state_size = m
        else:
            self.compress = self.restore = None
            self.state_size = d * d

    # ----------------------------------------------------------------------------------- helpers
    def _maps(self):
        if self.compress is None:
            return None, None
        return self.compress.weight, self.restore.weight

    def _meta(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n, D] -> [B, H, n, d]."""
        return split_heads(proj(x), self.num_heads)

    def _chunk_meta(self, x: torch.Tensor, first: int, open_query: torch.Tensor | None):
        """Meta queries and keys of the chunks of a segment of new tokens x [B, T, D].

        ``first`` = number of the open chunk's tokens already seen (0 if the segment starts a chunk).
        Returns r, h: [B, H, C, d] for the C chunks the segment touches.
        """
        T = x.shape[1]
        ch = self.chunk_size
        C = -(-(first + T) // ch)
        starts = torch.arange(C, device=x.device) * ch - first  # segment chunk starts, in x's indices
        ends = (starts + ch - 1).clamp(max=T - 1)
        h = self._meta(self.meta_k_proj, x[:, ends])
        if self.meta_query == "first":
            r = self._meta(self.meta_q_proj, x[:, starts.clamp(min=0)])
            if first:
                r[:, :, 0] = open_query
        else:  # the previous chunk's last token; for chunk 0 it was seen earlier (or there is none)
            prev = (starts - 1).clamp(min=0)
            r = self._meta(self.meta_q_proj, x[:, prev])
            r[:, :, 0] = open_query if open_query is not None else 0.0
        return r, h

    def _op_options(self) -> dict:
        compress, restore = self._maps()
        return {"state_norm": self.state_norm, "window": self.retrieval_window, "compress": compress,
                "restore": restore}

    def _definition_meta(self, x: torch.Tensor):
        """Meta queries and keys [B, H, C, d] of every chunk of x [B, T, D], as docs/bsbr.md ("Definition") defines
        them: r_i at the chunk's first token (or the previous chunk's last; chunk 0 retrieves nothing), h_j at its last
        token."""
        T, ch = x.shape[1], self.chunk_size
        starts = list(range(0, T, ch))
        h = self._meta(self.meta_k_proj, x[:, [min(s + ch, T) - 1 for s in starts]])
        at = starts if self.meta_query == "first" else [max(s - 1, 0) for s in starts]
        return self._meta(self.meta_q_proj, x[:, at]), h

    # ------------------------------------------------------------------------------------ forms
    def _reference(self, x):
        if self.retrieval != "states":
            return bsbr_blocks.reference(self, x)
        q, k, v = self.qkv(x, 0)
        r, h = self._definition_meta(x)
        return self.out(bsbr_reference(q, k, v, r, h, self.chunk_size, **self._op_options()))

    def _parallel(self, x):
        if self.retrieval != "states":
            return bsbr_blocks.parallel(self, x)
        return self.out(self._segment(x, None).out)

    def _segment(self, x, cache: BSBRCache | None, first: int = 0):
        """The chunked op over the new tokens x [B, T, D]; with a cache, they continue it (all rows at one position,
        ``first`` tokens into the open chunk) and the cache absorbs them."""
        offset = 0 if cache is None else int(cache.lengths[0])
        q, k, v = self.qkv(x, offset)
        r, h = self._chunk_meta(x, first, None if cache is None else cache.open_query)
        past = None
        if cache is not None:
            past = BSBRPast(states=cache.states.view(), keys=cache.meta_keys.view(), done=offset // self.chunk_size)
            if first:
                past.open_k, past.open_v = cache.buf_k[:, :, :first], cache.buf_v[:, :, :first]
        seg = bsbr_parallel(q, k, v, r, h, self.chunk_size, past=past, need_states=cache is not None,
                            **self._op_options())
        if cache is not None:
            self._absorb(cache, seg, r, x)
        return seg

    def _absorb(self, cache: BSBRCache, seg, r, x) -> None:
        """Move a processed segment into the cache: the states and meta keys of the chunks it completed, and the
        open chunk it leaves (keys and values padded to a chunk, meta query, mixture)."""
        ch, d = self.chunk_size, self.head_dim
        B, H = x.shape[0], self.num_heads
        cache._allocate(B, H, ch, d, seg.out)
        if seg.states.shape[2]:
            cache.states.append(seg.states)
            cache.meta_keys.append(seg.keys)
            self._evict(cache)
        tail = seg.open_k.shape[2]
        if tail:
            rest = seg.open_k.new_zeros(B, H, ch - tail, d)
            cache.buf_k = torch.cat([seg.open_k, rest], dim=2)
            cache.buf_v = torch.cat([seg.open_v, rest], dim=2)
            cache.retrieved = seg.mixture
            cache.open_query = r[:, :, -1]
        elif self.meta_query == "prev_last":
            # the next chunk's meta query is the last token of the chunk that just completed
            cache.open_query = self._meta(self.meta_q_proj, x[:, -1:])[:, :, 0]

    def _extend(self, x, cache: BSBRCache):
        if self.retrieval != "states":
            return bsbr_blocks.extend(self, x, cache)
        first = int(cache.lengths[0]) % self.chunk_size
        return self.out(self._segment(x, cache, first).out)

    def _step(self, x, valid, cache: BSBRCache):
        if self.retrieval != "states":
            return bsbr_blocks.step(self, x, valid, cache)
        ch, d = self.chunk_size, self.head_dim
        lengths = cache.lengths
        phase = lengths % ch  # [B] position of the new token inside its chunk
        q, k, v = self.qkv(x[:, None], lengths[:, None])  # [B, H, 1, d]
        cache._allocate(q.shape[0], q.shape[1], ch, d, q)
        opening = valid & (phase == 0)
        if self.meta_query == "first" and bool(opening.any()):
            r = self._meta(self.meta_q_proj, x[:, None])[:, :, 0]
            cache.open_query = torch.where(opening[:, None, None], r, cache.open_query)
        cache.buf_k = write_slot(cache.buf_k, phase, valid, k[:, :, 0])
        cache.buf_v = write_slot(cache.buf_v, phase, valid, v[:, :, 0])
        step = bsbr_step(q, cache.buf_k, cache.buf_v, phase, ch, r=cache.open_query, mixture=cache.retrieved,
                         states=cache.states.view(), keys=cache.meta_keys.view(), kept=lengths // ch - cache.dropped,
                         valid=valid, **self._op_options())
        cache.retrieved = step.mixture
        closing = valid & (phase == ch - 1)
        if bool(closing.any()):
            cache.states.append_rows(step.state, closing)
            cache.meta_keys.append_rows(self._meta(self.meta_k_proj, x[:, None])[:, :, 0], closing)
            self._evict(cache)
            if self.meta_query == "prev_last":
                r = self._meta(self.meta_q_proj, x[:, None])[:, :, 0]
                cache.open_query = torch.where(closing[:, None, None], r, cache.open_query)
        return self.out(step.out)[:, 0]

    def _evict(self, cache: BSBRCache) -> None:
        """With a retrieval window W, drop the chunk states and meta keys that no row can retrieve again (all
        but the W latest of the row with the fewest chunks), once there are W of them: the copy is amortised
        and at most 2W + 1 chunks are kept."""
        W = self.retrieval_window
        if W is None or cache.states.filled is None:
            return
        dead = int(cache.states.filled.min()) - W
        if dead >= W:
            cache.states.drop_front(dead)
            cache.meta_keys.drop_front(dead)
            cache.dropped += dead

    def _new_cache(self, lengths):
        return BSBRCache(lengths) if self.retrieval == "states" else bsbr_blocks.BlocksCache(lengths)

    # ----------------------------------------------------------------------------- attention maps
    def _attention_weights(self, x):
        if self.retrieval != "states":
            return bsbr_blocks.attention_weights(self, x)
        if self.compress is not None:
            raise NotImplementedError(
                "with compression the retrieved term mixes value dimensions through P'P, so it is not a "
                "token-to-token weighting; get_attention_weights needs compression_factor=None"
            )
        q, k, v = self.qkv(x, 0)
        r, h = self._definition_meta(x)
        _, local, retrieval = bsbr_reference(q, k, v, r, h, self.chunk_size, state_norm=self.state_norm,
                                             window=self.retrieval_window, return_weights=True)
        return {"total": local + retrieval, "local": local, "retrieval": retrieval}

    def extra_repr(self) -> str:
        if self.retrieval != "states":
            return (super().extra_repr() + f", chunk_size={self.chunk_size}, retrieval={self.retrieval!r}, "
                    f"top_k={self.top_k}, sink_tokens={self.sink_tokens}, prev_chunk={self.prev_chunk}, "
                    f"block_summary={self.block_summary!r}, block_select={self.block_select!r}, "
                    f"selection_grad={self.selection_grad!r}"
                    + (f", train_top_k={self.train_top_k}" if self.train_top_k is not None else "")
                    + (f", indexer_dim={self.indexer_dim}" if self.indexer_dim is not None else ""))
        return (super().extra_repr() + f", chunk_size={self.chunk_size}, compression_factor={self.compression_factor}"
                f", state_norm={self.state_norm!r}, meta_query={self.meta_query!r}"
                + (f", retrieval_window={self.retrieval_window}" if self.retrieval_window is not None else ""))


class BSBRLayer(Block):
    """A transformer block with BSBR attention: x + BSBR(norm(x)), then x + FF(norm(x)).

    hidden_states [B, T, hidden_dim] -> [B, T, hidden_dim]; ``forward(x, attention_mask=None, cache=None)``.
    Extra keyword arguments go to :class:`BSBRAttention` (state_norm, meta_query, rope, ...).
    """

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, ff_dim: int, dropout: float = 0.1,
                 compression_factor: int | None = None, *, norm: str = "layernorm", **attention_options):
        attention = BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor, **attention_options)
        super().__init__(attention, ff_dim, dropout, norm)


class BSBRBlocksAttention(BSBRAttention):
    """:class:`BSBRAttention` with ``retrieval="blocks"`` by default: the registry's "BSBRBlocks" row."""

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, dropout: float = 0.1, *, top_k: int = 4,
                 sink_tokens: int = 0, prev_chunk: bool = False, block_summary: str = "mean",
                 block_select: str = "token", selection_grad: str = "none", train_top_k: int | None = None,
                 indexer_dim: int | None = None, retrieval: str = "blocks", rope: bool = True,
                 rope_base: float = 10000.0, bias: bool = False):
        super().__init__(hidden_dim, num_heads, chunk_size, dropout, retrieval=retrieval, top_k=top_k,
                         sink_tokens=sink_tokens, prev_chunk=prev_chunk, block_summary=block_summary,
                         block_select=block_select, selection_grad=selection_grad, train_top_k=train_top_k,
                         indexer_dim=indexer_dim, rope=rope, rope_base=rope_base, bias=bias)
