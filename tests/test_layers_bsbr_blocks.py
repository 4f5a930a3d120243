"""BSBRAttention with retrieval="blocks" (bsbr.layers.bsbr_blocks): train_top_k selects more chunks in training mode
only,
selection_grad="distill" adds its loss in training mode only and in every form, the streaming cache (BlocksCache) holds
every token and one summary per chunk, bad settings raise clear errors, and the attention weights reproduce the output.

The op's forms are tested in test_ops_bsbr_blocks.py; the registry-wide invariant suite (test_invariants.py) runs the
layer as "BSBRBlocks".
"""

from __future__ import annotations

import pytest
import torch

from bsbr.layers.bsbr import BSBRAttention
from bsbr.ops.bsbr_blocks import BlockSpec, blocks_parallel, blocks_reference

from helpers import assert_close


def test_train_top_k_selects_more_chunks_in_training_mode_only():
    """train_top_k = all chunks with the grouped softmax: training mode is the grouped softmax over every chunk
    (through the dense route), eval mode the top_k selection; the scores get a gradient from every chunk."""
    torch.manual_seed(0)
    attn = BSBRAttention(16, 2, chunk_size=4, dropout=0.0, retrieval="blocks", top_k=1, selection_grad="grouped",
                         train_top_k=8, rope=False).double()
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x, 0)
    dense = attn.out(blocks_reference(q, k, v, BlockSpec(chunk=4, top_k=8, grad="grouped")))  # the definition
    sparse = attn.out(blocks_parallel(q, k, v, BlockSpec(chunk=4, top_k=1, grad="grouped"))[0])
    assert_close("training mode", attn.train()(x), dense, rel_tol=1e-10)
    assert_close("eval mode", attn.eval()(x), sparse, rel_tol=1e-10)
    assert "train_top_k=8" in repr(attn)
    with pytest.raises(ValueError, match="train_top_k"):
        BSBRAttention(16, 2, chunk_size=4, retrieval="states", train_top_k=4)


def test_train_top_k_covering_every_chunk_trains_as_causal_softmax():
    """selection_grad "none" with train_top_k >= the chunks: training mode is causal softmax attention (the dense
    route, one SDPA call), values and gradients; eval mode still selects top_k."""
    torch.manual_seed(0)
    attn = BSBRAttention(16, 2, chunk_size=4, dropout=0.0, retrieval="blocks", top_k=1, train_top_k=8,
                         rope=False).double()
    x = torch.randn(2, 29, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = attn.qkv(x, 0)
    causal = attn.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    trained = attn.train()(x)
    assert_close("training mode", trained, causal, rel_tol=1e-10)
    w = torch.randn_like(causal)
    for a, b in zip(torch.autograd.grad((trained * w).sum(), (x, *attn.parameters())),
                    torch.autograd.grad((causal * w).sum(), (x, *attn.parameters())), strict=True):
        assert_close("gradient", a, b, rel_tol=1e-10)
    sparse = attn.out(blocks_parallel(q, k, v, BlockSpec(chunk=4, top_k=1))[0])
    assert_close("eval mode", attn.eval()(x), sparse, rel_tol=1e-10)
    assert (sparse - causal)[:, 8:].abs().max() > 1e-3  # top_k 1 does leave chunks out


def test_distill_adds_its_loss_in_training_mode_only_and_in_every_form():
    """Same weights, selection_grad "distill" against "none": equal outputs in both modes; in training mode the
    gradient is that of the output plus the selection's loss of the layer's q and k (reference and parallel forms
    alike, the dense route included); in eval mode and under no_grad nothing is added."""
    from bsbr.ops.bsbr_blocks import selection_distill_loss

    torch.manual_seed(0)
    for train_top_k in (None, 8):
        kw = dict(chunk_size=4, dropout=0.0, retrieval="blocks", top_k=1, block_summary="minmax", rope=False,
                  train_top_k=train_top_k)
        plain = BSBRAttention(16, 2, **kw).double()
        dist = BSBRAttention(16, 2, selection_grad="distill", **kw).double()
        dist.load_state_dict(plain.state_dict())
        x = torch.randn(2, 29, 16, dtype=torch.float64)
        w = torch.randn(2, 29, 16, dtype=torch.float64)
        for form in ("_reference", "_parallel"):
            a, b = getattr(plain.train(), form)(x), getattr(dist.train(), form)(x)
            assert_close(f"{form} output", b, a, rel_tol=1e-12)
            q, k, _ = plain.qkv(x, 0)
            spec = BlockSpec(chunk=4, top_k=train_top_k or 1, summary="minmax")
            want = torch.autograd.grad((a * w).sum() + selection_distill_loss(q, k, spec), list(plain.parameters()))
            got = torch.autograd.grad((b * w).sum(), list(dist.parameters()))
            for g1, g2 in zip(got, want, strict=True):
                assert_close(f"{form} gradient (train_top_k={train_top_k})", g1, g2, rel_tol=1e-10)
        a, b = plain.eval()(x), dist.eval()(x)
        ga = torch.autograd.grad((a * w).sum(), list(plain.parameters()))
        gb = torch.autograd.grad((b * w).sum(), list(dist.parameters()))
        for g1, g2 in zip(gb, ga, strict=True):
            assert_close("eval-mode gradient", g1, g2, rel_tol=1e-12)
    assert "selection_grad='distill'" in repr(dist)


def test_layer_cache_holds_every_token_and_one_summary_per_chunk():
    attn = BSBRAttention(32, 2, chunk_size=8, dropout=0.0, retrieval="blocks", top_k=2).eval()
    cache = attn.new_cache(batch_size=1)
    with torch.no_grad():
        attn(torch.randn(1, 21, 32), cache=cache)
    # keys and values: 21 tokens x 2 heads x 16 dims each; summaries: 2 chunks x 2 heads x 16; lengths: one int64
    assert cache.state_nbytes() == (2 * 21 * 2 * 16 + 2 * 2 * 16) * 4 + 8


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"retrieval": "tokens"}, "retrieval must be one of"),
    ({"retrieval": "blocks", "top_k": 0}, "top_k must be a positive integer, got 0"),
    ({"retrieval": "blocks", "sink_tokens": 9}, "sink_tokens must be at most chunk_size=8, got 9"),
    ({"retrieval": "blocks", "compression_factor": 4}, "compression_factor=4 belongs to the state readout"),
    ({"retrieval": "blocks", "block_summary": "median"}, "block_summary must be one of"),
    ({"retrieval": "blocks", "indexer_dim": 8}, "indexer_dim=8 needs retrieval=.blocks. .what it selects for. and "
     "selection_grad=.distill."),
    ({"retrieval": "blocks", "selection_grad": "distill", "indexer_dim": 0}, "indexer_dim must be a positive"),
    ({"retrieval": "states", "sink_tokens": 2}, "sink_tokens, prev_chunk and train_top_k belong to retrieval='blocks'"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        BSBRAttention(32, 2, chunk_size=8, **kwargs)


def test_attention_weights_reproduce_the_output():
    attn = BSBRAttention(32, 2, chunk_size=4, dropout=0.0, retrieval="blocks", top_k=1, sink_tokens=2).double()
    x = torch.randn(1, 22, 32, dtype=torch.float64)
    maps = attn.attention_weights(x, parts=True)
    _, _, v = attn.qkv(x, 0)
    heads = maps["total"] @ v  # [B, H, T, d]
    assert_close("weights @ v", attn.out(heads), attn(x))
    assert torch.allclose(maps["total"].sum(-1), torch.ones(1, 2, 22, dtype=torch.float64))
    assert_close("parts", maps["local"] + maps["retrieval"], maps["total"])
    # each query sees its own chunk, the sink and at most one selected chunk: at most 4 + 2 + 4 keys
    assert int((maps["total"] > 0).sum(-1).max()) <= 10


# ------------------------------------------------------------------------------------------- the indexer
INDEXER = {"chunk_size": 8, "top_k": 2, "sink_tokens": 3, "selection_grad": "distill", "indexer_dim": 6,
           "block_summary": "max"}


def _invariant_cases():
    import test_invariants as inv

    cases = [(inv.test_reference_equals_parallel_fp64_outputs_and_grads, {"T": T}) for T in (9, 23, 63)]
    cases += [(inv.test_causality_layer_and_model, {}), (inv.test_padding_invariance, {}),
              (inv.test_streaming_ragged_batch, {}), (inv.test_greedy_generate_equals_argmax_redecoding, {}),
              (inv.test_recurrent_gradients_equal_parallel, {})]
    cases += [(inv.test_streaming_equals_parallel, {"split": s}) for s in ([1] * 45, [3, 5, 8, 1, 16, 12])]
    cases += [(inv.test_nonfinite_token_reaches_no_earlier_position, {"form": f, "value": float("nan")})
              for f in inv.LAYER_FORMS]
    cases += [(inv.test_padding_garbage_changes_no_real_output, {"form": f, "side": "left"}) for f in inv.LAYER_FORMS]
    return cases


@pytest.mark.parametrize(("check", "kwargs"), _invariant_cases(),
                         ids=lambda c: c.__name__[5:] if callable(c) else "-".join(map(str, c.values()))[:24])
@pytest.mark.parametrize(("select", "summary"), [("token", "max"), ("chunk", "max"), ("token", "tokens")])
def test_indexer_holds_the_invariants(check, kwargs, select, summary, monkeypatch):
    """The registry's invariant suite (reference == parallel with gradients, causality, padding, streaming in
    any split, ragged batches, generation, non-finite values) for BSBRBlocks whose chunks an indexer selects (by a
    max-pooled summary of its keys, or by the log-sum-exp of its token scores)."""
    import conftest

    monkeypatch.setitem(conftest.SMALL_OPTIONS, "BSBRBlocks",
                        {**INDEXER, "block_select": select, "block_summary": summary})
    check("BSBRBlocks", **kwargs)


@pytest.mark.parametrize("summary", ["max", "tokens"])
def test_distillation_loss_ignores_padding(summary):
    """In training mode a row padded on either side gives the unpadded row's gradients, the distillation loss's
    included (every real position is among the loss's rows here): the padded positions' queries do not count."""
    torch.manual_seed(0)
    layer = BSBRAttention(16, 2, chunk_size=4, dropout=0.0, retrieval="blocks", top_k=1, block_summary=summary,
                          selection_grad="distill", indexer_dim=5).double().train()
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    w = torch.randn(1, 13, 16, dtype=torch.float64)
    want = torch.autograd.grad((layer(x) * w).sum(), list(layer.parameters()))
    pad = torch.randn(1, 6, 16, dtype=torch.float64) * 50
    for xp, mask, wp in [(torch.cat([x, pad], 1), [1] * 13 + [0] * 6, torch.cat([w, torch.randn(1, 6, 16)], 1)),
                         (torch.cat([pad, x], 1), [0] * 6 + [1] * 13, torch.cat([torch.randn(1, 6, 16), w], 1))]:
        got = torch.autograd.grad((layer(xp, torch.tensor([mask])) * wp).sum(), list(layer.parameters()))
        for (n, _), a, b in zip(layer.named_parameters(), got, want, strict=True):
            assert_close(f"gradient {n}", a, b, rel_tol=1e-10)


def test_indexer_selects_and_learns_from_the_distillation_loss_only():
    """The indexer's scores choose the chunks (the output is the reference op's with index_q / index_k, and differs
    from q and k selecting); in training mode the indexer's gradient is exactly that of
    selection_distill_loss(q, k, index_q=, index_k=), every other gradient (x included) that of the same layer
    without the loss; with top_k covering every chunk it is causal softmax attention whatever the indexer says."""
    from bsbr.layers.bsbr_blocks import index, spec
    from bsbr.ops.bsbr_blocks import selection_distill_loss

    torch.manual_seed(0)
    kw = dict(chunk_size=4, dropout=0.0, retrieval="blocks", top_k=1, block_summary="max", rope=False)
    layer = BSBRAttention(16, 2, selection_grad="distill", indexer_dim=5, **kw).double()
    plain = BSBRAttention(16, 2, **kw).double()  # the same weights, q and k selecting
    plain.load_state_dict({n: p for n, p in layer.state_dict().items() if not n.startswith("indexer")})
    x = torch.randn(2, 29, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = layer.qkv(x, 0)
    iq, ik = index(layer, x)
    s = spec(layer)
    want = layer.out(blocks_reference(q, k, v, s, index_q=iq, index_k=ik))
    assert_close("eval output", layer.eval()(x), want, rel_tol=1e-10)
    assert (want - plain.eval()(x)).abs().max() > 1e-3  # the indexer chose other chunks than q and k would
    w = torch.randn_like(want)
    out = layer.train()(x)
    got = torch.autograd.grad((out * w).sum(), (x, *layer.parameters()))
    names = [n for n, _ in layer.named_parameters()]
    loss = selection_distill_loss(q, k, s, index_q=iq, index_k=ik)
    g_index = torch.autograd.grad(loss, layer.indexer.weight, retain_graph=True)[0]
    g_out = torch.autograd.grad((want * w).sum(), (x, *layer.parameters()), allow_unused=True)
    assert g_out[names.index("indexer.weight") + 1] is None  # the choice passes no gradient
    for n, g, g0 in zip(["x", *names], got, g_out, strict=True):
        assert_close(f"gradient {n}", g, g_index if n == "indexer.weight" else g0, rel_tol=1e-10)
    every = BSBRAttention(16, 2, selection_grad="distill", indexer_dim=5, **{**kw, "top_k": 8}).double().eval()
    every.load_state_dict(layer.state_dict())
    q, k, v = every.qkv(x, 0)
    causal = every.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert_close("top_k covering every chunk", every(x), causal, rel_tol=1e-10)
    assert "indexer_dim=5" in repr(layer)
