"""The one-pass rotary path (split heads + rotate, cached tables) against the plain form, with and without autograd;
and every model's in-place inference path against its autograd path."""

from __future__ import annotations

import pytest
import torch

from bsbr.layers.qkv import split_heads
from bsbr.models import list_models
from bsbr.ops import rope
from bsbr.ops.rope import apply_rope, rope_angles, rope_cos_sin, rope_tables, split_heads_rotary

from conftest import make_attention, make_lm
from helpers import assert_close


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_split_heads_rotary_equals_apply_rope(dtype, per_row):
    g = torch.Generator().manual_seed(0)
    B, T, H, d = 2, 37, 3, 10
    y = torch.randn(B, T, H * d, generator=g, dtype=torch.float64).to(dtype)
    positions = torch.randint(0, 1000, (B, T), generator=g) if per_row else torch.arange(T)
    expected = apply_rope(split_heads(y, H), positions)
    cos, sin = rope_cos_sin(positions if per_row else 0, T, d, 10000.0, dtype, y.device)
    got = split_heads_rotary(y, H, cos, sin)
    assert got.is_contiguous() and got.shape == (B, H, T, d)
    assert_close("split_heads_rotary", got.double(), expected.double(),
                 rel_tol={torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype])
    assert torch.equal(split_heads_rotary(y, H), split_heads(y, H))  # no rotation: a plain split
    with torch.inference_mode():
        assert torch.equal(split_heads_rotary(y, H, cos, sin), got)


def test_split_heads_rotary_gradients():
    """The custom backward (inverse rotation) against autograd through apply_rope, and torch's gradcheck."""
    g = torch.Generator().manual_seed(1)
    B, T, H, d = 2, 13, 2, 6
    y = torch.randn(B, T, H * d, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(0, T, d, 10000.0, torch.float64, y.device)
    w = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    (gy_fast,) = torch.autograd.grad((split_heads_rotary(y, H, cos, sin) * w).sum(), y)
    (gy_ref,) = torch.autograd.grad((apply_rope(split_heads(y, H), torch.arange(T)) * w).sum(), y)
    assert_close("grad", gy_fast, gy_ref, rel_tol=1e-14)
    assert torch.autograd.gradcheck(lambda t: split_heads_rotary(t, H, cos, sin), (y,))
    cos_b, sin_b = rope_cos_sin(torch.randint(0, 99, (B, T), generator=g), T, d, 10000.0, torch.float64, y.device)
    assert torch.autograd.gradcheck(lambda t: split_heads_rotary(t, H, cos_b, sin_b), (y,))


def test_rope_tables_cached_and_equal_to_the_definition():
    a = rope_tables(50, 8, 10000.0, torch.float32, "cpu")
    assert rope_tables(50, 8, 10000.0, torch.float32, "cpu") is a  # cached
    ref = rope_angles(torch.arange(50), 8, 10000.0, torch.float32)
    assert torch.equal(a[0], ref[0]) and torch.equal(a[1], ref[1])  # bit for bit: streaming sees the same angles
    with torch.inference_mode():
        b = rope_tables(51, 8, 10000.0, torch.float32, "cpu")
    assert not b[0].is_inference()  # made in inference mode, usable in training
    old = rope.TABLE_CACHE_BYTES
    try:
        rope.TABLE_CACHE_BYTES = 0  # the cache stays bounded: only the latest table is kept
        rope_tables(52, 8, 10000.0, torch.float32, "cpu")
        assert len(rope._TABLES) == 1
    finally:
        rope.TABLE_CACHE_BYTES = old


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("name", list_models())
def test_inference_path_equals_autograd_path(name, blocks, monkeypatch):
    """Layers compute in place when no graph is recorded (feature maps, normalisation, rotations, readouts), and
    long inputs go through row-block workspaces (``blocks``: workspaces of a few rows, so that every projection,
    FFN and output projection runs in many blocks): the outputs under no_grad and inference_mode equal those of
    the out-of-place autograd path, and gradients flow; streaming in pieces through the blocked path too."""
    from bsbr.layers import qkv as common

    if blocks:
        monkeypatch.setattr(common, "BLOCK_BYTES", 7 * 64 * 8)  # 7 rows of 64 fp64 numbers: blocks cross rows
    lm = make_lm(name)
    ids = torch.randint(0, 50, (2, 45), generator=torch.Generator().manual_seed(0))
    out = lm(ids).logits
    out.sum().backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)
    with torch.no_grad():
        assert_close(f"{name} no_grad", lm(ids).logits, out.detach(), rel_tol=1e-12)
    with torch.inference_mode():
        assert_close(f"{name} inference_mode", lm(ids).logits, out.detach(), rel_tol=1e-12)
        cache = lm.new_cache(2)
        pieces = [lm(part, cache=cache, use_cache=True).logits for part in ids.split(17, dim=1)]
        assert_close(f"{name} streamed", torch.cat(pieces, dim=1), out.detach())


@pytest.mark.parametrize("name", list_models())
def test_layer_gradients_through_the_fast_path(name):
    """The parallel form's input gradient equals the reference form's (fp64) through the one-pass rotation."""
    attn = make_attention(name)
    x = torch.randn(2, 21, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    attn.impl = "parallel"
    (g_fast,) = torch.autograd.grad(attn(x).pow(2).sum(), x)
    attn.impl = "reference"
    (g_ref,) = torch.autograd.grad(attn(x).pow(2).sum(), x)
    assert_close(f"{name} input grad", g_fast, g_ref)


@pytest.mark.parametrize("name", list_models())
def test_segmented_inference_forward_equals_parallel(name, monkeypatch):
    """Long inference forwards of sub-quadratic models run segment by segment through the cache: same outputs as
    the one-pass forward with autograd, with left padding too."""
    from bsbr.models import lm as lm_module

    model = make_lm(name).model
    ids = torch.randint(0, 50, (2, 1500), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    monkeypatch.setattr(lm_module, "SEGMENT_BYTES", 1)  # segments of 1,024 tokens
    expected = model(ids, mask)  # autograd on: one parallel pass
    with torch.no_grad():
        segmented = model.segment_length(ids)
        assert segmented == (1024 if getattr(model.blocks[0].attn, "segmented_prefill", False) else 0)
        got = model(ids, mask)
    assert_close(f"{name} segmented", got, expected.detach())


def test_blocked_heads_with_per_row_positions(monkeypatch):
    """Streaming pieces with per-row positions ([B, T] rotary tables: DeltaNet with rope) through the blocked
    projections equal one parallel forward."""
    from bsbr.layers import qkv as common

    monkeypatch.setattr(common, "BLOCK_BYTES", 5 * 64 * 8)
    lm = make_lm("DeltaNet", rope=True)
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(4))
    expected = lm(ids).logits.detach()
    with torch.no_grad():
        cache = lm.new_cache(2)
        pieces = [lm(part, cache=cache, use_cache=True).logits for part in ids.split(13, dim=1)]
    assert_close("DeltaNet rope streamed, blocked", torch.cat(pieces, dim=1), expected)
