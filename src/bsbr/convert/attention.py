"""BSBR as a Hugging Face attention backend: the attention function, its mask function and its streaming cache.

A converted model keeps its own classes, weights and code path; only ``config._attn_implementation`` changes.
The model's attention module computes q, k, v (rotated, for RoPE models) as always and hands them to
:func:`bsbr_attention_forward`, registered under the name ``"bsbr"`` in transformers' ``AttentionInterface``.
The new weights live in a :class:`BSBRMeta` module attached to each attention module as ``module.bsbr``.

Masks: the ``"bsbr"`` mask function hands the attention function the 2-D key padding mask [B, S] (True = token)
instead of a [B, 1, T, S] causal mask, which BSBR does not need and which at 64k tokens would be 4 GB.

Two retrieval modes (``BSBRMeta.retrieval_mode``): ``"blocks"`` calls the block-retrieval op
(:mod:`bsbr.ops.bsbr_blocks`: per-token top-k of earlier chunks by a summary of their keys, one exact softmax over
the selected chunks' tokens, the own chunk and the chunks always in view; no new weights), ``"states"`` the state
readout (:mod:`bsbr.ops.bsbr`, with the meta weights below); ``"none"`` is local attention (plus sink tokens).

Streaming: :class:`BSBRCache` (a transformers ``Cache``) holds, per layer and row, for ``"states"`` one state per
completed chunk (per key/value head), the meta keys, and the keys and values of the open chunk; for ``"blocks"``
every key and value and one summary per complete chunk.  Its ``update`` returns only the new tokens' keys and
values and hands the attention function its layer through the ``kwargs`` dict that the attention modules pass to
both ``cache.update`` and the attention function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask

from .. import _checks
from ..ops.bsbr import STATE_NORMS, BSBRPast, bsbr_parallel, bsbr_step
from ..ops.bsbr_blocks import SELECTIONS, SUMMARIES, BlockSpec, blocks_parallel, blocks_step, summarize

BSBR_IMPL = "bsbr"
WINDOW_IMPL = "bsbr_sliding_window"
META_KEYS = ("last", "mean")
META_INITS = ("identity", "zero")
RETRIEVALS = ("blocks", "states", "none")
BLOCK_OPTIONS = ("top_k", "block_summary", "block_select", "prev_chunk", "block_heads")
BLOCK_HEADS = ("kv", "query")
_CACHE_KEY = "bsbr_cache_layer"


class BSBRMeta(nn.Module):
    """The weights BSBR adds to one attention layer of a converted model, and its settings.

    ``retrieval="blocks"`` adds no weights: each query scores the complete earlier chunks of its key/value group
    by their summary (``block_summary``: "mean" key or "minmax", Quest's per-channel bound), attends to the tokens
    of the ``top_k`` best (``block_select="token"``: a choice per query; ``"chunk"``: per chunk, by its first
    query), its own chunk (causal), the stream's first ``sink_tokens`` (``= chunk_size``: the whole first chunk)
    and, with ``prev_chunk``, the previous chunk, in one exact softmax (:mod:`bsbr.ops.bsbr_blocks`).
    ``block_heads="kv"`` (default): one selection per key/value group (the scores of its query heads summed, as the
    keys are shared); ``"query"``: each query head selects its own chunks (keys and values repeated to the query
    heads before the op, so the streaming cache holds H instead of Hk heads of them).

    ``retrieval="states"`` (the state readout) adds:
    meta_q [H, d, d]: per query head, the meta query of chunk i is r_i = meta_q[h] q_{first token of i};
    meta_k [Hk, d, d]: per key/value head, the meta key of chunk j is h_j = meta_k[g] k_j, with k_j the chunk's
    last key (``meta_key="last"``) or the mean of its keys (``"mean"``);
    gate [H]: scale of the retrieved term per query head (1 = the BSBR formula);
    sink_tokens s: chunks after the first also attend, in their local softmax, to the stream's first s tokens (the
    "attention sink" of pretrained models; 0 = BSBR's local part as defined);
    compress [m, d*d] / restore [d*d, m] with ``compression_factor`` f (m = d*d / f).

    Meta queries belong to the query head (each head chooses its own mixture) and meta keys to the key/value head
    (they describe the chunk whose state that head stores), so grouped-query models store Hk states per chunk.
    With ``meta_init="identity"`` r_i . h_j is the model's own attention logit between the first token of chunk i
    and the last token (or the mean key) of chunk j.

    ``retrieval="none"``: local attention (and the sink tokens) only.  ``meta.retrieval = False`` switches any mode
    to local attention for a comparison and ``True`` back (``retrieval_mode`` keeps the configured one).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, chunk_size: int, *,
                 compression_factor: int | None = None, state_norm: str = "mean", meta_key: str = "last",
                 retrieval_window: int | None = None, retrieval: str | bool = "states", gate_init: float = 1.0,
                 meta_init: str = "identity", sink_tokens: int = 0, top_k: int | None = None,
                 block_summary: str | None = None, block_select: str | None = None, prev_chunk: bool | None = None,
                 block_heads: str | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size)
        if isinstance(retrieval, bool):  # settings saved before the block mode: True = the state readout
            retrieval = "states" if retrieval else "none"
        self.retrieval_mode = _checks.one_of("retrieval", retrieval, RETRIEVALS)
        self.retrieval_on = True
        self.state_norm = _checks.one_of("state_norm", state_norm, STATE_NORMS)
        self.meta_key_mode = _checks.one_of("meta_key", meta_key, META_KEYS)
        self.retrieval_window = (None if retrieval_window is None
                                 else _checks.positive_int("retrieval_window", retrieval_window))
        self.sink_tokens = _checks.non_negative_int("sink_tokens", sink_tokens)
        if self.sink_tokens > self.chunk_size:
            raise ValueError(f"sink_tokens must be at most chunk_size={chunk_size}, got {sink_tokens}")
        _checks.one_of("meta_init", meta_init, META_INITS)
        blocks = {"top_k": top_k, "block_summary": block_summary, "block_select": block_select,
                  "prev_chunk": prev_chunk, "block_heads": block_heads}
        if self.retrieval_mode == "blocks":
            self.top_k = _checks.positive_int("top_k", 2 if top_k is None else top_k)
            self.block_summary = _checks.one_of("block_summary", block_summary or "mean", SUMMARIES)
            self.block_select = _checks.one_of("block_select", block_select or "token", SELECTIONS)
            self.block_heads = _checks.one_of("block_heads", block_heads or "kv", BLOCK_HEADS)
            if prev_chunk is not None and not isinstance(prev_chunk, bool):
                raise TypeError(f"prev_chunk must be a bool, got {prev_chunk!r}")
            self.prev_chunk = bool(prev_chunk)
            for name, value in (("compression_factor", compression_factor), ("retrieval_window", retrieval_window)):
                if value is not None:
                    raise ValueError(f"{name}={value!r} belongs to the state readout (retrieval='states'); "
                                     "retrieval='blocks' keeps every key and has no states to compress or window")
            self.meta_q = self.meta_k = self.gate = self.compress = self.restore = None
            self.compression_factor = None
            return
        given = {k: v for k, v in blocks.items() if v is not None}
        if given:
            raise ValueError(f"{sorted(given)} belong to retrieval='blocks', got them with "
                             f"retrieval={self.retrieval_mode!r}")
        self.top_k, self.block_summary, self.block_select, self.prev_chunk = 0, "mean", "token", False
        self.block_heads = "kv"
        d = head_dim
        eye = torch.eye(d) if meta_init == "identity" else torch.zeros(d, d)
        self.meta_q = nn.Parameter(eye.repeat(num_heads, 1, 1))
        self.meta_k = nn.Parameter(eye.repeat(num_kv_heads, 1, 1))
        self.gate = nn.Parameter(torch.full((num_heads,), float(gate_init)))
        self.compression_factor = compression_factor
        if compression_factor is not None:
            f = _checks.positive_int("compression_factor", compression_factor)
            if (d * d) % f:
                raise ValueError(f"compression_factor must divide head_dim*head_dim={d * d}, got {compression_factor}")
            m = d * d // f
            # P: m orthonormal rows of a random rotation; P' = P^T, so P'P is a projection at initialisation
            basis = torch.linalg.qr(torch.randn(d * d, m, generator=torch.Generator().manual_seed(0)))[0]
            self.compress = nn.Parameter(basis.T.contiguous())
            self.restore = nn.Parameter(basis.contiguous())
        else:
            self.compress = self.restore = None

    @property
    def retrieval(self) -> bool:
        """True while the configured retrieval is on (False: local attention, for comparisons)."""
        return self.retrieval_on and self.retrieval_mode != "none"

    @retrieval.setter
    def retrieval(self, on: bool) -> None:
        self.retrieval_on = bool(on)

    @property
    def uses_blocks(self) -> bool:
        """Block retrieval's op (and cache) serve this layer: the configured mode is "blocks"."""
        return self.retrieval_mode == "blocks"

    def block_spec(self, scaling: float) -> BlockSpec:
        """The op's settings (top_k 0 while retrieval is switched off: own chunk and chunks in view only)."""
        return BlockSpec(chunk=self.chunk_size, top_k=self.top_k if self.retrieval else 0, sink=self.sink_tokens,
                         prev_chunk=self.prev_chunk, summary=self.block_summary, select=self.block_select,
                         scaling=scaling)

    def block_kv(self, k: torch.Tensor, v: torch.Tensor, num_heads: int):
        """k, v [B, Hk, T, d] as the op takes them: repeated to the query heads with ``block_heads="query"``."""
        G = num_heads // k.shape[1]
        if self.block_heads == "kv" or G == 1:
            return k, v
        return k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)

    def full(self, q, k, v, scaling: float, dropout: float = 0.0) -> torch.Tensor:
        """Outputs [B, H, T, d] of a whole sequence q [B, H, T, d], k, v [B, Hk, T, d] (no past)."""
        if not self.uses_blocks:
            return self.segment(q, k, v, scaling, dropout=dropout).out
        if dropout:
            raise ValueError(f"retrieval='blocks' has no attention dropout; got dropout={dropout} (call model.eval(), "
                             "or set the model's attention_dropout to 0)")
        k, v = self.block_kv(k, v, q.shape[1])
        return blocks_parallel(q, k, v, self.block_spec(scaling))[0]

    def meta_query(self, q_first: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] queries at chunk starts -> meta queries [B, H, n, d]."""
        return torch.einsum("bhnd,hed->bhne", q_first, self.meta_q.to(q_first.dtype))

    def meta_key(self, k_chunks: torch.Tensor) -> torch.Tensor:
        """[B, Hk, n, chunk, d] keys of complete chunks -> meta keys [B, Hk, n, d]."""
        pooled = k_chunks[:, :, :, -1] if self.meta_key_mode == "last" else k_chunks.mean(dim=3)
        return torch.einsum("bhnd,hed->bhne", pooled, self.meta_k.to(pooled.dtype))

    def settings(self) -> dict:
        if self.uses_blocks:
            return {"chunk_size": self.chunk_size, "retrieval": "blocks", "top_k": self.top_k,
                    "block_summary": self.block_summary, "block_select": self.block_select,
                    "block_heads": self.block_heads, "prev_chunk": self.prev_chunk, "sink_tokens": self.sink_tokens}
        return {"chunk_size": self.chunk_size, "compression_factor": self.compression_factor,
                "state_norm": self.state_norm, "meta_key": self.meta_key_mode,
                "retrieval_window": self.retrieval_window, "retrieval": self.retrieval_mode,
                "sink_tokens": self.sink_tokens}

    def op_options(self, dtype) -> dict:
        """The op's keyword arguments for tensors of ``dtype`` (scaling aside)."""
        return {"gate": _cast(self.gate, dtype), "sink": self.sink_tokens, "state_norm": self.state_norm,
                "window": self.retrieval_window, "compress": _cast(self.compress, dtype),
                "restore": _cast(self.restore, dtype), "retrieval": "states" if self.retrieval else "none"}

    def chunk_meta(self, q, k, past: BSBRPast | None):
        """Meta queries [B, H, C, d] of the C chunks that new tokens q [B, H, T, d], k [B, Hk, T, d] touch, and the
        meta keys [B, Hk, n, d] of the n chunks they complete (the open chunk of ``past`` is the first of both)."""
        ch = self.chunk_size
        f = 0 if past is None else past.open_len
        L = f + q.shape[2]
        C, done = -(-L // ch), L // ch
        starts = (torch.arange(C, device=q.device) * ch - f).clamp(min=0)
        r = self.meta_query(q[:, :, starts])
        if f:  # the open chunk's meta query came from its first token, seen earlier
            r = torch.cat([past.open_query[:, :, None], r[:, :, 1:]], dim=2)
        if self.meta_key_mode == "last":
            return r, self.meta_key(k[:, :, torch.arange(1, done + 1, device=k.device) * ch - 1 - f, None])
        keys = torch.cat([past.open_k, k], dim=2) if f else k
        return r, self.meta_key(keys[:, :, : done * ch].unflatten(2, (done, ch)))

    def segment(self, q, k, v, scaling: float, past: BSBRPast | None = None, dropout: float = 0.0,
                need_states: bool = False):
        """The chunked op over new tokens q [B, H, T, d], k, v [B, Hk, T, d] (continuing ``past``, if given)."""
        r, h = self.chunk_meta(q, k, past) if self.retrieval else (None, None)
        return bsbr_parallel(q, k, v, r, h, self.chunk_size, scaling=scaling, past=past, dropout=dropout,
                             need_states=need_states, **self.op_options(q.dtype))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


# -------------------------------------------------------------------------------------------- masks
def bsbr_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask function of the BSBR backends: the key padding mask [B, kv_length] (True = a token), or None when
    every key is a token.  Causality is built into the attention functions."""
    mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if mask is None:
        return None
    mask = mask[:, kv_offset : kv_offset + kv_length].bool()
    return None if bool(mask.all()) else mask


def _key_validity(mask: torch.Tensor | None, S: int) -> torch.Tensor | None:
    """The [B, S] key padding mask from whatever mask arrived (None, 2-D, or a 4-D bool / additive mask)."""
    if mask is None:
        return None
    if mask.dim() == 4:  # another mask function built a [B, 1, T, S] mask: its last query row sees every key
        mask = mask[:, 0, -1, :]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask.bool()
    if mask.shape[-1] != S:
        raise ValueError(f"attention mask covers {mask.shape[-1]} keys, expected {S}")
    return None if bool(mask.all()) else mask


def _padded_rows(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first token, token count) per row; raise if a row's tokens are not one contiguous run."""
    T = valid.shape[1]
    count = valid.sum(dim=1)
    start = valid.float().argmax(dim=1)
    pos = torch.arange(T, device=valid.device)[None, :]
    run = (pos >= start[:, None]) & (pos < (start + count)[:, None])
    if not bool((run == valid).all()):
        bad = int((run != valid).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask row {bad} has padding between tokens; BSBR conversion supports left- or "
                         "right-padded rows (each row's tokens one contiguous run)")
    return start, count


def _rolled(x: torch.Tensor, shift: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Roll each row b of x [B, H, T, d] left by shift[b] along T (right, if ``inverse``)."""
    T = x.shape[2]
    idx = torch.arange(T, device=x.device)[None, :] + (-shift if inverse else shift)[:, None]
    idx = idx.remainder(T)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return x.gather(2, idx)


# ---------------------------------------------------------------------------------------- functions
def bsbr_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs):
    """BSBR in transformers' attention-function signature.

    query [B, H, T, d], key/value [B, Hk, S, d]; returns (output [B, T, H, d], None).  Without a cache S = T and
    each row's chunks count from its first token (left padding shifts them, as in the rest of bsbr).  With a
    :class:`BSBRCache`, S = T: the keys and values are the new tokens', and the cache supplies the past.
    """
    meta: BSBRMeta = module.bsbr
    B, H, T, d = query.shape
    S = key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    layer = kwargs.get(_CACHE_KEY)
    if S != T:
        raise ValueError(f"BSBR attention got {S} keys for {T} queries: the model was given a KV cache "
                         f"(e.g. DynamicCache) instead of bsbr.convert.BSBRCache; pass cache=BSBRCache() or none")
    valid = _key_validity(attention_mask, S)
    if layer is not None:
        out = layer.process(meta, query, key, value, valid, scaling)
    elif valid is None:
        out = meta.full(query, key, value, scaling, dropout=dropout)
    else:
        start, count = _padded_rows(valid)
        q, k, v = (_rolled(t, start) for t in (query, key, value))  # each row's tokens first, padding after
        out = _rolled(meta.full(q, k, v, scaling, dropout=dropout), start, inverse=True)
        out = torch.where(valid[:, None, :, None], out, 0.0)  # a select: padding's NaN stays out of the zeros
    return out.transpose(1, 2).contiguous(), None


def sliding_window_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                                     scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Causal softmax attention over the ``module.bsbr_window`` latest keys and, with ``module.bsbr_window_sink`` =
    s > 0, the row's first s tokens (StreamingLLM's attention sinks): the cheaper conversions BSBR is compared with.
    query [B, H, T, d], key/value [B, Hk, S, d] (S >= T with a KV cache)."""
    W = module.bsbr_window
    sink = getattr(module, "bsbr_window_sink", 0)
    B, H, T, d = query.shape
    S = key.shape[2]
    G = H // key.shape[1]
    valid = _key_validity(attention_mask, S)
    qpos = (S - T) + torch.arange(T, device=query.device)[:, None]
    kpos = torch.arange(S, device=query.device)[None, :]
    allowed = (kpos <= qpos) & (kpos > qpos - W)  # [T, S]
    if sink and valid is None:
        allowed = allowed | ((kpos < sink) & (kpos <= qpos))
    if valid is not None:
        allowed = allowed[None, None] & valid[:, None, None, :]
        if sink:  # each row's first s tokens (rows may be left-padded)
            rank = valid.long().cumsum(-1) - 1  # [B, S]
            allowed = allowed | ((rank < sink) & valid)[:, None, None, :] & (kpos <= qpos)
        allowed = allowed | (kpos == qpos)  # a padding query sees itself: no empty rows (its output is zeroed)
    k, v = (t.repeat_interleave(G, dim=1) if G > 1 else t for t in (key, value))
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, dropout_p=dropout,
                                         scale=d**-0.5 if scaling is None else scaling)
    if valid is not None:
        out = out * valid[:, None, S - T :, None]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(BSBR_IMPL, bsbr_attention_forward)
AttentionMaskInterface.register(BSBR_IMPL, bsbr_mask)
AttentionInterface.register(WINDOW_IMPL, sliding_window_attention_forward)
AttentionMaskInterface.register(WINDOW_IMPL, bsbr_mask)


# ------------------------------------------------------------------------------------------- cache
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
            raise ValueError("BSBRCache.update needs the attention module's kwargs (transformers >= 5 passes them)")
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
        raise NotImplementedError("BSBRCache cannot be cropped: chunk states cannot give back single tokens")

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
            S = k.shape[3] * (2 if spec.summary == "minmax" else 1)
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


class BSBRCache(Cache):
    """The streaming cache of a converted model: pass it as ``cache=`` (``past_key_values=``) or let ``generate()``
    make one (converted models do by default).  ``nbytes()`` is what it holds, for comparison with a KV cache."""

    def __init__(self, *args, **kwargs):
        super().__init__(layer_class_to_replicate=BSBRCacheLayer)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
