"""Analytic FLOP formulas (bsbr.evals.flops) equal FlopCounterMode's count of the same forward, for every
registered mechanism, once the fused SDPA kernel runs as explicit matmuls (so the counter sees it) and the one
part the counter cannot see (DeltaNet's triangular solve) is set aside."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bsbr.evals.flops import analytic_flops, attention_flops, explicit_sdpa
from bsbr.layers.base import CausalAttention
from bsbr.models import build_model

OPTIONS = {"BSBR": {"chunk_size": 16}, "BSBRBlocks": {"chunk_size": 16, "top_k": 2, "sink_tokens": 5},
           "Linear": {"chunk_size": 32}, "DeltaNet": {"chunk_size": 32},
           "SlidingWindow": {"window_size": 32}, "GAU": {"group_size": 32, "qk_dim": 16}}


def counted(model, T, batch=2):
    ids = torch.randint(0, 64, (batch, T), generator=torch.Generator().manual_seed(T))
    # autograd on: BSBR's readout is then an out-of-place baddbmm, which the counter sees
    with mock.patch.object(F, "scaled_dot_product_attention", explicit_sdpa), FlopCounterMode(display=False) as c:
        model(ids)
    return c.get_total_flops()


def small(name, **extra):
    return build_model(name, vocab_size=64, hidden_dim=64, num_layers=2, num_heads=2, ff_dim=128, dropout=0.0,
                       causal_lm=True, **{**OPTIONS.get(name, {}), **extra}).eval()


@pytest.mark.parametrize("T", [1, 63, 500])
def test_analytic_equals_flop_counter(model_name, T):
    model = small(model_name)
    a = analytic_flops(model, T, batch_size=2)
    assert a["total"] == sum(a["parts"].values()) == a["attention"] + a["other"]
    if model_name != "BSBRBlocks":
        assert a["total"] - a["parts"].get("triangular_solve", 0) == counted(model, T)
        return
    # block retrieval pads its tiles of (query, selected chunk) pairs to whole tiles, which depends on the data:
    # at most tile - 1 padded queries per (row, head, chunk), 4 * chunk * d FLOPs each
    from bsbr.ops.bsbr_blocks_tiles import _tile

    attn = next(m for m in model.modules() if isinstance(m, CausalAttention))
    ch, d, H = attn.chunk_size, attn.head_dim, attn.num_heads
    padding = model.config.num_layers * 2 * H * (T // ch) * (_tile(ch) - 1) * 4 * ch * d
    assert a["total"] <= counted(model, T) <= a["total"] + padding


@pytest.mark.parametrize("chunk", [64, 100, 128])
def test_deltanet_ut_transform_blocks(chunk):
    """Chunks above the UT transform's leaf size are split in halves (once for 64, twice for 128; 100 -> 50 -> 25
    leaves): the joining products are counted, the leaf solves set aside."""
    model = small("DeltaNet", chunk_size=chunk)
    for T in (70, 300):
        a = analytic_flops(model, T, batch_size=2)
        assert a["total"] - a["parts"]["triangular_solve"] == counted(model, T)


@pytest.mark.parametrize("options", [{"compression_factor": 4}, {"meta_query": "prev_last"}, {"retrieval_window": 3}],
                         ids=str)
def test_bsbr_options_and_row_groups(options):
    """T = 2,500 in chunks of 16 is 157 chunks: the mixture runs in four row groups (skipping zero blocks)."""
    for T in (100, 2500):
        model = small("BSBR", **options)
        assert analytic_flops(model, T, batch_size=2)["total"] == counted(model, T)


@pytest.mark.parametrize("options", [{"prev_chunk": True, "sink_tokens": 16, "block_summary": "minmax"},
                                     {"top_k": 40}, {"retrieval": "none", "sink_tokens": 3},
                                     {"block_select": "chunk", "prev_chunk": True},
                                     {"block_select": "chunk", "sink_tokens": 16, "top_k": 40},
                                     {"selection_grad": "distill", "indexer_dim": 8, "block_summary": "max"},
                                     {"selection_grad": "distill", "indexer_dim": 8, "block_select": "chunk"},
                                     {"selection_grad": "distill", "indexer_dim": 8, "block_summary": "tokens"},
                                     {"selection_grad": "distill", "indexer_dim": 8, "block_summary": "tokens",
                                      "block_select": "chunk"}],
                         ids=str)
def test_bsbr_blocks_options(options):
    """Every pair counted: with top_k above the number of chunks nothing is padded beyond the tiles' own."""
    from bsbr.ops.bsbr_blocks_tiles import _tile

    for T in (40, 300):
        model = small("BSBRBlocks", **options)
        a = analytic_flops(model, T, batch_size=2)["total"]
        if options.get("block_select") == "chunk":  # one gathered block per query chunk: no tiles, exact
            assert a == counted(model, T)
            continue
        padding = 2 * 2 * 2 * (T // 16) * (_tile(16) - 1) * 4 * 16 * 32
        assert a <= counted(model, T) <= a + padding


def test_bsbr_blocks_row_groups_follow_the_batch():
    """At batch 48 the tokens summary's row groups hold 9 chunks, not 16 (their scores kept near 2^22 values): the
    meter counts those groups' scores, which differ from batch 2's, and FlopCounterMode agrees."""
    from bsbr.ops.bsbr_blocks_select import row_group_chunks
    from bsbr.ops.bsbr_blocks_tiles import _tile

    model = small("BSBRBlocks", selection_grad="distill", indexer_dim=8, block_summary="tokens")
    T, batch = 300, 48
    assert row_group_chunks(batch, 2, T // 16, 16, "tokens") == 9
    assert row_group_chunks(2, 2, T // 16, 16, "tokens") == 16
    a = analytic_flops(model, T, batch_size=batch)
    per_row = {k: v // batch for k, v in a["parts"].items()}
    assert per_row["selection"] != analytic_flops(model, T, batch_size=2)["parts"]["selection"] // 2
    padding = batch * 2 * 2 * (T // 16) * (_tile(16) - 1) * 4 * 16 * 32  # layers, heads as above
    assert a["total"] <= counted(model, T, batch=batch) <= a["total"] + padding


def test_scaling_of_the_formulas():
    """Quadratic mechanisms grow 4x per doubling at long T; the sub-quadratic ones 2x (to within their fixed terms)."""
    big = {name: small(name) for name in ("Standard", "Linear", "SlidingWindow", "GAU", "DeltaNet")}
    for name, model in big.items():
        attn = next(m for m in model.modules() if isinstance(m, CausalAttention))
        core = {T: sum(v for k, v in attention_flops(attn, T).items() if k != "projections") for T in (8192, 16384)}
        ratio = core[16384] / core[8192]
        assert ratio == pytest.approx(4.0 if name == "Standard" else 2.0, rel=0.01), (name, ratio)


def test_bad_arguments():
    model = small("Linear")
    attn = next(m for m in model.modules() if isinstance(m, CausalAttention))
    with pytest.raises(ValueError, match="seq_len"):
        attention_flops(attn, 0)
    with pytest.raises(ValueError, match="batch_size"):
        analytic_flops(model, 8, batch_size=0)
    with pytest.raises(ValueError, match="no analytic FLOP formula"):
        attention_flops(torch.nn.Module(), 8)
