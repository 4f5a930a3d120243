"""The pieces of BSBR's chunked form (:func:`bsbr.ops.bsbr.bsbr_parallel`): local attention inside chunks, the
block-retrieval mixture, the row kernel that ties them together, and the guard that keeps non-finite inputs where they
are.

Rows: the kernel works on n = B * Hk rows, one per (batch, key/value head), each with the G query heads of its group:
q [n, G, C, chunk, d]; k, v [n, C, chunk, d]; meta queries [n, G, C, d]; meta keys and states [n, C, .].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compress_states(states: torch.Tensor, compress: torch.Tensor | None) -> torch.Tensor:
    """[..., d*d] -> [..., m] (identity without compression)."""
    return states if compress is None else states @ compress.transpose(0, 1)


def restore_states(mixed: torch.Tensor, restore: torch.Tensor | None, d: int) -> torch.Tensor:
    """[..., m] -> [..., d, d] (just a reshape without compression)."""
    if restore is not None:
        mixed = mixed @ restore.transpose(0, 1)
    return mixed.unflatten(-1, (d, d))


def mixing_groups(rows: int, past: int) -> list[tuple[int, int]]:
    """Chunk groups for the strictly lower-triangular mixture: skip the zero upper blocks when it pays."""
    if rows < 64 or rows <= past:
        return [(0, rows)]
    groups = 4
    bounds = [round(rows * g / groups) for g in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def mix(r, keys, states, allowed, restore, gate):
    """Block retrieval: S = unvec(restore(gate * softmax(r . keys / sqrt(d)) masked by ``allowed`` @ states)).

    r [n, G, c, d]: meta queries of c chunks per query head; keys [n, w, d] and states [n, w, m]: w candidate chunks
    per row; allowed: bool, broadcastable to [n, G, c, w]; gate [n, G] or None.  Rows with nothing allowed retrieve
    zero.  Returns [n, G, c, d, d].
    """
    n, G, c, d = r.shape
    logits = (r.reshape(n, G * c, d) @ keys.transpose(-1, -2)).view(n, G, c, -1) * d**-0.5
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)  # finite: no NaN in empty rows
    alpha = torch.softmax(logits, dim=-1) * allowed.any(dim=-1, keepdim=True)
    if gate is not None:
        alpha = alpha * gate[:, :, None, None]
    return restore_states(alpha.view(n, G * c, -1) @ states, restore, d).view(n, G, c, d, d)


def local_attention(qc, kc, vc, scaling, dropout: float, first_chunk: int, sinks):
    """Causal softmax inside each chunk: qc [n, G, C, ch, d], kc, vc [n, C, ch, d] -> [n, G, C, ch, d].

    With ``sinks`` = (sink_k, sink_v) [n, s, d], chunks whose stream number ``first_chunk`` + i is >= 1 also see the s
    sink tokens.  ``scaling`` None is SDPA's default 1/sqrt(d)."""
    n, G, C, ch, d = qc.shape
    kx, vx = (t[:, None].expand(n, G, C, ch, d) for t in (kc, vc))  # a view for G = 1, a copy otherwise
    if sinks is None:  # one fused 4-D SDPA call over n * G * C blocks
        return F.scaled_dot_product_attention(qc.reshape(1, n * G * C, ch, d), kx.reshape(1, n * G * C, ch, d),
                                              vx.reshape(1, n * G * C, ch, d), is_causal=True, scale=scaling,
                                              dropout_p=dropout).view(n, G, C, ch, d)
    s = sinks[0].shape[1]
    sk, sv = (t[:, None, None].expand(n, G, C, s, d) for t in sinks)
    keys, values = torch.cat([sk, kx], dim=3), torch.cat([sv, vx], dim=3)  # [n, G, C, s + ch, d]
    causal = torch.ones(ch, ch, dtype=torch.bool, device=qc.device).tril()
    sees = (first_chunk + torch.arange(C, device=qc.device) >= 1)[:, None, None].expand(C, ch, s)
    mask = torch.cat([sees, causal.expand(C, ch, ch)], dim=-1)  # [C, ch, s + ch]
    out = F.scaled_dot_product_attention(qc.reshape(n * G, C, ch, d), keys.reshape(n * G, C, s + ch, d),
                                         values.reshape(n * G, C, s + ch, d), attn_mask=mask, scale=scaling,
                                         dropout_p=dropout)
    return out.view(n, G, C, ch, d)


def chunked_rows(qc, kc, vc, r, keys, past, sinks, gate, *, chunk: int, scaling, readout: float, window, compress,
                 restore, dropout: float, first_chunk: int, inplace: bool, retrieve: bool, need_states: bool):
    """BSBR for n independent rows: qc [n, G, C, chunk, d]; kc, vc [n, C, chunk, d]; r [n, G, C, d] meta queries;
    keys [n, done, d] meta keys of the complete chunks; ``past`` = (states [n, C0, m], keys [n, C0, d]) or None;
    ``sinks`` as in :func:`local_attention`; gate [n, G] or None; ``readout`` = scaling * norm.

    Returns (out [n, G, C * chunk, d], raw states [n, C, m] of every chunk if ``need_states`` (the last, if
    incomplete, is never retrieved), the last chunk's mixture [n, G, d, d]); both None without ``retrieve``.
    ``inplace`` adds the readout into SDPA's output (no autograd)."""
    n, G, C, ch, d = qc.shape
    local = local_attention(qc, kc, vc, scaling, dropout, first_chunk, sinks)
    if not retrieve:
        return local.view(n, G, C * ch, d), None, None
    C0 = 0 if past is None else past[0].shape[1]
    # Long segments go one row at a time, in chunk groups that skip the zero upper blocks of the strictly
    # lower-triangular mixture; every slice stays contiguous and every temporary small.
    groups = mixing_groups(C, C0)
    row_sets = [slice(0, n)] if len(groups) == 1 else [slice(i, i + 1) for i in range(n)]
    cols = torch.arange(C0 + C, device=qc.device)
    pieces, states, lasts = [], [], []
    for rows in row_sets:
        # 1. chunk states K_j^T V_j (raw sums), stored compressed if asked: [rows, C, m]
        z = compress_states((kc[rows].transpose(-1, -2) @ vc[rows]).flatten(-2), compress)
        if need_states:  # else each row's states are freed before the next row's are made
            states.append(z)
        all_z, all_h = z, keys[rows]
        if past is not None:
            all_z, all_h = torch.cat([past[0][rows], z], dim=1), torch.cat([past[1][rows], keys[rows]], dim=1)
        for lo, hi in groups:
            # 2. block retrieval: chunk i mixes the states of chunks j < C0 + i (and j >= C0 + i - window)
            width = C0 + hi - 1
            start = 0 if window is None else max(0, C0 + lo - window)  # columns no chunk of the group may see
            own = (C0 + torch.arange(lo, hi, device=qc.device))[:, None]
            allowed = cols[None, start:width] < own
            if window is not None:
                allowed = allowed & (cols[None, start:width] >= own - window)
            S = mix(r[rows, :, lo:hi], all_h[:, start:width], all_z[:, start:width], allowed, restore,
                    None if gate is None else gate[rows])  # [rows, G, hi - lo, d, d]
            if hi == C:
                lasts.append(S[:, :, -1])
            # 3. readout added to the local part: o += scaling * norm * q S_{c(t)}
            if inplace:
                _readout_into(local, qc, S, rows, lo, hi, readout)
            else:
                base = local[rows, :, lo:hi].reshape(-1, ch, d)
                piece = torch.baddbmm(base, qc[rows, :, lo:hi].reshape(-1, ch, d), S.reshape(-1, d, d), alpha=readout)
                pieces.append(piece.view(-1, G, hi - lo, ch, d))
    if inplace:
        out = local
    else:
        if len(groups) > 1:  # reassemble [rows][groups] pieces into [n, G, C, chunk, d]
            pieces = [torch.cat(pieces[i : i + len(groups)], dim=2) for i in range(0, len(pieces), len(groups))]
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    cat = lambda ts: torch.cat(ts) if len(ts) > 1 else ts[0]  # noqa: E731
    return out.reshape(n, G, C * ch, d), cat(states) if need_states else None, cat(lasts)


def _readout_into(local, qc, S, rows: slice, lo: int, hi: int, readout: float) -> None:
    """local[rows, :, lo:hi] += readout * qc[rows, :, lo:hi] @ S, in place, through contiguous 3-D views."""
    ch, d = qc.shape[-2:]
    target = local[rows, :, lo:hi]
    if target.is_contiguous():
        target.view(-1, ch, d).baddbmm_(qc[rows, :, lo:hi].reshape(-1, ch, d), S.reshape(-1, d, d), alpha=readout)
        return
    for g in range(qc.shape[1]):  # one row of a group of G > 1 query heads over part of its chunks
        local[rows, g, lo:hi].view(-1, ch, d).baddbmm_(qc[rows, g, lo:hi].reshape(-1, ch, d),
                                                        S[:, g].reshape(-1, d, d), alpha=readout)


# -------------------------------------------------------------------------------------- non-finite inputs
def _finite(t: torch.Tensor | None) -> bool:
    """True when every entry of t is finite, by one sum (NaN and inf survive it; an overflowing sum of finite values
    only sends the caller to the guarded path, which gives the same outputs for finite inputs)."""
    if t is None or t.numel() == 0:
        return True
    t = t.detach()
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return bool(torch.isfinite(total))


def _bad_tokens(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, Hk, L] True where the key or value of a token has a non-finite entry."""
    return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


class NonFiniteGuard:
    """The chunked form with non-finite inputs.  Its dense blocks multiply masked (zero) weights by every value of a
    block, and 0 x NaN is NaN, so a NaN at position p would reach earlier positions.  Instead the segment runs on
    inputs whose non-finite tokens (and stored states) are zeroed, which gives every position that does not see one
    of them exactly its clean output, and :meth:`poison` then sets to NaN every output that does see one: the
    positions after it in its chunk, the chunks after a non-finite sink token, and the chunks that may retrieve a
    non-finite chunk.  States of non-finite chunks and mixtures that retrieve one are returned as NaN, so the stream
    goes on as the reference does."""

    def __init__(self, k, v, sinks, states, *, chunk: int, groups: int, first_chunk: int, window, retrieve: bool):
        self.chunk, self.groups, self.first_chunk = chunk, groups, first_chunk
        self.window, self.retrieve = window, retrieve
        self.bad = _bad_tokens(k, v)  # [B, Hk, L]
        k, v = k.masked_fill(self.bad[..., None], 0), v.masked_fill(self.bad[..., None], 0)
        self.bad_sink = None
        if sinks is not None:
            bad = _bad_tokens(*sinks)
            self.bad_sink = bad.any(-1)  # [B, Hk]
            sinks = tuple(t.masked_fill(bad[..., None], 0) for t in sinks)
        self.bad_past = None
        if states is not None:
            self.bad_past = ~torch.isfinite(states).all(-1)  # [B, Hk, C0]
            states = states.masked_fill(self.bad_past[..., None], 0)
        self.sanitized = (k, v, sinks, states)

    def poison(self, out, z, mixture):
        """out [B, H, C * chunk, d], z [B, Hk, done, m] or None, mixture [B, H, d, d] or None -> the same, NaN where
        they depend on a non-finite input."""
        B, Hk, L = self.bad.shape
        ch, C = self.chunk, out.shape[2] // self.chunk
        bad = F.pad(self.bad, (0, C * ch - L)).view(B, Hk, C, ch)
        hit = bad.cumsum(-1) > 0  # [B, Hk, C, ch]: at or after a bad token of the chunk
        chunks = torch.zeros(B, Hk, C, dtype=torch.bool, device=out.device)
        if self.bad_sink is not None:
            later = self.first_chunk + torch.arange(C, device=out.device) >= 1
            chunks = chunks | (self.bad_sink[..., None] & later)
        if self.retrieve:
            done = L // ch
            bad_chunks = bad[:, :, :done].any(-1)  # [B, Hk, done]
            cols = bad_chunks if self.bad_past is None else torch.cat([self.bad_past, bad_chunks], dim=2)
            C0 = cols.shape[2] - done
            own = C0 + torch.arange(C, device=out.device)[:, None]
            j = torch.arange(cols.shape[2], device=out.device)[None, :]
            allowed = j < own  # [C, C0 + done]
            if self.window is not None:
                allowed = allowed & (j >= own - self.window)
            retrieves = (allowed & cols[:, :, None, :]).any(-1)  # [B, Hk, C]
            chunks = chunks | retrieves
            if z is not None:
                z = z.masked_fill(bad_chunks[..., None], float("nan"))
            if mixture is not None:
                last = retrieves[:, :, -1].repeat_interleave(self.groups, dim=1)  # [B, H]
                mixture = mixture.masked_fill(last[..., None, None], float("nan"))
        hit = (hit | chunks[..., None]).view(B, Hk, C * ch).repeat_interleave(self.groups, dim=1)
        return out.masked_fill(hit[..., None], float("nan")), z, mixture


def nonfinite_guard(k, v, sinks, states, **options) -> NonFiniteGuard | None:
    """None when k, v [B, Hk, L, d], the sink tokens and the stored states are all finite (the fast path), else the
    guard that sanitises them and poisons the outputs (see :class:`NonFiniteGuard`)."""
    if _finite(k) and _finite(v) and (sinks is None or all(map(_finite, sinks))) and _finite(states):
        return None
    return NonFiniteGuard(k, v, sinks, states, **options)
