"""BSBR — Block Sparse attention with Block Retrieval — as pure tensor functions (per head; see DESIGN.md §2).

Shapes: q, k, v [B, H, T, d]; chunk size ``chunk``; C = ceil(T / chunk) chunks.

    o_loc[t] = causal softmax attention of q_t over the keys of its own chunk
    F_j      = norm_j * sum_{s in chunk j} k_s v_s^T            (norm_j = 1/chunk for "mean", 1 for "none")
    alpha    = softmax_{j < i}(r_i . h_j / sqrt(d))              (chunk 0 retrieves nothing)
    S_i      = sum_{j < i} alpha[i, j] F_j
    o[t]     = o_loc[t] + (q_t / sqrt(d))^T S_{c(t)}

With compression, F_j is stored as z_j = P vec(F_j) (m = d*d/f numbers), the mixture is taken over the z_j
and S_i = unvec(P' sum_j alpha[i, j] z_j).  ``compress`` is P ([m, d*d]) and ``restore`` is P' ([d*d, m]).

Three forms compute the same thing:

* :func:`bsbr_reference` walks the tokens one at a time and re-derives everything from its definition;
* :func:`bsbr_parallel` is the chunked form (batched matmuls, fused SDPA inside chunks); it can continue
  from the states of earlier chunks, which is how streaming prefill and pieces are processed;
* :func:`retrieve` and the layer's step function form the recurrent path (one token at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STATE_NORMS = ("mean", "none")


def state_scale(chunk: int, state_norm: str) -> float:
    """The factor applied to each chunk's K^T V: 1/chunk for "mean", 1 for "none"."""
    if state_norm == "mean":
        return 1.0 / chunk
    if state_norm == "none":
        return 1.0
    raise ValueError(f"state_norm must be one of {STATE_NORMS}, got {state_norm!r}")


def compress_states(states: torch.Tensor, compress: torch.Tensor | None) -> torch.Tensor:
    """[..., d*d] -> [..., m] (identity without compression)."""
    return states if compress is None else states @ compress.transpose(0, 1)


def restore_states(mixed: torch.Tensor, restore: torch.Tensor | None, d: int) -> torch.Tensor:
    """[..., m] -> [..., d, d] (just a reshape without compression)."""
    if restore is not None:
        mixed = mixed @ restore.transpose(0, 1)
    return mixed.unflatten(-1, (d, d))


# ----------------------------------------------------------------------------------------- reference
def bsbr_reference(q, k, v, r, h, chunk: int, *, state_norm: str = "mean", compress=None, restore=None,
                   meta_query: str = "first", return_weights: bool = False):
    """The definition, evaluated token by token (slow; tests and attention maps only).

    r, h: [B, H, T, d] meta-query / meta-key projections at *every* position; this function picks the
    positions the definition prescribes (r at the first token of a chunk, or at the last token of the
    previous chunk when ``meta_query="prev_last"``; h at the last token of each chunk).
    Returns o [B, H, T, d]; with ``return_weights`` also (local, retrieval) weights, each [B, H, T, T],
    such that o = (local + retrieval) @ v (without compression).
    """
    B, H, T, d = q.shape
    scale = d ** -0.5
    norm = state_scale(chunk, state_norm)
    C = math.ceil(T / chunk)
    # states and meta keys of every complete chunk, straight from the definition
    states = []
    keys = []
    for j in range(C):
        lo, hi = j * chunk, (j + 1) * chunk
        if hi > T:
            break
        Fj = norm * torch.einsum("bhsd,bhse->bhde", k[:, :, lo:hi], v[:, :, lo:hi])  # [B, H, d, d]
        states.append(compress_states(Fj.flatten(-2), compress))
        keys.append(h[:, :, hi - 1])
    out = torch.zeros_like(q)
    w_loc = q.new_zeros(B, H, T, T) if return_weights else None
    w_ret = q.new_zeros(B, H, T, T) if return_weights else None
    for t in range(T):
        c = t // chunk
        lo = c * chunk
        qt = q[:, :, t]  # [B, H, d]
        p = torch.softmax(torch.einsum("bhd,bhsd->bhs", qt, k[:, :, lo : t + 1]) * scale, dim=-1)
        o = torch.einsum("bhs,bhsd->bhd", p, v[:, :, lo : t + 1])
        if return_weights:
            w_loc[:, :, t, lo : t + 1] = p
        if c > 0:
            rq = r[:, :, lo] if meta_query == "first" else r[:, :, lo - 1]
            logits = torch.stack([(rq * keys[j]).sum(-1) for j in range(c)], dim=-1) * scale  # [B, H, c]
            alpha = torch.softmax(logits, dim=-1)
            mixed = sum(alpha[..., j, None] * states[j] for j in range(c))
            S = restore_states(mixed, restore, d)  # [B, H, d, d]
            o = o + torch.einsum("bhd,bhde->bhe", qt * scale, S)
            if return_weights:
                qk = torch.einsum("bhd,bhsd->bhs", qt, k[:, :, :lo]) * scale
                a_tok = alpha.repeat_interleave(chunk, dim=-1)  # [B, H, lo]
                w_ret[:, :, t, :lo] = a_tok * norm * qk
        out[:, :, t] = o
    if return_weights:
        return out, w_loc, w_ret
    return out


# ------------------------------------------------------------------------------------------ parallel
@dataclass
class BSBRSegment:
    """What :func:`bsbr_parallel` returns besides the outputs, for building a streaming cache."""

    out: torch.Tensor  # [B, H, T, d]
    states: torch.Tensor  # [B, H, C, m] stored (compressed) states of every chunk of the segment
    last_retrieved: torch.Tensor  # [B, H, d, d]: S of the segment's last chunk


def _mixing_groups(rows: int, past: int) -> list[tuple[int, int]]:
    """Row groups for the strictly lower-triangular mixture: skip the zero upper blocks when it pays."""
    if rows < 64 or rows <= past:
        return [(0, rows)]
    groups = 4
    bounds = [round(rows * g / groups) for g in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def retrieve(r, keys, states, allowed, restore, d: int):
    """Block retrieval: S = unvec(restore(softmax(r . keys / sqrt(d)) masked by ``allowed`` @ states)).

    r: [B, H, n, d]; keys: [B, H, C, d]; states: [B, H, C, m]; allowed: bool, broadcastable to [B, H, n, C].
    Rows with nothing allowed retrieve zero.  Returns [B, H, n, d, d].
    """
    logits = (r @ keys.transpose(-1, -2)) * d ** -0.5
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)  # finite: no NaN in empty rows
    alpha = torch.softmax(logits, dim=-1) * allowed.any(dim=-1, keepdim=True)
    return restore_states(alpha @ states, restore, d)


def bsbr_parallel(q, k, v, r, h, chunk: int, *, state_norm: str = "mean", compress=None, restore=None,
                  past_states=None, past_keys=None) -> BSBRSegment:
    """Chunked BSBR over a segment that starts at a chunk boundary.

    q, k, v: [B, H, T, d]; r, h: [B, H, C, d] — the meta query and meta key of each chunk of the segment
    (the key of a chunk that is not complete is never used).  ``past_states`` [B, H, C0, m] and
    ``past_keys`` [B, H, C0, d] are earlier chunks' stored states and meta keys (streaming); chunk i of
    the segment retrieves from the C0 past chunks and segment chunks < i.
    """
    B, H, T, d = q.shape
    C = math.ceil(T / chunk)
    scale = d ** -0.5
    pad = C * chunk - T
    if pad:  # right padding cannot reach real tokens: attention inside a chunk is causal
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    # 1. local causal softmax inside each chunk, one fused 4-D SDPA call over B x (H*C) blocks
    qc = q.reshape(B, H * C, chunk, d)
    kc = k.reshape(B, H * C, chunk, d)
    vc = v.reshape(B, H * C, chunk, d)
    local = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)  # [B, H*C, chunk, d]
    # 2. chunk states F_j = norm * K_j^T V_j, stored (compressed) as [B, H, C, m]
    kv = (kc.transpose(-1, -2) @ vc).view(B, H, C, d * d) * state_scale(chunk, state_norm)
    states = compress_states(kv, compress)
    if past_states is not None and past_states.shape[2]:
        all_states = torch.cat([past_states, states], dim=2)
        all_keys = torch.cat([past_keys, h], dim=2)
    else:
        all_states, all_keys = states, h
    C0 = all_states.shape[2] - C
    # 3. block retrieval: chunk i mixes the states of chunks j < C0 + i (row groups skip zero blocks)
    pieces = []
    cols = torch.arange(C0 + C, device=q.device)
    for lo, hi in _mixing_groups(C, C0):
        width = C0 + hi - 1 if hi > lo else 0
        if width <= 0:
            pieces.append(q.new_zeros(B, H, hi - lo, d, d))
            continue
        rows = torch.arange(lo, hi, device=q.device)
        allowed = cols[None, :width] < (C0 + rows)[:, None]
        pieces.append(retrieve(r[:, :, lo:hi], all_keys[:, :, :width], all_states[:, :, :width], allowed,
                               restore, d))
    S = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]  # [B, H, C, d, d]
    # 4. readout, added to the local part: o += (q / sqrt(d)) S_{c(t)}
    out = torch.baddbmm(local.reshape(B * H * C, chunk, d), qc.reshape(B * H * C, chunk, d),
                        S.reshape(B * H * C, d, d), alpha=scale)
    out = out.view(B, H, C * chunk, d)[:, :, :T]
    return BSBRSegment(out=out, states=states, last_retrieved=S[:, :, -1])
