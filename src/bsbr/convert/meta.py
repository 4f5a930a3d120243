"""The weights and settings BSBR adds to each attention layer of a converted model (:class:`BSBRMeta`).

A converted model keeps its own classes, weights and code path; the new weights live in a :class:`BSBRMeta`
module attached to each attention module as ``module.bsbr``, which the attention functions of
:mod:`bsbr.convert.backends` read.  Shapes: q [B, H, T, d], k, v [B, Hk, T, d] (H query heads, Hk key/value heads,
head dim d).

Two retrieval modes (``BSBRMeta.retrieval_mode``): ``"blocks"`` calls the block-retrieval op
(:mod:`bsbr.ops.bsbr_blocks`: per-token top-k of earlier chunks by a summary of their keys, one exact softmax over
the selected chunks' tokens, the own chunk and the chunks always in view; no new weights), ``"states"`` the state
readout (:mod:`bsbr.ops.bsbr`, with the meta weights below); ``"none"`` is local attention (plus sink tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ..ops.bsbr import STATE_NORMS, BSBRPast, bsbr_parallel
from ..ops.bsbr_blocks import SELECTIONS, SUMMARIES, BlockSpec, blocks_parallel

META_KEYS = ("last", "mean")
META_INITS = ("identity", "zero")
RETRIEVALS = ("blocks", "states", "none")
BLOCK_OPTIONS = ("top_k", "block_summary", "block_select", "prev_chunk", "block_heads")
BLOCK_HEADS = ("kv", "query")
# the keyword options of BSBRMeta that convert_to_bsbr takes (compression_factor aside) and that loading reads back
# from config.bsbr: the state readout's, the retrieval mode and sink tokens, and block retrieval's
STATE_OPTIONS = ("state_norm", "meta_key", "retrieval_window", "gate_init", "meta_init")
OPTION_NAMES = (*STATE_OPTIONS, "retrieval", "sink_tokens", *BLOCK_OPTIONS)


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
