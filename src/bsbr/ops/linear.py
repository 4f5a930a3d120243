"""Causal linear attention (Katharopoulos et al. 2020) as pure tensor functions.

With a non-negative feature map phi already applied to q and k (the layer uses elu + 1):

    S_t = sum_{s<=t} phi(k_s) v_s^T      z_t = sum_{s<=t} phi(k_s)      o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t)

* :func:`linear_recurrent` — the reference: the token recurrence, the normaliser riding along as one extra value
  column (:func:`with_ones`), so that one state [d, e + 1] holds S and z;
* :func:`linear_chunkwise` — the fast form: inside a chunk of C tokens a masked C x C product, across chunks the
  running state, O(T C d + T d^2); it continues from a state, which is also the streaming form.

Shapes: q, k [B, H, T, d]; v [B, H, T, e].  No value reaches a query before it (:mod:`bsbr.ops.nonfinite`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nonfinite import causal_sums, split_nonfinite

_LOW = (torch.bfloat16, torch.float16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype running sums are kept in: fp32 for half types (their cumulative sums drift), else unchanged."""
    return torch.float32 if dtype in _LOW else dtype


def pad_to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """x: [B, H, T, f] -> [B, H, N, chunk, f], zero-padded at the end (harmless: every form is causal)."""
    B, H, T, f = x.shape
    n = -(-T // chunk)
    if n * chunk != T:
        x = F.pad(x, (0, 0, 0, n * chunk - T))
    return x.view(B, H, n, chunk, f)


def exclusive_prefix(x: torch.Tensor, first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running sums along dim 2 of x [B, H, N, ...]: (sum of the entries before each n, plus ``first``) and the
    total.  A loop of N adds: PyTorch's CPU cumsum over a non-innermost dimension is several times slower."""
    acc = torch.zeros_like(x[:, :, 0]) if first is None else first
    before = []
    for n in range(x.shape[2]):
        before.append(acc)
        acc = acc + x[:, :, n]
    return torch.stack(before, dim=2), acc


def linear_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int,
                     state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention, chunkwise.  q, k: [B, H, T, d] already feature-mapped (phi >= 0);
    v: [B, H, T, e]; state: [B, H, d, e + 1] = [sum phi(k) v^T | sum phi(k)] of earlier tokens, or None.

    Returns (numerator [B, H, T, e], normaliser [B, H, T], new state [B, H, d, e + 1]); the output is their
    ratio.  The normaliser is computed beside the values (row sums of the masked scores plus q . z), not as an
    extra value column: a 65-column product runs ~40% slower than a 64-column one on CPU.

    Non-finite values: the masked in-chunk product would multiply the zero scores of a chunk's later tokens by their
    values (0 * NaN = NaN reached the chunk's earlier queries).  The chunk sums K^T V see every value, so a finite new
    state says every value is finite (no extra pass); otherwise the in-chunk product runs on v's finite part and each
    query adds the non-finite values up to itself (:func:`~bsbr.ops.nonfinite.split_nonfinite`).  Non-finite keys
    need nothing: ``tril`` overwrites the scores of later keys.
    """
    B, H, T, d = q.shape
    e = v.shape[-1]
    qc, kc, vc = (pad_to_chunks(t, chunk) for t in (q, k, v))  # [B, H, N, C, .]
    N = qc.shape[2]
    kv = kc.transpose(-1, -2) @ vc  # per-chunk sums of phi(k) v^T: [B, H, N, d, e]
    S_before, S_end = exclusive_prefix(kv, None if state is None else state[..., :e])
    z = kc.sum(dim=3).cumsum(dim=2)  # [B, H, N, d], small: cumsum is fine here
    if state is not None:
        z = z + state[..., None, :, e]
    z0 = torch.zeros_like(z[:, :, :1]) if state is None else state[..., None, :, e]
    z_before = torch.cat([z0, z[:, :, :-1]], dim=2)
    z_end = z[:, :, -1]
    scores = (qc @ kc.transpose(-1, -2)).tril()  # [B, H, N, C, C]
    bad = None
    if not bool(torch.isfinite(S_end).all()):  # a non-finite value, key or start state (or an overflow)
        vc, bad = split_nonfinite(vc)

    def flat(t):
        return t.reshape(B * H * N, *t.shape[-2:])

    num = torch.baddbmm(flat(scores) @ flat(vc), flat(qc), flat(S_before)).view(B, H, N, chunk, e).flatten(2, 3)
    if bad is not None:
        num = num + causal_sums(bad.flatten(2, 3), N * chunk)
    den = scores.sum(dim=-1) + (qc @ z_before[..., None])[..., 0]
    num, den = num[:, :, :T], den.flatten(2, 3)[:, :, :T]
    return num, den, torch.cat([S_end, z_end[..., None]], dim=-1)


def linear_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The token recurrence (reference): q, k [B, H, T, d] feature-mapped, v [B, H, T, e] with a ones column
    appended (so one state carries S and z) -> [B, H, T, e]: numerators, the normaliser last."""
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, d, v.shape[-1])
    outs = []
    for t in range(T):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=2)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[.., e] -> [.., e + 1]: the ones column that makes the recurrent state carry the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


