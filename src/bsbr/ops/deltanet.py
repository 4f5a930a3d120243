"""DeltaNet: linear attention with the delta rule (Schlag et al. 2021), chunkwise form of Yang et al. (2024).

Per head, with L2-normalised q_t, k_t and a learned write strength beta_t = sigmoid(w_beta . x_t) in (0, 1):

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T          o_t = S_t^T q_t          (S: [d, d])

Each write replaces a beta-fraction of what the state recalled for k_t by v_t.  Chunkwise form: in a chunk of
C tokens with start state S0, the writes u_t = beta_t (v_t - S_{t-1}^T k_t) satisfy the unit lower triangular
system (I + tril(diag(beta) K K^T, -1)) U = diag(beta) (V - K S0), so with the WY/UT transform
T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta) (triangular solves, all chunks at once):

    W = T K,  U = T V - W S0,   O = Q S0 + tril(Q K^T) U,   S_end = S0 + K^T U

Rearranged so that only S_end = (I - K^T W) S0 + K^T (T V) — one d x d matmul per chunk — runs chunk after
chunk; every other product is batched over all chunks.  T itself comes from batched triangular solves on
half-chunks joined by two products (:func:`ut_transform`), then W and T V are plain products.
Reference: the token recurrence (:func:`delta_recurrent`), beside the chunkwise form (:func:`delta_chunkwise`).

Non-finite tokens: the chunk's triangular solve and its products with T, W and U reach every row of the chunk through
zero entries (0 * NaN = NaN), so a NaN key, value or beta at s made the chunk's rows before s NaN.  A finite final
state says every key, value and beta was finite (no extra pass); otherwise :func:`delta_chunkwise` runs again in
pieces that end where rows' first non-finite tokens are (:func:`~bsbr.ops.nonfinite.nonfinite_starts`), each
continuing from the state the piece before left: no output before a row's first non-finite token sees it, and every
output from there on depends on it, as in the recurrence.
"""

from __future__ import annotations

import torch

from .linear import pad_to_chunks
from .nonfinite import nonfinite_starts

UT_LEAF = 32
"""Chunks up to this many tokens (and odd-sized ones) get their UT transform from one triangular solve; larger
even chunks are halved recursively (:func:`ut_transform`)."""


def ut_transform(gram: torch.Tensor, beta: torch.Tensor, leaf: int = UT_LEAF) -> torch.Tensor:
    """T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta) for every chunk, from gram = K K^T.

    gram: [M, C, C] (only its lower triangle is read); beta: [M, C]; leaf: the largest chunk solved at once.
    Returns T: [M, C, C], lower triangular.

    T = diag(beta) L^-1 with L = I + tril(K K^T diag(beta), -1), because (I + tril(diag(beta) K K^T, -1))
    diag(beta) = diag(beta) L; so for C <= ``leaf`` (or odd C) T solves X L = diag(beta), one batched
    triangular solve.  Larger chunks split into halves: with L's blocks L_11, L_22 and L_21 = G_21 diag(beta_1)
    (G = K K^T), the diagonal blocks of T are the halves' own transforms T_11, T_22 (one recursive call for both)
    and T_21 = -diag(beta_2) L_22^-1 L_21 L_11^-1 = -T_22 G_21 T_11.  PyTorch's batched CPU solve runs on one
    thread and does not exploit the triangular right-hand side, so half-size solves plus two small products cost
    less, the more so the larger the chunk (``one_solve`` in benchmarks/bench_deltanet_core.py is the whole core
    with one solve per chunk, for comparison).
    """
    M, size = beta.shape
    if size % 2 or size <= leaf:
        return torch.linalg.solve_triangular(gram * beta[:, None, :], torch.diag_embed(beta), upper=False,
                                             left=False, unitriangular=True)
    h = size // 2
    # blocks[m, i, r, j, c] = X[m, i h + r, j h + c]: the diagonal blocks are blocks.diagonal(dim1=1, dim2=3)
    diag_blocks = gram.reshape(M, 2, h, 2, h).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(2 * M, h, h)
    halves = ut_transform(diag_blocks, beta.reshape(2 * M, h), leaf).view(M, 2, h, h)
    t = gram.new_empty(M, size, size)
    blocks = t.view(M, 2, h, 2, h)
    blocks.diagonal(dim1=1, dim2=3).copy_(halves.permute(0, 2, 3, 1))
    blocks[:, 0, :, 1] = 0
    blocks[:, 1, :, 0] = -(halves[:, 1] @ (gram[:, h:, :h] @ halves[:, 0]))
    return t


def delta_chunk_terms(q, k, v, beta, chunk: int, ut_leaf: int = UT_LEAF):
    """Everything of the chunkwise form that is batched over all chunks (no chunk-to-chunk dependence).

    q, k: [B, H, T, d] (unit norm); v: [B, H, T, e]; beta: [B, H, T].  With M = B H N chunks of C = chunk tokens
    (the last zero-padded) and S_n the state at chunk n's start, O_n = q_eff_n S_n + o_local_n and
    S_{n+1} = decay_n S_n + writes_n.  Returns (q_eff [M, C, d], o_local [M, C, e], decay [B H, N, d, d],
    writes [B H, N, d, e]).  ``ut_leaf``: see :func:`ut_transform`.
    """
    d, e = k.shape[-1], v.shape[-1]
    qc, kc, vc = (pad_to_chunks(t, chunk) for t in (q, k, v))  # [B, H, N, C, .]
    B, H, N = qc.shape[:3]
    bc = pad_to_chunks(beta[..., None], chunk)  # padded tokens get beta = 0, k = 0: no write
    qc, kc, vc, bc = (t.flatten(0, 2) for t in (qc, kc, vc, bc))  # every chunk of every row and head: [M, C, .]
    t = ut_transform(kc @ kc.mT, bc[..., 0], ut_leaf)
    # Forming T and then multiplying is faster on CPU than solving against [beta K | beta V] (PyTorch's batched
    # CPU solve is slow; the products are not).
    w = t @ kc  # W = T K
    u = t @ vc  # U before the start state's correction: T V
    local = (qc @ kc.mT).tril_()
    # O_n = (Q_n - local_n W_n) S_n + local_n U_n and S_{n+1} = (I - K_n^T W_n) S_n + K_n^T U_n
    q_eff = torch.baddbmm(qc, local, w, alpha=-1)
    o_local = local @ u
    eye_d = torch.eye(d, dtype=q.dtype, device=q.device)
    decay = torch.baddbmm(eye_d, kc.mT, w, alpha=-1).view(B * H, N, d, d)
    writes = (kc.mT @ u).view(B * H, N, d, e)
    return q_eff, o_local, decay, writes


def chunk_states(decay: torch.Tensor, writes: torch.Tensor, state: torch.Tensor | None = None,
                 in_place: bool | None = None):
    """The chunk-to-chunk recursion S_{n+1} = decay_n S_n + writes_n, the one sequential part of the form.

    decay: [R, N, d, d]; writes: [R, N, d, e]; state: S_0 as [R, d, e] (None: zeros).  Returns (the state at
    every chunk's start, [R N, d, e] in the order of ``decay``'s first two dimensions; the final state [R, d, e]).

    Two implementations of the same loop.  Out of place (what autograd needs): each step makes a new state and
    the starts are stacked at the end.  In place (no gradients): the states are written one after another into
    one buffer laid out chunk-major ([N + 1, R, d, e]), so each step is one ``baddbmm_`` into contiguous memory
    and nothing is stacked (``stacked_loop`` in benchmarks/bench_deltanet_core.py compares the two in the whole
    core).  ``in_place=None`` picks it whenever no gradient is being recorded through the inputs.
    """
    R, N, d, e = writes.shape
    if in_place is None:
        in_place = not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (decay, writes, state)))
    if not in_place:
        S = writes.new_zeros(R, d, e) if state is None else state
        starts = []
        for n in range(N):
            starts.append(S)
            S = torch.baddbmm(writes[:, n], decay[:, n], S)
        return torch.stack(starts, dim=1).flatten(0, 1), S
    buf = writes.new_empty(N + 1, R, d, e)
    if state is None:
        buf[0].zero_()
    else:
        buf[0].copy_(state)
    buf[1:].copy_(writes.transpose(0, 1))
    for n in range(N):
        buf[n + 1].baddbmm_(decay[:, n], buf[n])
    return buf[:N].transpose(0, 1).reshape(R * N, d, e), buf[N].clone()  # a view would keep all of buf alive


def delta_chunkwise(q, k, v, beta, chunk: int, state: torch.Tensor | None = None):
    """q, k: [B, H, T, d] (unit norm); v: [B, H, T, e]; beta: [B, H, T]; state: [B, H, d, e] or None.

    Returns (o [B, H, T, e], final state [B, H, d, e]).  :func:`delta_chunk_terms` does all but the state
    recursion (:func:`chunk_states`), which leaves one small matmul per chunk in the loop.  A non-finite key, value
    or beta reaches no earlier output (see the module docstring).
    """
    o, S = _delta_chunkwise(q, k, v, beta, chunk, state)
    if bool(torch.isfinite(S).all()):
        return o, S
    cuts = [c for c in nonfinite_starts(k, v, beta[..., None]) if c > 0]
    if not cuts:  # the non-finite start state (or an overflow) reaches every output anyway
        return o, S
    outs, S = [], state
    for lo, hi in zip([0, *cuts], [*cuts, q.shape[2]], strict=True):
        o, S = _delta_chunkwise(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], beta[:, :, lo:hi], chunk, S)
        outs.append(o)
    return torch.cat(outs, dim=2), S


def _delta_chunkwise(q, k, v, beta, chunk: int, state: torch.Tensor | None = None):
    """:func:`delta_chunkwise` without the care for non-finite tokens."""
    (B, H, T, d), e = q.shape, v.shape[-1]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, state))
    q_eff, o_local, decay, writes = delta_chunk_terms(q, k, v, beta, chunk)
    starts, S = chunk_states(decay, writes, None if state is None else state.flatten(0, 1), in_place=not grad)
    # without gradients o_local (this call's own buffer) takes the readout in place
    o = torch.baddbmm(o_local, q_eff, starts) if grad else o_local.baddbmm_(q_eff, starts)
    return o.view(B, H, -1, e)[:, :, :T], S.view(B, H, d, e)


def delta_recurrent(q, k, v, beta, state: torch.Tensor | None = None):
    """The token recurrence (reference).  Same arguments and result as :func:`delta_chunkwise`."""
    S = q.new_zeros(*q.shape[:2], k.shape[-1], v.shape[-1]) if state is None else state
    outs = []
    for t in range(q.shape[2]):
        kt = k[:, :, t]
        recalled = (kt[:, :, None, :] @ S)[:, :, 0]  # S^T k_t: [B, H, e]
        write = beta[:, :, t, None] * (v[:, :, t] - recalled)
        S = S + kt[..., :, None] * write[..., None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=2), S


