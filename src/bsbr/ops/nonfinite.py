"""Keeping non-finite values where they are: masked products without 0 x NaN.

A form computes many outputs with one product whose weights are zero where a query may not look (a later token, a
token outside its window).  IEEE arithmetic gives 0 * NaN = NaN and 0 * inf = NaN, so a NaN or an infinity in a
value that a query may not see still reaches it through the zero weight: on main 65e4bb0 a NaN in the embedding of
token 20 made the logits at positions 0-19 NaN in every model (issue 27, item 6).  The rule every form here
follows: **a value a query may not see never enters that query's product.**

* :func:`masked_sum` (reference forms): out[t] = sum over the keys t may see of w[t, s] v[s], a loop over queries that
  leaves the other keys out of the sum instead of multiplying them by zero.
* :func:`split_nonfinite` (fast forms): v = its finite part + its non-finite part.  The masked product runs on the
  finite part (a zero weight times a finite value is zero); the non-finite part reaches exactly the queries that see
  it through sums that only add: along the sequence (:func:`causal_sums`) or over a window (:func:`window_sums`).
  The finite outputs are unchanged (x + 0 = x); a query that sees a NaN or an infinity keeps a non-finite output
  (w * inf = inf for a positive weight, and NaN + x = NaN, inf + inf = inf, inf - inf = NaN).
* :func:`nonfinite_starts` (recurrences whose chunked form mixes a token's key into earlier rows, DeltaNet): where
  the rows' first non-finite tokens are, so that the form can run up to each and continue from its state.  Every
  output from a row's first non-finite token on depends on that token; none before it does.

Finite inputs take the fast products exactly as before; what decides is a check that costs next to nothing: the
final state of a chunked recurrence (Linear, GAU, DeltaNet), which sums every key and value, or one summing pass
over the output (softmax: a leaked NaN shows there) or over v (sliding window) (:func:`has_nonfinite`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def has_nonfinite(*tensors: torch.Tensor) -> bool:
    """True when some tensor holds a NaN or an infinity: one summing pass each, no temporaries.

    A finite tensor whose sum overflows also answers True; callers then take their careful path needlessly, never
    wrongly."""
    with torch.no_grad():
        return not all(bool(torch.isfinite(t.sum())) for t in tensors)


def split_nonfinite(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(v with NaN and infinities replaced by 0, the replaced entries with zeros elsewhere) — or (v, None) when
    every entry is finite.  Gradients flow to the finite entries through the first part."""
    if not has_nonfinite(v):
        return v, None
    finite = torch.isfinite(v)
    if bool(finite.all()):  # the sum overflowed
        return v, None
    return torch.where(finite, v, 0.0), torch.where(finite, 0.0, v)


def split_nonfinite_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(k with NaN and infinities replaced by 0, a [..., Tk, 1] column that is NaN at the keys that had one and 0
    elsewhere) — or (k, None) when every entry is finite.

    For softmax kernels that add an additive -inf mask to the scores (NaN + -inf = NaN): the scores of a masked
    non-finite key would stay NaN.  A query that sees such a key has a non-finite score, so its softmax is NaN (an
    infinite key whose score is -inf would only drop out: that query gets NaN here all the same); the column, summed
    by :func:`causal_sums`, gives it that NaN."""
    k, bad = split_nonfinite(k)
    if bad is None:
        return k, None
    return k, torch.where(torch.isfinite(bad).all(dim=-1, keepdim=True), 0.0, float("nan")).to(k.dtype)


def causal_sums(bad: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The non-finite part of the values, summed over the keys each query sees under the causal mask.

    bad: [..., Tk, e] (from :func:`split_nonfinite`); the queries are the last ``num_queries`` keys' positions (query
    i at key Tk - num_queries + i sees keys 0 .. that one).  Returns [..., num_queries, e]: exactly 0 where a query
    sees only finite values, non-finite where it sees a non-finite one."""
    return bad.cumsum(dim=-2)[..., bad.shape[-2] - num_queries :, :]


def window_sums(bad: torch.Tensor, window: int, num_queries: int) -> torch.Tensor:
    """As :func:`causal_sums` for a query that sees the ``window`` latest keys (itself included).

    Sums over power-of-two spans, doubled log2(window) times, then two overlapping spans cover the window: O(T e log W).
    A key counted twice changes nothing here, because the values are 0 or non-finite and x + x has the class of x
    (0, NaN, inf or -inf)."""
    span, acc = 1, bad

    def shifted(t: torch.Tensor, by: int) -> torch.Tensor:  # t[..., j - by, :], zero before the first key
        return F.pad(t, (0, 0, by, 0))[..., : t.shape[-2], :]

    while 2 * span <= window:
        acc = acc + shifted(acc, span)  # acc[j] covers keys j - 2 span + 1 .. j
        span *= 2
    if window > span:  # keys j - window + 1 .. j - window + span and j - span + 1 .. j: the whole window
        acc = acc + shifted(acc, window - span)
    return acc[..., bad.shape[-2] - num_queries :, :]


def masked_sum(weights: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """out[..., i, :] = sum over the keys j with allowed[i, j] of weights[..., i, j] * values[..., j, :].

    weights: [..., Tq, Tk]; values: [..., Tk, e]; allowed: [Tq, Tk] bool, each query's keys one contiguous run (as
    under causal and window masks; a query with none gets 0).  A loop over queries, each a product over its own keys
    only (views, no copies): the keys a query may not see are left out, not multiplied by a zero weight.  For the
    reference forms; the fast forms use :func:`split_nonfinite`.
    """
    count = allowed.sum(dim=-1)
    lo = allowed.to(torch.int8).argmax(dim=-1)
    hi = lo + count
    run = torch.arange(allowed.shape[1], device=allowed.device)
    if not torch.equal(allowed, (run >= lo[:, None]) & (run < hi[:, None])):
        raise ValueError("masked_sum needs each query's allowed keys to be one contiguous run")
    out = []
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        if b > a:
            out.append(weights[..., i : i + 1, a:b] @ values[..., a:b, :])
        else:
            out.append(values.new_zeros(*torch.broadcast_shapes(weights.shape[:-2], values.shape[:-2]), 1,
                                        values.shape[-1]))
    return torch.cat(out, dim=-2)


def nonfinite_starts(*tensors: torch.Tensor) -> list[int]:
    """The distinct positions where a row's first non-finite token sits, ascending.

    tensors: [B, H, T, ...] (a token is non-finite when any of its entries in any tensor is).  Returns [] when every
    token is finite."""
    B, H, T = tensors[0].shape[:3]
    bad = torch.zeros(B, H, T, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad |= ~torch.isfinite(t.detach().reshape(B, H, T, -1)).all(dim=-1)
    rows = bad.any(dim=-1)
    if not bool(rows.any()):
        return []
    first = bad.to(torch.int8).argmax(dim=-1)
    return sorted(set(first[rows].tolist()))
