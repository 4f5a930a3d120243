"""BSBR with grouped-query attention and a retrieval gate, for models converted from Hugging Face checkpoints.

Shapes: q [B, H, T, d]; k, v [B, Hk, T, d] with Hk dividing H (G = H / Hk query heads share a key/value head);
chunk size ``chunk``; C chunks.  Per query head h with key/value head g(h):

    o_loc[t] = softmax over s in chunk c(t), s <= t of (scaling * q_t . k_s)  applied to v_s
    F_j      = norm * sum_{s in chunk j} k_s v_s^T                 one state per chunk and key/value head
    alpha    = softmax_{j < i}(r_i . h_j / sqrt(d))                 r per query head, h per key/value head
    S_i      = sum_{j < i} alpha[i, j] F_j                          (chunk 0 retrieves nothing)
    o[t]     = o_loc[t] + gate_h * scaling * q_t^T S_{c(t)}

``scaling`` is the model's own softmax scale (1/sqrt(d) for most models), so with one chunk covering the input
the local part is exactly the model's causal attention; ``gate`` [H] scales the retrieved term per query head
(1 everywhere is the BSBR formula; 0 is local attention only).  The states belong to the key/value head, as the
KV cache does, so a converted model's streaming cache holds Hk (not H) states per chunk.

Forms:

* :func:`gqa_bsbr_reference` — the definition token by token (tests only);
* :func:`gqa_bsbr_segment` — chunked, for a segment that may continue an open chunk of earlier tokens
  (prefill, training, pieces of a stream);
* :func:`gqa_bsbr_step` — the decode path inside one chunk, O(chunk * d + d^2) per token and head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bsbr import compress_states, restore_states, state_scale


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hk, ...] -> [B, Hk * groups, ...]: each key/value head repeated for its query group."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _retrieval_logits(r: torch.Tensor, keys: torch.Tensor, groups: int) -> torch.Tensor:
    """r [B, H, n, d] . keys [B, Hk, C, d] -> [B, H, n, C], scaled by 1/sqrt(d)."""
    B, H, n, d = r.shape
    Hk, C = keys.shape[1], keys.shape[2]
    rg = r.view(B, Hk, groups, n, d).reshape(B, Hk, groups * n, d)
    return (rg @ keys.transpose(-1, -2)).view(B, Hk, groups, n, C).reshape(B, H, n, C) * d**-0.5


def _mix(alpha: torch.Tensor, states: torch.Tensor, groups: int) -> torch.Tensor:
    """alpha [B, H, n, C] @ states [B, Hk, C, m] -> [B, H, n, m] (each query head mixes its group's states)."""
    B, H, n, C = alpha.shape
    Hk, m = states.shape[1], states.shape[-1]
    mixed = alpha.view(B, Hk, groups, n, C).reshape(B, Hk, groups * n, C) @ states
    return mixed.view(B, Hk, groups, n, m).reshape(B, H, n, m)


# ----------------------------------------------------------------------------------------- reference
def gqa_bsbr_reference(q, k, v, r, h, chunk: int, *, scaling: float, gate=None, state_norm: str = "mean",
                       window: int | None = None, compress=None, restore=None, sink: int = 0):
    """The definition evaluated token by token.  r [B, H, C, d] and h [B, Hk, C, d] are the meta query and meta
    key of every chunk (the key of an incomplete chunk is never used).  ``sink``: tokens after the first chunk
    also attend (in the local softmax) to the stream's first ``sink`` tokens.  Returns o [B, H, T, d]."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    kx, vx, hx = _expand(k, G), _expand(v, G), _expand(h, G)
    norm = state_scale(chunk, state_norm)
    gate = q.new_ones(H) if gate is None else gate
    out = torch.zeros_like(q)
    for t in range(T):
        c, lo = t // chunk, (t // chunk) * chunk
        qt = q[:, :, t]
        seen = list(range(sink)) * (c > 0) + list(range(lo, t + 1))
        p = torch.softmax(torch.einsum("bhd,bhsd->bhs", qt, kx[:, :, seen]) * scaling, dim=-1)
        o = torch.einsum("bhs,bhsd->bhd", p, vx[:, :, seen])
        j0 = 0 if window is None else max(0, c - window)
        if c > j0:
            logits = torch.stack([(r[:, :, c] * hx[:, :, j]).sum(-1) for j in range(j0, c)], -1) * d**-0.5
            alpha = torch.softmax(logits, dim=-1)
            S = 0
            for i, j in enumerate(range(j0, c)):
                Fj = norm * torch.einsum("bhsd,bhse->bhde", kx[:, :, j * chunk : (j + 1) * chunk],
                                         vx[:, :, j * chunk : (j + 1) * chunk])
                S = S + alpha[..., i, None] * compress_states(Fj.flatten(-2), compress)
            S = restore_states(S, restore, d)
            o = o + gate[None, :, None] * scaling * torch.einsum("bhd,bhde->bhe", qt, S)
        out[:, :, t] = o
    return out


# ------------------------------------------------------------------------------------------ segment
@dataclass
class GQAPast:
    """Earlier tokens of a stream, as a segment continues them (one batch of rows at the same position).

    states [B, Hk, C0, m]: raw-sum states K_j^T V_j of the C0 kept chunks (compressed if asked);
    keys [B, Hk, C0, d]: their meta keys; open_k, open_v [B, Hk, f, d]: the f < chunk keys and values of the
    open chunk; open_query [B, H, d]: its meta query; open_mixture [B, H, d, d]: its retrieved raw mixture
    (fixed when the chunk opened).  f = 0 means the stream stands at a chunk boundary.  done: chunks completed
    (evicted ones included); sink_k, sink_v [B, Hk, s, d]: the stream's first s tokens (set once chunk 0 is
    complete; None without sinks).
    """

    states: torch.Tensor
    keys: torch.Tensor
    open_k: torch.Tensor
    open_v: torch.Tensor
    open_query: torch.Tensor | None
    open_mixture: torch.Tensor | None
    done: int = 0
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None


@dataclass
class GQASegment:
    out: torch.Tensor  # [B, H, T, d] outputs of the new tokens
    states: torch.Tensor  # [B, Hk, n, m] raw states of the chunks the segment completed
    keys: torch.Tensor  # [B, Hk, n, d] their meta keys
    open_k: torch.Tensor  # [B, Hk, f', d] the open chunk after the segment
    open_v: torch.Tensor
    open_query: torch.Tensor | None  # [B, H, d]
    open_mixture: torch.Tensor | None  # [B, H, d, d]
    sink_k: torch.Tensor | None = None  # [B, Hk, s, d] the stream's first s tokens, once chunk 0 is complete
    sink_v: torch.Tensor | None = None


def _local(qc, kc, vc, scaling: float, dropout: float, G: int, first_chunk: int, sink_k=None, sink_v=None):
    """Causal softmax inside each chunk: q [B, H, C, ch, d], k, v [B, Hk, C, ch, d] -> [B, H, C, ch, d].  With
    sinks [B, Hk, s, d], chunks whose stream index (``first_chunk`` + i) is >= 1 also see the s sink tokens."""
    B, H, C, ch, d = qc.shape
    kx, vx = _expand(kc, G), _expand(vc, G)
    s = 0 if sink_k is None else sink_k.shape[2]
    if s == 0:  # one fused 4-D SDPA call over B * H * C blocks
        return F.scaled_dot_product_attention(qc.reshape(1, B * H * C, ch, d), kx.reshape(1, B * H * C, ch, d),
                                              vx.reshape(1, B * H * C, ch, d), is_causal=True, scale=scaling,
                                              dropout_p=dropout).view(B, H, C, ch, d)
    sk = _expand(sink_k, G)[:, :, None].expand(B, H, C, s, d)
    sv = _expand(sink_v, G)[:, :, None].expand(B, H, C, s, d)
    keys, values = torch.cat([sk, kx], dim=3), torch.cat([sv, vx], dim=3)  # [B, H, C, s + ch, d]
    causal = torch.ones(ch, ch, dtype=torch.bool, device=qc.device).tril()
    sees = (first_chunk + torch.arange(C, device=qc.device) >= 1)[:, None, None].expand(C, ch, s)
    mask = torch.cat([sees, causal.expand(C, ch, ch)], dim=-1)  # [C, ch, s + ch]
    out = F.scaled_dot_product_attention(qc.reshape(B * H, C, ch, d), keys.reshape(B * H, C, s + ch, d),
                                         values.reshape(B * H, C, s + ch, d), attn_mask=mask, scale=scaling,
                                         dropout_p=dropout)
    return out.view(B, H, C, ch, d)


def gqa_bsbr_segment(q, k, v, meta_query, meta_key, chunk: int, *, scaling: float, gate=None,
                     state_norm: str = "mean", window: int | None = None, compress=None, restore=None,
                     past: GQAPast | None = None, dropout: float = 0.0, retrieve: bool = True,
                     sink: int = 0) -> GQASegment:
    """Chunked BSBR over the new tokens q [B, H, T, d], k, v [B, Hk, T, d] of a stream (``past`` None: the
    stream starts here).

    ``meta_query(q_first)`` maps queries [B, H, n, d] at chunk starts to meta queries; ``meta_key(k_chunks)``
    maps the keys of complete chunks [B, Hk, n, chunk, d] to meta keys [B, Hk, n, d].  The segment's first
    ``f = past.open_k.shape[2]`` positions belong to the open chunk of the past; its meta query and retrieved
    mixture are taken from ``past``, not recomputed.  ``retrieve=False`` is local attention only (no states are
    kept).  ``sink``: chunks after the stream's first also attend to its first ``sink`` tokens (``sink`` <=
    chunk).  Returns the outputs and the stream's new tail.
    """
    B, H, T, d = q.shape
    Hk = k.shape[1]
    G = H // Hk
    f = 0 if past is None else past.open_k.shape[2]
    if past is not None and f:
        k = torch.cat([past.open_k, k], dim=2)
        v = torch.cat([past.open_v, v], dim=2)
        q = torch.cat([q.new_zeros(B, H, f, d), q], dim=2)  # queries of the open chunk were answered already
    L = f + T
    C = math.ceil(L / chunk)
    pad = C * chunk - L
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
    qc = qp.view(B, H, C, chunk, d)
    kc, vc = kp.view(B, Hk, C, chunk, d), vp.view(B, Hk, C, chunk, d)
    # 1. local causal softmax inside each chunk (and over the sink tokens, for chunks after the stream's first)
    first_chunk = 0 if past is None else past.done
    sink_k, sink_v = (None, None) if past is None else (past.sink_k, past.sink_v)
    if sink and sink_k is None and first_chunk == 0 and chunk <= L:  # chunk 0 completes here: its first tokens
        sink_k, sink_v = kc[:, :, 0, :sink], vc[:, :, 0, :sink]
    local = _local(qc, kc, vc, scaling, dropout, G, first_chunk, sink_k, sink_v)
    done = L // chunk
    tail = L - done * chunk
    if not retrieve:
        empty = kc.new_zeros(B, Hk, 0, d)
        return GQASegment(out=local.view(B, H, C * chunk, d)[:, :, f:L], states=empty, keys=empty,
                          open_k=k[:, :, done * chunk : L], open_v=v[:, :, done * chunk : L], open_query=None,
                          open_mixture=None, sink_k=sink_k, sink_v=sink_v)
    # 2. states and meta keys of the complete chunks (a chunk of the segment is complete if it holds `chunk` tokens)
    z = compress_states((kc[:, :, :done].transpose(-1, -2) @ vc[:, :, :done]).flatten(-2), compress)  # [B,Hk,done,m]
    hk = meta_key(kc[:, :, :done]) if done else kc.new_zeros(B, Hk, 0, d)
    # 3. meta queries of the chunks (the open chunk's from the past)
    r = meta_query(qc[:, :, :, 0])  # [B, H, C, d]
    if f:
        r = torch.cat([past.open_query[:, :, None], r[:, :, 1:]], dim=2)
    C0 = 0 if past is None else past.states.shape[2]
    all_z = z if past is None else torch.cat([past.states, z], dim=2)
    all_h = hk if past is None else torch.cat([past.keys, hk], dim=2)
    # 4. block retrieval for every chunk whose mixture is not known yet: chunk i sees columns < C0 + i (window: the
    # W latest of them); the open chunk of the past keeps the mixture it retrieved when it opened
    first = 1 if f else 0
    mixtures = []
    if f:
        mixtures.append(past.open_mixture[:, :, None])
    if first < C:
        if all_z.shape[2]:
            logits = _retrieval_logits(r[:, :, first:], all_h, G)  # [B, H, C - first, C0 + done]
            rows = C0 + torch.arange(first, C, device=q.device)[:, None]
            cols = torch.arange(all_z.shape[2], device=q.device)[None, :]
            allowed = cols < rows
            if window is not None:
                allowed = allowed & (cols >= rows - window)
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
            alpha = torch.softmax(logits, dim=-1) * allowed.any(-1, keepdim=True)
            mixtures.append(restore_states(_mix(alpha, all_z, G), restore, d))
        else:
            mixtures.append(q.new_zeros(B, H, C - first, d, d))
    S = torch.cat(mixtures, dim=2) if len(mixtures) > 1 else mixtures[0]  # [B, H, C, d, d] raw mixtures
    # 5. readout: o += gate * norm * scaling * q S
    scale = scaling * state_scale(chunk, state_norm)
    ret = qc @ S
    ret = ret * (scale if gate is None else scale * gate.view(1, H, 1, 1, 1))
    out = (local + ret).view(B, H, C * chunk, d)[:, :, f:L]
    open_mixture = S[:, :, done] if tail else None
    open_query = r[:, :, done] if tail else None
    return GQASegment(out=out, states=z, keys=hk, open_k=k[:, :, done * chunk : L], open_v=v[:, :, done * chunk : L],
                      open_query=open_query, open_mixture=open_mixture, sink_k=sink_k, sink_v=sink_v)


def gqa_bsbr_step(q, k, v, past: GQAPast, chunk: int, *, scaling: float, gate=None, state_norm: str = "mean",
                  restore=None, meta_query=None, window: int | None = None, retrieve: bool = True):
    """Decode n new tokens that stay inside one chunk: q [B, H, n, d], k, v [B, Hk, n, d] with f + n <= chunk.

    If f = 0 the chunk opens here: its meta query comes from ``meta_query(q[:, :, :1])`` and its mixture is
    retrieved from ``past.states`` (the W latest with a window).  Otherwise the open chunk's mixture is reused, so
    a token costs O(chunk * d + d^2) per head whatever the length of the stream.  Returns (out [B, H, n, d],
    updated open_k, open_v, open_query, open_mixture).
    """
    B, H, n, d = q.shape
    G = H // k.shape[1]
    f = past.open_k.shape[2]
    open_query, mixture = past.open_query, past.open_mixture
    if f == 0 and retrieve:
        open_query = meta_query(q[:, :, :1])[:, :, 0]
        C0 = past.states.shape[2]
        lo = 0 if window is None else max(0, C0 - window)
        if lo < C0:
            alpha = torch.softmax(_retrieval_logits(open_query[:, :, None], past.keys[:, :, lo:], G), dim=-1)
            mixture = restore_states(_mix(alpha, past.states[:, :, lo:], G), restore, d)[:, :, 0]
        else:
            mixture = q.new_zeros(B, H, d, d)
    keys = torch.cat([past.open_k, k], dim=2)
    values = torch.cat([past.open_v, v], dim=2)
    allowed = torch.arange(f + n, device=q.device)[None, :] <= f + torch.arange(n, device=q.device)[:, None]
    lk, lv = keys, values
    if past.sink_k is not None and past.done >= 1:  # the sink tokens, always visible after the first chunk
        lk, lv = torch.cat([past.sink_k, keys], dim=2), torch.cat([past.sink_v, values], dim=2)
        allowed = torch.cat([allowed.new_ones(n, past.sink_k.shape[2]), allowed], dim=1)
    local = F.scaled_dot_product_attention(q, _expand(lk, G), _expand(lv, G), attn_mask=allowed, scale=scaling)
    if not retrieve:
        return local, keys, values, None, None
    scale = scaling * state_scale(chunk, state_norm)
    ret = q @ mixture
    ret = ret * (scale if gate is None else scale * gate.view(1, H, 1, 1))
    return local + ret, keys, values, open_query, mixture
