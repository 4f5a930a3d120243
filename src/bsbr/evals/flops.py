"""Analytic forward FLOPs of each mechanism's parallel form, and of whole models.

Convention (the one ``torch.utils.flop_counter.FlopCounterMode`` uses, so the two can be read side by side and
are tested against each other): 2 FLOPs per multiply-add of every matrix product the fast path runs, over the
full blocks it computes — masked entries included (a causal T x T product counts T^2 entries, as a dense
kernel would run it; fused kernels that skip masked tiles do less).  Element-wise work (softmax, norms,
activations, masks) is not counted.  Two parts FlopCounterMode cannot see are counted here and named:
``triangular_solve`` (DeltaNet's unit-triangular solves for the UT transform: c right-hand sides of c(c-1)/2
multiply-adds each, per leaf block of c tokens) and every product inside CPU ``scaled_dot_product_attention``
(Standard, Hopfield, BSBR's local part), which the tests count by running those calls through explicit matmuls.

    >>> from bsbr.models import build_model
    >>> m = build_model("Linear", vocab_size=256, hidden_dim=256, num_layers=2, num_heads=4, ff_dim=1024)
    >>> f = analytic_flops(m, 4096)
    >>> f["total"] == sum(f["parts"].values())
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.base import CausalAttention
from ..ops.bsbr_blocks import summary_width
from ..ops.bsbr_blocks_select import row_group_chunks, row_group_scores

__all__ = ["analytic_flops", "attention_flops"]


def _ceil_to(T: int, block: int) -> tuple[int, int]:
    """(number of blocks, padded length) for T tokens in blocks of ``block``."""
    n = math.ceil(T / block)
    return n, n * block


def _projections(D: int, T: int, n: int = 4) -> int:
    return n * 2 * T * D * D


def _standard(a, T):
    return {"projections": _projections(a.hidden_dim, T), "attention": 4 * T * T * a.hidden_dim}


def _hopfield(a, T):
    # update_steps associations xi <- softmax(beta xi K^T) K, then one with V: each two T x T x d products per head
    return {"projections": _projections(a.hidden_dim, T),
            "attention": (a.update_steps + 1) * 4 * T * T * a.hidden_dim}


def _sliding_window(a, T):
    W, d, H = a.window_size, a.head_dim, a.num_heads
    N, _ = _ceil_to(T, W)
    if T <= W:  # one window covers the whole sequence: the layer runs plain causal SDPA (dense T x T count)
        return _standard(a, T)
    return {"projections": _projections(a.hidden_dim, T), "attention": H * N * 2 * (2 * W * 2 * W * d)}


def _linear(a, T):
    C, d, H = a.chunk_size, a.head_dim, a.num_heads
    _, Tp = _ceil_to(T, C)
    return {"projections": _projections(a.hidden_dim, T),
            "intra_chunk": H * 2 * (2 * Tp * C * d),      # tril(phi(Q) phi(K)^T), its product with V
            "states": H * 2 * Tp * d * d,                 # phi(K)^T V per chunk
            "readout": H * (2 * Tp * d * d + 2 * Tp * d)}  # phi(Q) S and phi(Q) . z at each chunk start


def _ut_transform(C: int) -> tuple[int, int]:
    """(matmul FLOPs, triangular-solve FLOPs) of :func:`bsbr.ops.deltanet.ut_transform` for one chunk of C:
    halves joined by T_21 = -T_22 (G_21 T_11) (two h x h x h products) above the leaf size, one solve of C
    right-hand sides with C(C-1)/2 multiply-adds each at the leaves."""
    from ..ops.deltanet import UT_LEAF

    if C % 2 or C <= UT_LEAF:
        return 0, C * (C - 1) * C
    h = C // 2
    products, solve = _ut_transform(h)
    return 2 * (2 * h * h * h) + 2 * products, 2 * solve


def _deltanet(a, T):
    C, d, H = a.chunk_size, a.head_dim, a.num_heads
    N, Tp = _ceil_to(T, C)
    ut_products, ut_solve = _ut_transform(C)
    return {"projections": _projections(a.hidden_dim, T) + 2 * T * a.hidden_dim * H,  # q, k, v, out and beta
            # K K^T, Q K^T, W = T K, T V, tril(QK^T) W, tril(QK^T) (T V); the products joining T's blocks
            "intra_chunk": H * 6 * (2 * Tp * C * d) + H * N * ut_products,
            "triangular_solve": H * N * ut_solve,  # the unit lower triangular solves at T's leaf blocks
            "states": H * (2 * (2 * Tp * d * d) + N * 2 * d * d * d),  # I - K^T W, K^T U; the chunk recursion
            "readout": H * 2 * Tp * d * d}  # (Q - tril(QK^T) W) S


def _gau(a, T):
    D, g, s, e = a.hidden_dim, a.group_size, a.qk_dim, a.expansion_dim
    g = min(g, T)  # a sequence within one group is one tile of T tokens, not padded up to g (ops.gau.gau_mixed)
    _, Tp = _ceil_to(T, g)
    return {"projections": 2 * T * D * (2 * e + s) + 2 * T * e * D,
            "intra_group": 2 * Tp * g * s + 2 * Tp * g * e,  # relu^2 scores, their product with V
            "states": 2 * Tp * s * e,                       # K_lin^T V per group
            "readout": 2 * Tp * s * e}                      # Q_lin times the state at each group's start


def _bsbr(a, T):
    from ..ops.bsbr import _mixing_groups

    ch, d, H, D = a.chunk_size, a.head_dim, a.num_heads, a.hidden_dim
    C, Tp = _ceil_to(T, ch)
    compress = a.compress
    m = d * d if compress is None else compress.out_features
    mixing = 0
    W = getattr(a, "retrieval_window", None)
    for lo, hi in _mixing_groups(C, 0):
        start = 0 if W is None else max(0, lo - W)  # columns before the group's windows are not computed
        width, rows = hi - 1 - start, hi - lo
        mixing += 2 * rows * width * d + 2 * rows * width * m  # meta scores r . h, mixture alpha @ states
        if compress is not None:
            mixing += 2 * rows * m * d * d  # restore P' per retrieving chunk
    parts = {"projections": _projections(D, T) + 2 * (2 * C * D * D),  # q, k, v, out; meta q/k at C positions
             "local": H * 4 * Tp * ch * d,  # softmax inside chunks over full chunk x chunk blocks
             "states": H * 2 * Tp * d * d,  # K_j^T V_j
             "mixing": H * mixing,
             "readout": H * 2 * Tp * d * d}
    if compress is not None:
        parts["states"] += H * 2 * C * d * d * m  # P applied to every chunk state
    return parts


def _bsbr_blocks(a, T, batch: int = 1):
    """Block retrieval (``retrieval="blocks"`` or ``"none"``): the exact pairs its parallel form computes (with
    ``block_select="chunk"`` and no straight-through term: the gathered blocks, empty slots included).  The
    selected chunks run in tiles of queries that read one chunk, padded to whole tiles: that padding depends on the
    selection (the data) and is not counted, so FlopCounterMode counts at least this and at most a tile of padding
    per (row, key/value head, chunk) more (tests/test_flops.py).  With per-token selection and no log-weights the
    rows are scored in groups against only the chunks they may select (``select_in_row_groups``), in groups sized by
    the batch: ``batch`` is the rows' count."""
    ch, d, H, D = a.chunk_size, a.head_dim, a.num_heads, a.hidden_dim
    Cq, Tp = _ceil_to(T, ch)
    Cc = T // ch  # complete chunks: the ones a query may select
    s = a.sink_tokens
    e = d if a.indexer_dim is None else a.indexer_dim  # the dimension the chunks are scored in
    S = summary_width(a.block_summary, e, ch)  # "tokens": every key, chunk * e
    top_k = a.top_k if a.retrieval == "blocks" else 0
    projections = _projections(D, T)
    if a.indexer_dim is not None:  # the indexer's query and key features: D x 2 H e
        projections += 2 * T * D * 2 * H * e
    if a.block_select == "chunk" and a.selection_grad in ("none", "distill"):  # (distill: a loss in training only)
        # one gathered block per query chunk (bsbr.ops.bsbr_blocks_fast._parallel_chunkwise): [chunk 0 if sink |
        # previous | K = min(top_k, Cc) slots, filled or not | own], every row against all of it; scores by the
        # chunks' first rows only
        m = (1 if s else 0) + (1 if a.prev_chunk else 0) + min(top_k, Cc) + 1
        return {"projections": projections,
                "selection": (H * 2 * Cq * Cc * S) if top_k and Cc else 0,
                "local": H * 4 * Tp * (m - min(top_k, Cc)) * ch * d,  # own chunk and chunks in view
                "selected": H * 4 * Tp * min(top_k, Cc) * ch * d}
    pairs = 0
    for c in range(1, Cq):  # chunk c's queries choose among chunks j < c less those always in view
        cand = c - (1 if a.prev_chunk else 0) - (1 if s >= ch and not (a.prev_chunk and c == 1) else 0)
        pairs += min(top_k, max(cand, 0)) * (min(T, (c + 1) * ch) - c * ch)
    seen = ch + s + (ch if a.prev_chunk else 0)  # own chunk, sink tokens, previous chunk: keys of every query row
    if a.block_select == "token" and a.selection_grad in ("none", "distill"):  # rows in groups (bsbr_blocks_select)
        scored = row_group_scores(Tp, Cc, ch, row_group_chunks(batch, H, Cc, ch, a.block_summary))
    else:  # the log-weights need every query row's score of every chunk
        scored = Tp * Cc
    return {"projections": projections,
            "selection": (H * 2 * scored * S) if top_k and Cc else 0,
            "local": H * 4 * Tp * seen * d,  # the own chunk and the chunks in view, over full blocks
            "selected": H * 4 * pairs * ch * d}  # each query against each chunk it selected


_BY_NAME = {"BSBRBlocks": _bsbr_blocks, "Standard": _standard, "Hopfield": _hopfield,
            "SlidingWindow": _sliding_window, "Linear": _linear,
            "DeltaNet": _deltanet, "GAU": _gau, "BSBR": _bsbr}


def attention_flops(attn: CausalAttention, seq_len: int, batch_size: int = 1) -> dict[str, int]:
    """Analytic forward FLOPs of one attention layer's parallel form, by part (see the module docstring).

    attn: a registered mechanism (``attn.name`` picks the formula); seq_len: T tokens per row.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    formula = _BY_NAME.get(getattr(attn, "name", None))
    if formula is None:
        raise ValueError(f"no analytic FLOP formula for attention {getattr(attn, 'name', type(attn).__name__)!r}; "
                         f"known: {sorted(_BY_NAME)}")
    per_row = formula(attn, seq_len, batch_size) if formula is _bsbr_blocks else formula(attn, seq_len)
    return {k: batch_size * int(v) for k, v in per_row.items()}


def analytic_flops(model: nn.Module, seq_len: int, batch_size: int = 1) -> dict:
    """Analytic forward FLOPs of a model from ``bsbr.models`` (backbone or causal LM) on [batch_size, seq_len].

    Returns {"total": int, "parts": {part: int}, "attention": int, "other": int}: attention layers by part
    (summed over layers) plus "feed_forward_and_head", every ``nn.Linear`` outside the attention layers (each
    applied to every token).
    """
    parts: dict[str, int] = {}
    inside = set()
    for module in model.modules():
        if isinstance(module, CausalAttention):
            for k, v in attention_flops(module, seq_len, batch_size).items():
                parts[k] = parts.get(k, 0) + v
            inside.update(id(m) for m in module.modules())
    other = sum(2 * batch_size * seq_len * m.in_features * m.out_features
                for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside)
    attention = sum(parts.values())
    parts["feed_forward_and_head"] = other
    return {"total": attention + other, "parts": parts, "attention": attention, "other": other}


def explicit_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p=0.0,
                  is_causal=False, scale=None, **_) -> torch.Tensor:
    """``scaled_dot_product_attention`` written as two matmuls and a softmax, for counting its FLOPs with
    FlopCounterMode (which does not see the fused CPU kernel).  Same result up to rounding."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-1, -2)) * scale
    if is_causal:
        tq, tk = scores.shape[-2:]
        attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value
