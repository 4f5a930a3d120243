"""BSBR as a Hugging Face attention backend: the attention function, its mask function and its streaming cache.

A converted model keeps its own classes, weights and code path; only ``config._attn_implementation`` changes.
The model's attention module computes q, k, v (rotated, for RoPE models) as always and hands them to
:func:`bsbr_attention_forward`, registered under the name ``"bsbr"`` in transformers' ``AttentionInterface``.
The new weights live in a :class:`BSBRMeta` module attached to each attention module as ``module.bsbr``.

Masks: the ``"bsbr"`` mask function hands the attention function the 2-D key padding mask [B, S] (True = token)
instead of a [B, 1, T, S] causal mask, which BSBR does not need and which at 64k tokens would be 4 GB.

Streaming: :class:`BSBRCache` (a transformers ``Cache``) holds, per layer and row, one state per completed chunk
(per key/value head), the meta keys, and the keys and values of the open chunk.  Its ``update`` returns only the
new tokens' keys and values and hands the attention function its layer through the ``kwargs`` dict that the
attention modules pass to both ``cache.update`` and the attention function.
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

BSBR_IMPL = "bsbr"
WINDOW_IMPL = "bsbr_sliding_window"
META_KEYS = ("last", "mean")
META_INITS = ("identity", "zero")
_CACHE_KEY = "bsbr_cache_layer"


class BSBRMeta(nn.Module):
    """The weights BSBR adds to one attention layer of a converted model, and its settings.

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
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, chunk_size: int, *,
                 compression_factor: int | None = None, state_norm: str = "mean", meta_key: str = "last",
                 retrieval_window: int | None = None, retrieval: bool = True, gate_init: float = 1.0,
                 meta_init: str = "identity", sink_tokens: int = 0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size)
        self.state_norm = _checks.one_of("state_norm", state_norm, STATE_NORMS)
        self.meta_key_mode = _checks.one_of("meta_key", meta_key, META_KEYS)
        self.retrieval_window = (None if retrieval_window is None
                                 else _checks.positive_int("retrieval_window", retrieval_window))
        self.retrieval = bool(retrieval)
        self.sink_tokens = _checks.non_negative_int("sink_tokens", sink_tokens)
        if self.sink_tokens > self.chunk_size:
            raise ValueError(f"sink_tokens must be at most chunk_size={chunk_size}, got {sink_tokens}")
        _checks.one_of("meta_init", meta_init, META_INITS)
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

    def meta_query(self, q_first: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] queries at chunk starts -> meta queries [B, H, n, d]."""
        return torch.einsum("bhnd,hed->bhne", q_first, self.meta_q.to(q_first.dtype))

    def meta_key(self, k_chunks: torch.Tensor) -> torch.Tensor:
        """[B, Hk, n, chunk, d] keys of complete chunks -> meta keys [B, Hk, n, d]."""
        pooled = k_chunks[:, :, :, -1] if self.meta_key_mode == "last" else k_chunks.mean(dim=3)
        return torch.einsum("bhnd,hed->bhne", pooled, self.meta_k.to(pooled.dtype))

    def settings(self) -> dict:
        return {"chunk_size": self.chunk_size, "compression_factor": self.compression_factor,
                "state_norm": self.state_norm, "meta_key": self.meta_key_mode,
                "retrieval_window": self.retrieval_window, "retrieval": self.retrieval,
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
        out = meta.segment(query, key, value, scaling, dropout=dropout).out
    else:
        start, count = _padded_rows(valid)
        q, k, v = (_rolled(t, start) for t in (query, key, value))  # each row's tokens first, padding after
        out = _rolled(meta.segment(q, k, v, scaling, dropout=dropout).out, start, inverse=True)
        out = torch.where(valid[:, None, :, None], out, 0.0)  # a select: padding's NaN stays out of the zeros
    return out.transpose(1, 2).contiguous(), None


def sliding_window_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                                     scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Causal softmax attention over the ``module.bsbr_window`` latest keys (the cheaper conversion BSBR is
    compared with).  query [B, H, T, d], key/value [B, Hk, S, d] (S >= T with a KV cache)."""
    W = module.bsbr_window
    B, H, T, d = query.shape
    S = key.shape[2]
    G = H // key.shape[1]
    valid = _key_validity(attention_mask, S)
    qpos = (S - T) + torch.arange(T, device=query.device)[:, None]
    kpos = torch.arange(S, device=query.device)[None, :]
    allowed = (kpos <= qpos) & (kpos > qpos - W)  # [T, S]
    if valid is not None:
        allowed = allowed[None, None] & valid[:, None, None, :]
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
        """Bytes held by the layer's tensors (states, meta keys, open chunk, meta query, mixture, sinks)."""
        total = 0
        for row in self.rows:
            if row is not None:
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
