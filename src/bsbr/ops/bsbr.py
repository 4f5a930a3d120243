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
                   meta_query: str = "first", window: int | None = None, return_weights: bool = False):
    """The definition, evaluated token by token (slow; tests and attention maps only).

    r, h: [B, H, T, d] meta-query / meta-key projections at *every* position; this function picks the
    positions the definition prescribes (r at the first token of a chunk, or at the last token of the
    previous chunk when ``meta_query="prev_last"``; h at the last token of each chunk).
    ``window``: chunk i retrieves from chunks max(0, i - window) .. i - 1 only (None: all earlier chunks).
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
            j0 = 0 if window is None else max(0, c - window)  # the chunks this one may retrieve: j0 .. c - 1
            rq = r[:, :, lo] if meta_query == "first" else r[:, :, lo - 1]
            logits = torch.stack([(rq * keys[j]).sum(-1) for j in range(j0, c)], dim=-1) * scale  # [B, H, c - j0]
            alpha = torch.softmax(logits, dim=-1)
            mixed = sum(alpha[..., j - j0, None] * states[j] for j in range(j0, c))
            S = restore_states(mixed, restore, d)  # [B, H, d, d]
            o = o + torch.einsum("bhd,bhde->bhe", qt * scale, S)
            if return_weights:
                a = j0 * chunk
                qk = torch.einsum("bhd,bhsd->bhs", qt, k[:, :, a:lo]) * scale
                a_tok = alpha.repeat_interleave(chunk, dim=-1)  # [B, H, lo - a]
                w_ret[:, :, t, a:lo] = a_tok * norm * qk
        out[:, :, t] = o
    if return_weights:
        return out, w_loc, w_ret
    return out


# ------------------------------------------------------------------------------------------ parallel
@dataclass
class BSBRSegment:
    """What :func:`bsbr_parallel` returns besides the outputs, for building a streaming cache."""

    out: torch.Tensor  # [B, H, T, d]
    states: torch.Tensor | None  # [B, H, C, m] raw-sum states of the segment's chunks (if need_states)
    last_retrieved: torch.Tensor  # [B, H, d, d]: the raw-sum mixture S_raw of the segment's last chunk


# Rows (batch x head) are processed in groups whose tensors stay under this size: large temporaries are
# returned to the OS by the allocator and page-faulted in again on every call, which costs more than the
# arithmetic on 2 CPU cores; small ones are reused.
_GROUP_BYTES = 16 * 2**20


def _mixing_groups(rows: int, past: int) -> list[tuple[int, int]]:
    """Row groups for the strictly lower-triangular mixture: skip the zero upper blocks when it pays."""
    if rows < 64 or rows <= past:
        return [(0, rows)]
    groups = 4
    bounds = [round(rows * g / groups) for g in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def retrieve(r, keys, states, allowed, restore, d: int):
    """Block retrieval: S = unvec(restore(softmax(r . keys / sqrt(d)) masked by ``allowed`` @ states)).

    r: [..., n, d]; keys: [..., C, d]; states: [..., C, m]; allowed: bool, broadcastable to [..., n, C].
    Rows with nothing allowed retrieve zero.  Returns [..., n, d, d].
    """
    logits = (r @ keys.transpose(-1, -2)) * d ** -0.5
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)  # finite: no NaN in empty rows
    alpha = torch.softmax(logits, dim=-1) * allowed.any(dim=-1, keepdim=True)
    return restore_states(alpha @ states, restore, d)


def bsbr_parallel(q, k, v, r, h, chunk: int, *, state_norm: str = "mean", compress=None, restore=None,
                  past_states=None, past_keys=None, need_states: bool = False, window: int | None = None
                  ) -> BSBRSegment:
    """Chunked BSBR over a segment that starts at a chunk boundary.

    q, k, v: [B, H, T, d]; r, h: [B, H, C, d] — the meta query and meta key of each chunk of the segment
    (the key of a chunk that is not complete is never used).  ``past_states`` [B, H, C0, m] and
    ``past_keys`` [B, H, C0, d] are earlier chunks' stored states and meta keys (streaming); chunk i of
    the segment retrieves from the C0 past chunks and segment chunks < i (with ``window``: only the ``window``
    latest of those).  ``need_states`` also returns the segment's chunk states (for a streaming cache).

    States are kept as raw sums K_j^T V_j (compressed if asked); the normalisation 1/N_j (N_j = chunk for
    every chunk that can be retrieved) commutes with the mixture and the linear maps, so it is applied once,
    at readout.
    """
    B, H, T, d = q.shape
    C = math.ceil(T / chunk)
    pad = C * chunk - T
    if pad:  # right padding cannot reach real tokens: attention inside a chunk is causal
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = B * H
    rows = [t.reshape(n, *t.shape[2:]) for t in (q, k, v, r, h)]
    past = None
    if past_states is not None and past_states.shape[2]:
        past = (past_states.reshape(n, *past_states.shape[2:]), past_keys.reshape(n, *past_keys.shape[2:]))
    norm = state_scale(chunk, state_norm)
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*rows, compress, restore, *(past or ())))
    # with autograd (no in-place updates) rows go in groups whose pieces are concatenated; for inference one
    # SDPA call covers every row and its output is updated in place
    group = max(1, _GROUP_BYTES // (C * chunk * d * q.element_size())) if differentiable else n
    outs, states, lasts = [], [], []
    for lo in range(0, n, group):
        sl = slice(lo, lo + group)
        o, z, last = _bsbr_rows(*(t[sl] for t in rows), chunk, norm, compress, restore,
                                None if past is None else (past[0][sl], past[1][sl]), not differentiable, need_states,
                                window)
        outs.append(o)
        states.append(z)
        lasts.append(last)
    cat = lambda ts: torch.cat(ts) if len(ts) > 1 else ts[0]  # noqa: E731
    out = cat(outs).view(B, H, C * chunk, d)[:, :, :T]
    return BSBRSegment(out=out, states=cat(states).view(B, H, C, -1) if need_states else None,
                       last_retrieved=cat(lasts).view(B, H, d, d))


def _bsbr_rows(q, k, v, r, h, chunk, norm, compress, restore, past, inplace, need_states, window=None):
    """BSBR for n independent rows (batch x head): q, k, v [n, C*chunk, d]; r, h [n, C, d]; ``past`` =
    (states [n, C0, m], keys [n, C0, d]) or None; ``window`` as in :func:`bsbr_parallel`.  Returns (out
    [n, C*chunk, d], raw states [n, C, m], the last chunk's raw mixture [n, d, d]).  ``inplace`` adds the readout
    into SDPA's output (no autograd); states are returned only if ``need_states``."""
    n, Tp, d = q.shape
    C = Tp // chunk
    qc, kc, vc = (t.reshape(n, C, chunk, d) for t in (q, k, v))
    # 1. local causal softmax inside each chunk: one fused 4-D SDPA call over n*C blocks
    local = F.scaled_dot_product_attention(*(t.reshape(1, n * C, chunk, d) for t in (qc, kc, vc)), is_causal=True)
    local = local.view(n, C, chunk, d)
    C0 = 0 if past is None else past[0].shape[1]
    # Long segments go one (batch, head) row at a time, in row groups that skip the zero upper blocks of the
    # strictly lower-triangular mixture; every slice stays contiguous and every temporary small.
    groups = _mixing_groups(C, C0)
    row_sets = [slice(0, n)] if len(groups) == 1 else [slice(i, i + 1) for i in range(n)]
    cols = torch.arange(C0 + C, device=q.device)
    pieces, states, lasts = [], [], []
    for rows in row_sets:
        # 2. chunk states K_j^T V_j (raw sums), stored compressed if asked: [rows, C, m]
        z = compress_states((kc[rows].transpose(-1, -2) @ vc[rows]).flatten(-2), compress)
        if need_states:
            states.append(z)
        all_states, all_keys = z, h[rows]
        if past is not None:
            all_states = torch.cat([past[0][rows], z], dim=1)
            all_keys = torch.cat([past[1][rows], h[rows]], dim=1)
        for lo, hi in groups:
            # 3. block retrieval: chunk i mixes the states of chunks j < C0 + i (and j >= C0 + i - window)
            width = C0 + hi - 1
            start = 0 if window is None else max(0, C0 + lo - window)  # columns no chunk of the group may see
            own = (C0 + torch.arange(lo, hi, device=q.device))[:, None]
            allowed = cols[None, start:width] < own
            if window is not None:
                allowed = allowed & (cols[None, start:width] >= own - window)
            S = retrieve(r[rows, lo:hi], all_keys[:, start:width], all_states[:, start:width], allowed, restore, d)
            if hi == C:
                lasts.append(S[:, -1])
            # 4. readout added to the local part: o += (q / sqrt(d)) * norm * S_{c(t)}
            m = S.shape[0] * (hi - lo)
            qs, Ss = qc[rows, lo:hi].reshape(m, chunk, d), S.reshape(m, d, d)
            if inplace:
                local[rows, lo:hi].view(m, chunk, d).baddbmm_(qs, Ss, alpha=norm * d**-0.5)
            else:
                base = local[rows, lo:hi].reshape(m, chunk, d)
                pieces.append(torch.baddbmm(base, qs, Ss, alpha=norm * d**-0.5).view(-1, hi - lo, chunk, d))
    if inplace:
        out = local
    else:
        if len(groups) > 1:  # reassemble [rows][groups] pieces into [n, C, chunk, d]
            pieces = [torch.cat(pieces[i : i + len(groups)], dim=1) for i in range(0, len(pieces), len(groups))]
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    cat = lambda ts: torch.cat(ts) if len(ts) > 1 else ts[0]  # noqa: E731
    return out.reshape(n, Tp, d), cat(states) if need_states else None, cat(lasts)
