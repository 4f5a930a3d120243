"""Block retrieval's settings and selection (:mod:`bsbr.ops.bsbr_blocks` has the definition): chunk summaries, the
scores of each query against them, the candidates, the top-k choice with its log-weights, and two helpers every
form shares (heads repeated over a key/value group; a NaN-safe masked product).

Shapes as in :mod:`bsbr.ops.bsbr_blocks`: q [B, H, T, d]; k, v [B, Hk, T, d]; summaries [B, Hk, C, S].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUMMARIES = ("mean", "minmax", "max", "tokens")
SELECTIONS = ("token", "chunk")
GRADS = ("none", "straight_through", "grouped")


@dataclass(frozen=True)
class BlockSpec:
    """The settings of block retrieval (checked by the layer; see the module docstring)."""

    chunk: int
    top_k: int
    sink: int = 0  # first tokens of the stream always in view after chunk 0 (<= chunk; == chunk: all of chunk 0)
    prev_chunk: bool = False  # the previous chunk always in view
    summary: str = "mean"
    select: str = "token"
    grad: str = "none"
    scaling: float | None = None  # softmax scale; None = 1 / sqrt(d)

    def scale(self, d: int) -> float:
        return d**-0.5 if self.scaling is None else self.scaling


# ------------------------------------------------------------------------------------------ selection
def summary_width(summary: str, d: int, chunk: int) -> int:
    """S, the width of one chunk's summary of d-dimensional keys (see :func:`summarize`)."""
    return {"minmax": 2 * d, "tokens": chunk * d}.get(summary, d)


def summarize(k_chunks: torch.Tensor, summary: str) -> torch.Tensor:
    """Summaries of complete chunks: k_chunks [..., C, chunk, d] -> [..., C, S] (S = d for "mean" and "max", 2d for
    "minmax": centre then radius; chunk * d for "tokens").  "max" is the per-channel maximum: for queries and keys
    >= 0 (an indexer's softplus features) q . max is the min/max bound at half its size, the largest q . k the chunk
    could hold.  "tokens" summarises nothing: it keeps every key (flattened), and :func:`scores` gives the chunk
    the log-sum-exp of its tokens' scores (a [T, T] product; meant for an indexer's few dimensions)."""
    if summary == "tokens":
        return k_chunks.flatten(-2)
    if summary == "max":
        return k_chunks.amax(dim=-2)
    if summary == "mean":
        return k_chunks.mean(dim=-2, dtype=torch.float32 if k_chunks.dtype in (torch.float16, torch.bfloat16)
                             else None)
    lo, hi = k_chunks.amin(dim=-2), k_chunks.amax(dim=-2)
    return torch.cat([(hi + lo) / 2, (hi - lo) / 2], dim=-1)


def scores(q: torch.Tensor, summaries: torch.Tensor, spec: BlockSpec, *, tokens: bool = False) -> torch.Tensor:
    """Chunk scores, summed over each key/value group's query heads: q [B, H, n, d], summaries [B, Hk, C, S]
    -> [B, Hk, n, C].  With ``summary="tokens"`` the chunk's score is log sum over its tokens s of exp(score of
    s); ``tokens=True`` returns the tokens' scores instead, [B, Hk, n, C, chunk]."""
    B, H, n, d = q.shape
    Hk = summaries.shape[1]
    if q.dtype in (torch.float16, torch.bfloat16):  # a choice, not a weight: scored in fp32 (fewer flipped ties)
        q, summaries = q.float(), summaries.float()
    qq = torch.cat([q, q.abs()], dim=-1) if spec.summary == "minmax" else q
    # the score is linear in qq: sum the group's query heads and scale them before the product, so the only pass
    # over the [n, C] scores is the product itself (they are the part of the cost that grows as T^2 / chunk)
    qq = qq.view(B, Hk, H // Hk, n, -1).sum(dim=2) * spec.scale(d)
    if spec.summary == "tokens":
        C, m = summaries.shape[2], summaries.shape[3] // d
        tok = (qq @ summaries.reshape(B, Hk, C * m, d).transpose(-1, -2)).view(B, Hk, n, C, m)
        if tokens:
            return tok
        if torch.is_grad_enabled() and tok.requires_grad:
            return tok.logsumexp(dim=-1)
        # torch.logsumexp's steps, in place on the product: its out-of-place (tok - max) allocates another
        # [n, C, chunk] tensor, whose fresh pages cost far more than the subtraction itself at training sizes
        mx = tok.amax(dim=-1, keepdim=True)
        mx = mx.masked_fill_(mx.isinf(), 0.0)
        return tok.sub_(mx).exp_().sum(dim=-1).log_().add_(mx.squeeze(-1))
    if tokens:
        raise ValueError(f"scores: tokens=True needs summary='tokens', got summary={spec.summary!r}")
    return qq @ summaries.transpose(-1, -2)


def candidates(query_chunks: torch.Tensor, num_chunks: int, spec: BlockSpec) -> torch.Tensor:
    """query_chunks [n] (the chunk of each query; any shape [...]) -> bool [..., num_chunks]: which complete chunks
    each query may select (earlier ones, less those always in view)."""
    j = torch.arange(num_chunks, device=query_chunks.device)
    c = query_chunks[..., None]
    ok = j < c
    if spec.prev_chunk:
        ok = ok & (j != c - 1)
    if spec.sink >= spec.chunk:
        ok = ok & (j != 0)
    return ok


def select(score: torch.Tensor, allowed: torch.Tensor, spec: BlockSpec, *, inplace: bool = False):
    """The top_k allowed chunks of each query: score [..., C], allowed bool broadcastable to it.

    Returns (idx [..., K] long, ok [..., K] bool, bias [..., K] or None) with K = min(top_k, C); ``bias`` is the
    log-weight added to each selected chunk's logits: log p - stopgrad(log p) (zero in value) for
    ``"straight_through"``, log p for ``"grouped"``.  ``inplace``: the caller hands over ``score`` (it is masked
    in place unless autograd needs it; saves a copy of the [..., C] scores)."""
    C = score.shape[-1]
    K = min(spec.top_k, C)
    if inplace and not (torch.is_grad_enabled() and score.requires_grad):
        masked = score.masked_fill_(~allowed, float("-inf"))
    else:
        masked = score.masked_fill(~allowed, float("-inf"))
    if K == 0:
        empty = score.new_zeros(*score.shape[:-1], 0)
        return empty.long(), empty.bool(), None
    vals, idx = masked.topk(K, dim=-1)
    ok = allowed.expand_as(score).gather(-1, idx)
    bias = None
    if spec.grad != "none":
        logp = torch.log_softmax(masked, dim=-1).gather(-1, idx)
        logp = torch.where(ok, logp, 0.0)
        bias = logp - logp.detach() if spec.grad == "straight_through" else logp
    return idx, ok, bias


def row_group_chunks(batch: int, kv_heads: int, chunks: int, chunk: int, summary: str) -> int:
    """Query chunks per group of :func:`select_in_row_groups` by default: as many as keep a group's scores
    (batch x kv_heads x rows x chunks, times chunk for ``summary="tokens"``) near 2^22 values, at least 1, at most
    16 (the analytic FLOP meter counts the same groups)."""
    per_row = batch * kv_heads * chunks * (chunk if summary == "tokens" else 1)
    return min(16, max(1, (1 << 22) // max(1, per_row * chunk)))


def _row_groups(rows: int, chunks: int, chunk: int, group_chunks: int, first_chunk: int = 0):
    """(r0, r1, cols) of each group of :func:`select_in_row_groups`: rows r0 .. r1 - 1 (counted from chunk
    ``first_chunk``) scored against the first ``cols`` of ``chunks`` complete chunks (those before the group's last
    row's chunk)."""
    step = group_chunks * chunk
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        yield r0, r1, min(chunks, first_chunk + (r1 - 1) // chunk)


def row_group_scores(rows: int, chunks: int, chunk: int, group_chunks: int, first_chunk: int = 0) -> int:
    """(query row, chunk) scores :func:`select_in_row_groups` computes for ``rows`` rows from chunk
    ``first_chunk`` on against ``chunks`` complete chunks, in groups of ``group_chunks`` query chunks."""
    return sum((r1 - r0) * cols for r0, r1, cols in _row_groups(rows, chunks, chunk, group_chunks, first_chunk))


def select_in_row_groups(q: torch.Tensor, summaries: torch.Tensor, allowed: torch.Tensor, spec: BlockSpec,
                         first_chunk: int = 0, group_chunks: int | None = None):
    """:func:`scores` then :func:`select` for ``grad="none"``, in groups of ``group_chunks`` query chunks, each
    scored against only the chunks its rows may select (those before its last chunk): about half the products and
    top-k work of scoring every row against every chunk, the same selection.  ``group_chunks`` None: as many as
    keep a group's scores near 2^22 values (16 MB in fp32; at least 1, at most 16), so that the [rows, C] (for
    ``summary="tokens"`` [rows, C, chunk]) temporaries come from the allocator's reused memory rather than fresh
    pages, which cost more than the product itself at T = 512, B = 128.

    q [B, H, n, d] (the selecting queries of positions first_chunk * chunk ..); summaries [B, Hk, C, S];
    allowed bool [n, C].  Returns (idx, ok) [B, Hk, n, K] with K = min(top_k, C) (slots a short row cannot fill:
    idx 0, ok False)."""
    if spec.grad != "none":
        raise ValueError(f"select_in_row_groups: grad must be 'none' (got {spec.grad!r}); log-weights need "
                         "scores() and select() over every candidate")
    B, H, n, _ = q.shape
    Hk, C = summaries.shape[1], summaries.shape[2]
    K = min(spec.top_k, C)
    idx = torch.zeros(B, Hk, n, K, dtype=torch.long, device=q.device)
    ok = torch.zeros(B, Hk, n, K, dtype=torch.bool, device=q.device)
    if group_chunks is None:
        group_chunks = row_group_chunks(B, Hk, C, spec.chunk, spec.summary)
    for r0, r1, cols in _row_groups(n, C, spec.chunk, group_chunks, first_chunk):
        if cols == 0 or K == 0:
            continue
        i, o, _ = select(scores(q[:, :, r0:r1], summaries[:, :, :cols], spec), allowed[r0:r1, :cols], spec,
                         inplace=True)
        idx[:, :, r0:r1, : i.shape[-1]], ok[:, :, r0:r1, : i.shape[-1]] = i, o
    return idx, ok


def selection_distill_loss(q: torch.Tensor, k: torch.Tensor, spec: BlockSpec, rows: int | None = 64, *,
                           index_q: torch.Tensor | None = None, index_k: torch.Tensor | None = None,
                           num_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The selection's distillation loss (the layer's ``selection_grad="distill"``): how far the chunk scores are
    from where causal softmax attention over EVERY earlier token puts its weight.

    For each query t and candidate chunk j, the target m[t, j] is the causal softmax weight that q_t puts on chunk
    j's tokens (computed over all tokens, no gradient; averaged over the query heads of a key/value group), and the
    loss is  - sum_j m[t, j] log p[t, j]  with p = softmax of the scores over the candidates, averaged over queries
    that have a candidate.  Its gradient is a KL divergence's, weighted by how much of the query's attention lies
    outside its own chunk and the chunks in view; it reaches every candidate, selected or not, and flows into q and
    k through the scores only (as DeepSeek's sparse attention trains its indexer by KL to the dense attention,
    with the scorer here the summaries themselves).  The sink tokens are always in view, so their weight is not
    counted in chunk 0's target (nor are they among the candidates' tokens for ``summary="tokens"``).

    ``rows``: the loss is taken over that many query positions with candidates, evenly spaced from the last one
    back (None: all), so its cost is [rows, T] per head, not [T, T].  ``index_q``, ``index_k``: an indexer's
    selection queries and keys (see :func:`bsbr.ops.bsbr_blocks.blocks_reference`); the scores are then theirs,
    the target still q's and k's, and the gradient reaches the indexer only.  With ``summary="tokens"`` the loss
    is taken token by token: - sum_s w[t, s] log p[t, s], w the attention weight of each candidate chunk's token s
    and p the softmax of the tokens' scores over them (so the chunks' softmax is the chunk marginal of p).

    ``num_valid`` [B]: each row's real tokens (left-aligned, padding after them); the loss is then averaged over
    the real query positions only (a padded row's query would otherwise count).

    q [B, H, T, d]; k [B, Hk, T, d] (positions 0 .. T - 1).  Returns a scalar."""
    B, H, T, d = q.shape
    Hk, ch = k.shape[1], spec.chunk
    G, Cc = H // Hk, T // ch
    tc = torch.arange(T, device=q.device) // ch
    allowed = candidates(tc, Cc, spec)  # [T, Cc]
    pos = allowed.any(dim=-1).nonzero()[:, 0]  # queries with a candidate
    if pos.numel() == 0:
        return (q.sum() + k.sum()) * 0.0 if index_k is None else (index_q.sum() + index_k.sum()) * 0.0
    if rows is not None and pos.numel() > rows:
        pos = pos[torch.linspace(pos.numel() - 1, 0, rows, device=q.device).round().long()]
    allowed = allowed[pos]  # [n, Cc]
    dt = torch.promote_types(q.dtype, torch.float32)  # half precision computed in fp32
    with torch.no_grad():
        logits = (q[:, :, pos].to(dt) @ _expand(k, G).to(dt).transpose(-1, -2)) * spec.scale(d)  # [B, H, n, T]
        causal = torch.arange(T, device=q.device) <= pos[:, None]
        w = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)[..., : Cc * ch]
        w = w.view(B, Hk, G, -1, Cc, ch).sum(dim=2) / G  # [B, Hk, n, Cc, ch]: the group's mean weight per token
        if 0 < spec.sink < ch:  # chunk 0 a candidate whose first tokens are in view anyway: not the choice's weight
            w[..., 0, : spec.sink] = 0.0
    sq, sk = _selectors(q, k, index_q, index_k)
    summ = summarize(sk[:, :, : Cc * ch].reshape(B, Hk, Cc, ch, sk.shape[-1]), spec.summary)
    if spec.summary == "tokens":  # token by token: the scorer's softmax over the candidates' tokens against w
        sc = scores(_selection_queries(sq, spec)[:, :, pos], summ, spec, tokens=True).to(dt).flatten(-2)
        tok_ok = allowed.repeat_interleave(ch, dim=-1)  # [n, Cc * ch]
        tok_ok[:, : spec.sink] = False  # the sink tokens are in view, not candidates
        w = w.flatten(-2).masked_fill(~tok_ok, 0.0)
        logp = torch.log_softmax(sc.masked_fill(~tok_ok, float("-inf")), dim=-1).masked_fill(~tok_ok, 0.0)
        return _mean_over_real_rows(-(w * logp).sum(dim=-1), pos, num_valid)
    mass = w.sum(dim=-1).masked_fill(~allowed, 0.0)  # [B, Hk, n, Cc]
    sc = scores(_selection_queries(sq, spec)[:, :, pos], summ, spec).to(dt)
    logp = torch.log_softmax(sc.masked_fill(~allowed, float("-inf")), dim=-1).masked_fill(~allowed, 0.0)
    return _mean_over_real_rows(-(mass * logp).sum(dim=-1), pos, num_valid)


def _mean_over_real_rows(loss: torch.Tensor, pos: torch.Tensor, num_valid: torch.Tensor | None) -> torch.Tensor:
    """loss [B, Hk, n] at query positions pos [n] -> its mean over the real positions (all with num_valid None;
    0, still in the graph, when no row has one)."""
    if num_valid is None:
        return loss.mean()
    real = (pos[None, :] < num_valid.to(pos.device)[:, None]).to(loss.dtype)  # [B, n]
    return (loss * real[:, None]).sum() / (real.sum() * loss.shape[1]).clamp_min(1.0)


class _AddLoss(torch.autograd.Function):
    """Returns x unchanged; in backward, ``loss`` gets the gradient ``weight`` as if ``weight * loss`` had been
    added to whatever x feeds (an auxiliary loss that needs no change to the training loop)."""

    @staticmethod
    def forward(ctx, x, loss, weight):
        ctx.weight, ctx.spec = weight, (loss.shape, loss.dtype, loss.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.spec
        return grad, torch.full(shape, ctx.weight, dtype=dtype, device=device), None


def add_loss(x: torch.Tensor, loss: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """x, with ``weight * loss`` added to the loss of anything computed from x (see :class:`_AddLoss`)."""
    return _AddLoss.apply(x, loss, weight)


def _selection_queries(q: torch.Tensor, spec: BlockSpec, offset: int = 0) -> torch.Tensor:
    """The query each position selects with: q itself ("token") or the query at its chunk's first position
    ("chunk"); q [B, H, n, d] holds positions offset .. offset + n - 1 with offset % chunk == 0."""
    if spec.select == "token":
        return q
    firsts = (torch.arange(q.shape[2], device=q.device) // spec.chunk) * spec.chunk
    return q[:, :, firsts]


def _selectors(q, k, index_q, index_k):
    """The queries and keys that select: (q, k), or an indexer's (index_q, index_k) after checking their shapes."""
    if index_q is None and index_k is None:
        return q, k
    if index_q is None or index_k is None:
        raise ValueError("index_q and index_k go together: got only "
                         f"{'index_q' if index_k is None else 'index_k'}")
    B, _, T, _ = q.shape  # (keys may run longer than queries: a stream's earlier positions)
    if (index_k.shape[:3] != k.shape[:3] or index_q.shape[0] != B or index_q.shape[2] != T
            or index_q.shape[1] % index_k.shape[1] or index_q.shape[-1] != index_k.shape[-1]):
        raise ValueError(f"index_q [B, Hi, T, e] and index_k [B, Hk, T', e] must match q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)} (Hk dividing Hi), got index_q {tuple(index_q.shape)}, index_k "
                         f"{tuple(index_k.shape)}")
    return index_q, index_k


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hk, ...] -> [B, Hk * groups, ...]."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _attend(p: torch.Tensor, v: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """p @ v where p is zero outside ``seen``, without letting a non-finite value outside ``seen`` in (0 * NaN):
    p [..., n, m], v [..., m, d], seen bool broadcastable to p.  Rows that see a non-finite value get NaN."""
    out = p @ v
    if bool(torch.isfinite(out).all()):  # p >= 0 multiplies every value, so any non-finite v (or p) shows here
        return out
    bad = ~torch.isfinite(v).all(dim=-1)  # [..., m]
    if not bool(bad.any()):
        return out
    out = p @ torch.where(bad[..., None], 0.0, v)
    hit = (seen & bad[..., None, :]).any(dim=-1, keepdim=True)
    return torch.where(hit, float("nan"), out)
