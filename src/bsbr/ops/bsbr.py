"""BSBR — Block Sparse attention with Block Retrieval — as pure tensor functions (docs/bsbr.md, "Definition" and
"Implementation").

Shapes: q [B, H, T, d]; k, v [B, Hk, T, d] with Hk dividing H — the G = H / Hk query heads of a group share one
key/value head (multi-head attention: Hk = H; grouped-query attention, as in converted models: Hk < H).  Chunk size
``chunk``, c(t) = t // chunk, C chunks.  Per query head h with key/value head g(h):

    o_loc[t] = softmax over s in chunk c(t), s <= t (and, for c(t) >= 1, the stream's first ``sink`` tokens)
               of (scaling * q_t . k_s), applied to v_s
    F_j      = norm * sum_{s in chunk j} k_s v_s^T        one d x d state per complete chunk and key/value head
    alpha    = softmax over j < i (and j >= i - window) of (r_i . h_j / sqrt(d))   r per query head, h per kv head
    S_i      = sum_j alpha[i, j] F_j                      (chunk 0, or an empty window, retrieves nothing)
    o[t]     = o_loc[t] + gate_h * scaling * q_t^T S_{c(t)}

``scaling`` defaults to 1/sqrt(d) (BSBR's own; a converted model passes its own), ``gate`` [H] to 1, ``norm`` is
1/chunk for ``state_norm="mean"`` and 1 for ``"none"``.  With compression F_j is stored as z_j = P vec(F_j)
(m = d*d/f numbers), the mixture is taken over the z_j and S_i = unvec(P' sum_j alpha[i, j] z_j); ``compress`` is
P ([m, d*d]) and ``restore`` P' ([d*d, m]).  r_i and h_j are given (the caller's meta projections pick them).

``retrieval`` says what a chunk reads from earlier chunks (see :data:`RETRIEVALS`).

Three forms compute the same thing:

* :func:`bsbr_reference` — the definition, token by token (tests and attention maps);
* :func:`bsbr_parallel` — chunked (fused SDPA inside chunks, batched matmuls between them), over a segment that may
  continue a stream (:class:`BSBRPast`: stored states, an open chunk, sink tokens): training, prefill, pieces;
* :func:`bsbr_step` — one new token per row (rows may stand at different positions): decoding.

Non-finite values stay where they are: a NaN or inf in q, k or v at position p changes no output before p, in all
three forms.  The reference only ever touches what a position sees; the step selects before it multiplies; the
chunked form, whose dense blocks multiply masked (zero) weights by future values, runs on inputs whose non-finite
tokens are zeroed and then sets every output that depends on one of them to NaN (checked by one cheap sum per input,
so finite inputs take the fast path unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bsbr_chunked import (
    chunked_rows,
    compress_states,
    mix,
    mixing_groups,
    nonfinite_guard,
    restore_states,
)

STATE_NORMS = ("mean", "none")

RETRIEVALS = ("none", "states")
"""What each chunk reads from earlier chunks: ``"states"`` a softmax mixture of their K^T V states (the readout
above), ``"none"`` nothing (local attention, with the sink tokens).  A layer dispatches on this argument; a mode
implemented elsewhere (issue 27's ``"blocks"``: exact softmax over the tokens of retrieved chunks) joins the tuple
where it is dispatched."""

_mixing_groups = mixing_groups  # the FLOP meter and bench_bsbr count the chunk groups the chunked form uses

# With autograd, rows (batch x key/value head) are processed in groups whose tensors stay under this size: large
# temporaries are returned to the OS by the allocator and page-faulted in again on every call, which costs more than
# the arithmetic on 2 CPU cores; small ones are reused.
_GROUP_BYTES = 16 * 2**20


def state_scale(chunk: int, state_norm: str) -> float:
    """The factor applied to each chunk's K^T V: 1/chunk for "mean", 1 for "none"."""
    if state_norm == "mean":
        return 1.0 / chunk
    if state_norm == "none":
        return 1.0
    raise ValueError(f"state_norm must be one of {STATE_NORMS}, got {state_norm!r}")


def expand_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hk, ...] -> [B, Hk * groups, ...]: each key/value head repeated for its query group."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def check_args(q, k, v, chunk: int, *, sink: int = 0, retrieval: str = "states", gate=None) -> int:
    """Validate the shared arguments; return G, the query heads per key/value head."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"expected q [B, H, T, d] and k, v [B, Hk, T, d] with the same B and d, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    H, Hk = q.shape[1], k.shape[1]
    if H % Hk:
        raise ValueError(f"key/value heads must divide query heads, got Hk={Hk} for H={H}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    if isinstance(sink, bool) or not isinstance(sink, int) or not 0 <= sink <= chunk:
        raise ValueError(f"sink must be an integer in [0, chunk={chunk}], got {sink!r}")
    if retrieval not in RETRIEVALS:
        raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {retrieval!r}")
    if gate is not None and tuple(gate.shape) != (H,):
        raise ValueError(f"gate must have shape [H] = [{H}], got {tuple(gate.shape)}")
    return H // Hk


# ----------------------------------------------------------------------------------------- reference
def bsbr_reference(q, k, v, r, h, chunk: int, *, scaling: float | None = None, gate=None, sink: int = 0,
                   state_norm: str = "mean", window: int | None = None, compress=None, restore=None,
                   retrieval: str = "states", return_weights: bool = False):
    """The definition evaluated token by token (slow; tests and attention maps only).

    q [B, H, T, d]; k, v [B, Hk, T, d]; r [B, H, C, d] and h [B, Hk, C, d]: the meta query and meta key of every
    chunk (the key of an incomplete chunk is never used).  ``window``: chunk i retrieves from chunks i - window ..
    i - 1 only (None: all earlier chunks).  ``sink``: tokens after the first chunk also attend, in their local
    softmax, to the first ``sink`` tokens.  Returns o [B, H, T, d]; with ``return_weights`` also (local, retrieval)
    weights, each [B, H, T, T], such that o = (local + retrieval) @ v (without compression; v expanded to H heads).
    """
    G = check_args(q, k, v, chunk, sink=sink, retrieval=retrieval, gate=gate)
    B, H, T, d = q.shape
    kx, vx, hx = expand_groups(k, G), expand_groups(v, G), expand_groups(h, G)
    scaling = d**-0.5 if scaling is None else scaling
    norm = state_scale(chunk, state_norm)
    gate = q.new_ones(H) if gate is None else gate
    states = []  # compressed states of every complete chunk, straight from the definition
    for j in range(T // chunk):
        kj, vj = kx[:, :, j * chunk : (j + 1) * chunk], vx[:, :, j * chunk : (j + 1) * chunk]
        states.append(compress_states((norm * torch.einsum("bhsd,bhse->bhde", kj, vj)).flatten(-2), compress))
    out = torch.zeros_like(q)
    w_loc = q.new_zeros(B, H, T, T) if return_weights else None
    w_ret = q.new_zeros(B, H, T, T) if return_weights else None
    for t in range(T):
        c, lo = t // chunk, (t // chunk) * chunk
        qt = q[:, :, t]  # [B, H, d]
        seen = [*range(sink if c > 0 else 0), *range(lo, t + 1)]  # sinks lie in chunk 0: never counted twice
        p = torch.softmax(torch.einsum("bhd,bhsd->bhs", qt, kx[:, :, seen]) * scaling, dim=-1)
        o = torch.einsum("bhs,bhsd->bhd", p, vx[:, :, seen])
        if return_weights:
            w_loc[:, :, t, seen] = p
        j0 = 0 if window is None else max(0, c - window)  # the chunks this one may retrieve: j0 .. c - 1
        if retrieval == "states" and c > j0:
            logits = torch.stack([(r[:, :, c] * hx[:, :, j]).sum(-1) for j in range(j0, c)], dim=-1) * d**-0.5
            alpha = torch.softmax(logits, dim=-1)  # [B, H, c - j0]
            S = restore_states(sum(alpha[..., i, None] * states[j] for i, j in enumerate(range(j0, c))), restore, d)
            o = o + gate[None, :, None] * scaling * torch.einsum("bhd,bhde->bhe", qt, S)
            if return_weights:
                a = j0 * chunk
                qk = torch.einsum("bhd,bhsd->bhs", qt, kx[:, :, a:lo]) * scaling
                w_ret[:, :, t, a:lo] = gate[None, :, None] * alpha.repeat_interleave(chunk, dim=-1) * norm * qk
        out[:, :, t] = o
    if return_weights:
        return out, w_loc, w_ret
    return out


# -------------------------------------------------------------------------------------------- chunked
@dataclass
class BSBRPast:
    """What a stream has seen before a segment, all rows at the same position (empty by default: a new stream).

    states [B, Hk, C0, m]: raw-sum states K_j^T V_j (compressed if asked) of the C0 chunks kept for retrieval;
    keys [B, Hk, C0, d]: their meta keys; open_k, open_v [B, Hk, f, d]: the f < chunk tokens of the open chunk
    (f = 0: the stream stands at a chunk boundary); done: chunks the stream has completed (evicted ones included);
    sink_k, sink_v [B, Hk, s, d]: the stream's first s tokens, once chunk 0 is complete (None without sinks).
    """

    states: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    open_k: torch.Tensor | None = None
    open_v: torch.Tensor | None = None
    done: int = 0
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None

    @property
    def open_len(self) -> int:
        return 0 if self.open_k is None else self.open_k.shape[2]


@dataclass
class BSBRSegment:
    """What :func:`bsbr_parallel` returns: the outputs and what the stream keeps after the segment."""

    out: torch.Tensor  # [B, H, T, d] outputs of the segment's tokens
    states: torch.Tensor | None  # [B, Hk, n, m] raw states of the n chunks the segment completed (need_states)
    keys: torch.Tensor | None  # [B, Hk, n, d] their meta keys (need_states)
    open_k: torch.Tensor  # [B, Hk, f', d] the open chunk after the segment (f' = 0 at a chunk boundary)
    open_v: torch.Tensor
    mixture: torch.Tensor | None  # [B, H, d, d] the open chunk's retrieved mixture (gate included; None if f' = 0)
    done: int  # chunks the stream has completed after the segment
    sink_k: torch.Tensor | None = None  # [B, Hk, s, d] the stream's first s tokens, once chunk 0 is complete
    sink_v: torch.Tensor | None = None

    def past(self, before: BSBRPast | None = None) -> BSBRPast:
        """The stream after this segment, for the next one (``before``: the past the segment continued)."""
        states, keys = self.states, self.keys
        if before is not None and before.states is not None and states is not None:
            states, keys = torch.cat([before.states, states], dim=2), torch.cat([before.keys, keys], dim=2)
        return BSBRPast(states, keys, self.open_k, self.open_v, self.done, self.sink_k, self.sink_v)


def bsbr_parallel(q, k, v, r, h, chunk: int, *, scaling: float | None = None, gate=None, sink: int = 0,
                  state_norm: str = "mean", window: int | None = None, compress=None, restore=None,
                  retrieval: str = "states", past: BSBRPast | None = None, dropout: float = 0.0,
                  need_states: bool = False) -> BSBRSegment:
    """Chunked BSBR over the T new tokens of a stream: q [B, H, T, d], k, v [B, Hk, T, d].

    ``past`` (None: the stream starts here) holds earlier chunks' states and meta keys and the f tokens of the open
    chunk, which the segment's first f positions complete.  r [B, H, C, d]: the meta query of each of the C chunks
    the segment touches (the open chunk first; its mixture is recomputed from the same stored states it saw when it
    opened); h [B, Hk, C', d]: the meta keys of those chunks, of which the first ``(f + T) // chunk`` (the complete
    ones) are used; both may be None with ``retrieval="none"``.  ``dropout``: attention dropout inside the local
    softmax.  ``need_states`` also returns the states and meta keys of the chunks the segment completes (for a
    streaming cache).  Other arguments as in :func:`bsbr_reference`.

    States are kept as raw sums K_j^T V_j (compressed if asked); the normalisation commutes with the mixture and
    the linear maps, so it is applied once, at readout.
    """
    G = check_args(q, k, v, chunk, sink=sink, retrieval=retrieval, gate=gate)
    B, H, T, d = q.shape
    Hk = k.shape[1]
    readout = (d**-0.5 if scaling is None else scaling) * state_scale(chunk, state_norm)
    f = 0 if past is None else past.open_len
    if f:  # the open chunk's keys come first; its queries were answered already
        k, v = torch.cat([past.open_k, k], dim=2), torch.cat([past.open_v, v], dim=2)
        q = torch.cat([q.new_zeros(B, H, f, d), q], dim=2)
    L = f + T
    C, done = math.ceil(L / chunk), L // chunk
    first_chunk = 0 if past is None else past.done  # the stream's number of the segment's first chunk
    retrieve = retrieval == "states"
    states = keys = None
    if retrieve and past is not None and past.states is not None and past.states.shape[2]:
        states, keys = past.states, past.keys
    sinks = _sinks(k, v, sink, past, first_chunk, done)
    raw = (k, v, sinks)  # what the stream keeps is never sanitised
    guard = nonfinite_guard(k, v, sinks, states, chunk=chunk, groups=G, first_chunk=first_chunk, window=window,
                            retrieve=retrieve)
    if guard is not None:  # some input is not finite: zero it, compute, then poison what depends on it
        k, v, sinks, states = guard.sanitized
    pad = C * chunk - L
    if pad:  # right padding cannot reach real tokens: attention inside a chunk is causal
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = B * Hk  # rows: one per (batch, key/value head), each with its G query heads
    qr, kr, vr = q.reshape(n, G, C, chunk, d), k.reshape(n, C, chunk, d), v.reshape(n, C, chunk, d)
    rr = hr = None
    if retrieve:
        rr, hr = r.reshape(n, G, C, d), h[:, :, :done].reshape(n, done, d)
    sr = None if sinks is None else tuple(t.reshape(n, *t.shape[2:]) for t in sinks)
    pr = None if states is None else (states.reshape(n, *states.shape[2:]), keys.reshape(n, *keys.shape[2:]))
    gr = None if gate is None else gate.view(1, Hk, G).expand(B, Hk, G).reshape(n, G)
    leaves = (q, k, v, r, h, gate, compress, restore, *(sr or ()), *(pr or ()))
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)
    # with autograd (no in-place updates) rows go in groups whose pieces are concatenated; for inference one SDPA
    # call covers every row and the readout is added into its output in place
    group = max(1, _GROUP_BYTES // (G * C * chunk * d * q.element_size())) if differentiable else n
    outs, zs, mixes = [], [], []
    for lo in range(0, n, group):
        sl = slice(lo, lo + group)
        o, z, last = chunked_rows(
            qr[sl], kr[sl], vr[sl], rr if rr is None else rr[sl], hr if hr is None else hr[sl],
            None if pr is None else (pr[0][sl], pr[1][sl]),
            None if sr is None else (sr[0][sl], sr[1][sl]), None if gr is None else gr[sl], chunk=chunk,
            scaling=scaling, readout=readout, window=window, compress=compress, restore=restore, dropout=dropout,
            first_chunk=first_chunk, inplace=not differentiable, retrieve=retrieve, need_states=need_states)
        outs.append(o)
        zs.append(z)
        mixes.append(last)
    cat = lambda ts: torch.cat(ts) if len(ts) > 1 else ts[0]  # noqa: E731
    out = cat(outs).view(B, H, C * chunk, d)
    z = cat(zs).view(B, Hk, C, -1)[:, :, :done] if retrieve and need_states else None
    mixture = cat(mixes).view(B, H, d, d) if retrieve and L % chunk else None
    if guard is not None:
        out, z, mixture = guard.poison(out, z, mixture)
    keep = need_states and retrieve
    return BSBRSegment(out=out[:, :, f:L], states=z if keep else None, keys=h[:, :, :done] if keep else None,
                       open_k=raw[0][:, :, done * chunk : L], open_v=raw[1][:, :, done * chunk : L], mixture=mixture,
                       done=first_chunk + done, sink_k=None if raw[2] is None else raw[2][0],
                       sink_v=None if raw[2] is None else raw[2][1])


def _sinks(k, v, sink: int, past: BSBRPast | None, first_chunk: int, done: int):
    """(sink_k, sink_v) [B, Hk, s, d] the segment's later chunks see, or None."""
    if not sink:
        return None
    if past is not None and past.sink_k is not None:
        return past.sink_k, past.sink_v
    if first_chunk == 0 and done >= 1:  # chunk 0 completes in this segment: its first tokens
        return k[:, :, :sink], v[:, :, :sink]
    return None


# ------------------------------------------------------------------------------------------ recurrent
@dataclass
class BSBRStep:
    """What :func:`bsbr_step` returns."""

    out: torch.Tensor  # [B, H, 1, d]
    mixture: torch.Tensor | None  # [B, H, d, d] each row's open-chunk mixture (new where a chunk opened)
    state: torch.Tensor | None  # [B, Hk, m] raw state of the open chunk (meaningful where a chunk closed), else None


def bsbr_step(q, open_k, open_v, phase: torch.Tensor, chunk: int, *, r=None, mixture=None, states=None, keys=None,
              kept: torch.Tensor | None = None, valid: torch.Tensor | None = None, scaling: float | None = None,
              gate=None, sink_k=None, sink_v=None, sink_seen: torch.Tensor | None = None, state_norm: str = "mean",
              window: int | None = None, compress=None, restore=None, retrieval: str = "states") -> BSBRStep:
    """One new token per row: q [B, H, 1, d]; its key and value are already in the open chunk's buffers open_k,
    open_v [B, Hk, L, d] at slot ``phase[b]`` ([B] long, the token's place in its chunk; slots after it are ignored).

    A row with phase 0 opens a chunk: its mixture is retrieved with meta query r [B, H, d] from the stored states
    [B, Hk, C, m] and meta keys [B, Hk, C, d], of which row b may use the first ``kept[b]`` (None: all), the
    ``window`` latest of those; other rows read ``mixture`` [B, H, d, d], so a token costs O(chunk d + d^2) per head
    apart from the one that opens a chunk.  A row with phase chunk - 1 closes its chunk (L = chunk then): ``state``
    is its K^T V.  ``valid`` [B] (None: all): rows whose mixture may change.  ``sink_k``, ``sink_v`` [B, Hk, s, d]
    are seen by the rows where ``sink_seen`` [B] (None: all).  Other arguments as in :func:`bsbr_reference`.
    """
    G = check_args(q, open_k, open_v, chunk, retrieval=retrieval, gate=gate)
    B, H, _, d = q.shape
    Hk, L = open_k.shape[1], open_k.shape[2]
    p = int(phase[0])
    if bool((phase == p).all()):  # rows in step: the slots up to the token are exactly what each sees
        ks, vs, seen = open_k[:, :, : p + 1], open_v[:, :, : p + 1], None
    else:  # ragged rows: what a row may not see is zeroed before it is multiplied
        seen = torch.arange(L, device=q.device)[None, :] <= phase[:, None]  # [B, L]
        ks, vs = (torch.where(seen[:, None, :, None], t, 0) for t in (open_k, open_v))
    if sink_k is not None:
        sees = q.new_ones(B, dtype=torch.bool) if sink_seen is None else sink_seen
        sk, sv = (torch.where(sees[:, None, None, None], t, 0) for t in (sink_k, sink_v))
        ks, vs = torch.cat([sk, ks], dim=2), torch.cat([sv, vs], dim=2)
        if seen is not None or sink_seen is not None:
            seen = ks.new_ones(B, ks.shape[2] - sk.shape[2], dtype=torch.bool) if seen is None else seen
            seen = torch.cat([sees[:, None].expand(B, sk.shape[2]), seen], dim=1)
    scale = d**-0.5 if scaling is None else scaling
    scores = (q.reshape(B, Hk, G, d) @ ks.transpose(-1, -2)) * scale  # [B, Hk, G, L']
    if seen is not None:
        scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ vs).view(B, H, 1, d)
    state = None
    if retrieval == "states":
        valid = q.new_ones(B, dtype=torch.bool) if valid is None else valid
        opening = valid & (phase == 0)
        if bool(opening.any()):
            S = _retrieve(r, states, keys, kept, window, gate, restore)
            mixture = S if mixture is None else torch.where(opening[:, None, None, None], S, mixture)
        out = out + (q * (scale * state_scale(chunk, state_norm))) @ mixture
        if bool((valid & (phase == chunk - 1)).any()):
            state = compress_states((open_k.transpose(-1, -2) @ open_v).flatten(-2), compress)
    return BSBRStep(out=out, mixture=mixture if retrieval == "states" else None, state=state)


def _retrieve(r, states, keys, kept, window, gate, restore) -> torch.Tensor:
    """Each row's mixture [B, H, d, d] for a chunk opening now: meta query r [B, H, d] over the stored states
    [B, Hk, C, m] and meta keys [B, Hk, C, d], of which row b may use the first kept[b] (the ``window`` latest)."""
    B, H, d = r.shape
    if states is None or states.shape[2] == 0:
        return r.new_zeros(B, H, d, d)
    Hk, C = states.shape[1], states.shape[2]
    G = H // Hk
    slots = torch.arange(C, device=r.device)[None, :]
    count = torch.full((B,), C, device=r.device) if kept is None else kept
    allowed = slots < count[:, None]  # [B, C]
    if window is not None:
        allowed = allowed & (slots >= count[:, None] - window)
    if not bool(allowed.all()):  # states a row may not retrieve never enter its product
        states = torch.where(allowed[:, None, :, None], states, 0)
    n = B * Hk
    gr = None if gate is None else gate.view(1, Hk, G).expand(B, Hk, G).reshape(n, G)
    rows_allowed = allowed[:, None].expand(B, Hk, C).reshape(n, 1, 1, C)
    S = mix(r.reshape(n, G, 1, d), keys.reshape(n, C, d), states.reshape(n, C, -1), rows_allowed, restore, gr)
    return S.view(B, H, d, d)
