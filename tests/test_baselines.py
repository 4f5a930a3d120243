"""The baselines against their references at realistic settings, plus checks particular to each mechanism.

test_invariants.py runs the shared invariants with small chunks/windows; here the registered default options
are used (chunk 64, window 128, group 256), at lengths that are not a multiple of any of them.
"""

from __future__ import annotations

import time

import pytest
import torch

from bsbr.layers.qkv import split_heads
from bsbr.layers.standard import StandardAttention
from bsbr.models import build_model
from bsbr.models.registry import attention_class, attention_defaults

from conftest import _perturb
from helpers import assert_close

BASELINES = ["Linear", "SlidingWindow", "DeltaNet", "Hopfield", "GAU"]
SUBQUADRATIC = ["Linear", "SlidingWindow", "DeltaNet", "GAU"]


def default_attention(name: str, hidden_dim: int = 120, num_heads: int = 2, dtype=torch.float64, **extra):
    """The mechanism with its registered default options (head dim 60 by default), parameters randomised."""
    torch.manual_seed(0)
    attn = attention_class(name)(hidden_dim, num_heads, dropout=0.0, **{**attention_defaults(name), **extra})
    _perturb(attn)
    return attn.to(dtype).eval()


def run(attn, x, g, impl):
    """Output, input gradient and parameter gradients of (attn(x) * g).sum() with form ``impl``."""
    attn.impl = impl
    attn.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = attn(x)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in attn.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("T", [1, 63, 500])
@pytest.mark.parametrize("name", BASELINES)
def test_parallel_equals_reference_default_options(name, T):
    """fp64: relative RMS error <= 1e-10; fp32 parallel against the fp64 reference: <= 1e-4 (outputs and grads;
    a parameter gradient that is exactly zero in fp64, e.g. d/dk at T=1, may be fp32 round-off up to 1e-5)."""
    attn = default_attention(name)
    x = torch.randn(2, T, 120, dtype=torch.float64)
    g = torch.randn(2, T, 120, dtype=torch.float64)
    y_ref, gx_ref, gp_ref = run(attn, x, g, "reference")
    y, gx, gp = run(attn, x, g, "parallel")
    assert_close(f"{name} T={T} output", y, y_ref)
    assert_close(f"{name} T={T} d/dx", gx, gx_ref)
    for n in gp_ref:
        assert_close(f"{name} T={T} d/d{n}", gp[n], gp_ref[n], atol=1e-12)
    attn32 = default_attention(name, dtype=torch.float32)
    y32, gx32, gp32 = run(attn32, x.float(), g.float(), "parallel")
    assert_close(f"{name} T={T} fp32 output", y32.double(), y_ref, rel_tol=1e-4)
    assert_close(f"{name} T={T} fp32 d/dx", gx32.double(), gx_ref, rel_tol=1e-4)
    for n in gp_ref:
        assert_close(f"{name} T={T} fp32 d/d{n}", gp32[n].double(), gp_ref[n], rel_tol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["Linear", "DeltaNet"])
def test_chunk_size_does_not_change_the_result(name):
    x = torch.randn(2, 37, 64, dtype=torch.float64)
    outs = [default_attention(name, 64, 2, chunk_size=c)(x) for c in (1, 5, 16, 64)]
    for c, y in zip((5, 16, 64), outs[1:], strict=True):
        assert_close(f"{name} chunk {c} vs chunk 1", y, outs[0])


@pytest.mark.parametrize("C", [1, 7, 32, 33, 64, 100, 128])
def test_deltanet_ut_transform_is_the_inverse(C):
    """T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta) by an explicit inverse, for chunks solved at once (C <= 32
    or odd) and split in halves (64 once, 128 twice, 100 -> 50 -> 25); beta = 0 rows as for padded tokens."""
    from bsbr.ops.deltanet import ut_transform

    g = torch.Generator().manual_seed(C)
    k = torch.nn.functional.normalize(torch.randn(3, C, 16, generator=g, dtype=torch.float64), dim=-1)
    beta = torch.rand(3, C, generator=g, dtype=torch.float64)
    beta[0, -3:] = 0
    eye = torch.eye(C, dtype=torch.float64)
    expected = torch.linalg.inv(eye + (beta[..., None] * (k @ k.mT)).tril(-1)) @ torch.diag_embed(beta)
    assert_close(f"UT transform C={C}", ut_transform(k @ k.mT, beta), expected)


@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_deltanet_chunkwise_with_and_without_gradients(chunk):
    """The in-place state loop (no gradients: no_grad, inference_mode) and the out-of-place one (autograd) both
    equal the token recurrence, with and without a start state, and leave their inputs untouched."""
    from bsbr.ops.deltanet import chunk_states, delta_chunkwise, delta_recurrent

    g = torch.Generator().manual_seed(chunk)
    for B, T in ((1, 1), (2, 130), (3, 300)):
        q, k = (torch.nn.functional.normalize(torch.randn(B, 2, T, 12, generator=g, dtype=torch.float64), dim=-1)
                for _ in range(2))
        v = torch.randn(B, 2, T, 10, generator=g, dtype=torch.float64)
        beta = torch.rand(B, 2, T, generator=g, dtype=torch.float64)
        for state in (None, torch.randn(B, 2, 12, 10, generator=g, dtype=torch.float64)):
            inputs = [t for t in (q, k, v, beta, state) if t is not None]
            before = [t.clone() for t in inputs]
            ref, ref_state = delta_recurrent(q, k, v, beta, state)
            for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
                with mode():
                    o, s = delta_chunkwise(q, k, v, beta, chunk, state)
                assert_close(f"chunk {chunk} B={B} T={T} {mode.__name__} output", o, ref)
                assert_close(f"chunk {chunk} B={B} T={T} {mode.__name__} state", s, ref_state)
                # the final state goes into a cache: it must hold only its own memory, not the loop's buffer
                assert s.untyped_storage().nbytes() == s.numel() * s.element_size()
            for t, t0 in zip(inputs, before, strict=True):
                assert torch.equal(t, t0)
    decay, writes = torch.randn(3, 5, 4, 4, dtype=torch.float64), torch.randn(3, 5, 4, 6, dtype=torch.float64)
    for state in (None, torch.randn(3, 4, 6, dtype=torch.float64)):
        a, b = chunk_states(decay, writes, state, in_place=True), chunk_states(decay, writes, state, in_place=False)
        assert_close("chunk starts, in place vs stacked", a[0], b[0])
        assert_close("final state, in place vs stacked", a[1], b[1])


@pytest.mark.parametrize("name", ["Linear", "SlidingWindow", "DeltaNet", "Hopfield"])
def test_attention_weights_reproduce_the_output(name):
    """out_proj(weights @ v) == the layer's output: the weights are the mechanism's, not a picture of it."""
    attn = default_attention(name, 64, 4, **({"window_size": 9} if name == "SlidingWindow" else {}))
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    w = attn.attention_weights(x)
    v = attn.qkv(x, torch.arange(30))[2]
    assert_close(f"{name} weights @ v", attn.out(w @ v), attn(x))


def test_hopfield_without_updates_is_softmax_attention():
    hop = default_attention("Hopfield", 64, 4, update_steps=0, normalize=False)
    std = StandardAttention(64, 4, dropout=0.0, rope=False).double()
    std.load_state_dict(hop.state_dict())
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    assert_close("Hopfield(0 steps, no norms) vs softmax attention", hop(x), std(x))
    # with the pattern norms: softmax attention on the normalised inputs of each projection
    hop = default_attention("Hopfield", 64, 4, update_steps=0)
    q = split_heads(hop.q_proj(hop.norm_state(x)), 4)
    k = split_heads(hop.k_proj(hop.norm_stored(x)), 4)
    v = split_heads(hop.v_proj(hop.norm_proj(x)), 4)
    expected = hop.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert_close("Hopfield(0 steps) vs softmax attention with pattern norms", hop(x), expected)
    # update steps really change the result
    assert not torch.allclose(default_attention("Hopfield", 64, 4, update_steps=1)(x), hop(x))


def test_sliding_window_as_wide_as_the_sequence_is_standard_attention():
    sw = default_attention("SlidingWindow", 64, 4, window_size=50)
    std = StandardAttention(64, 4, dropout=0.0).double()
    std.load_state_dict(sw.state_dict())
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    assert_close("window 50 at T=50 vs Standard", sw(x), std(x))
    assert not torch.allclose(default_attention("SlidingWindow", 64, 4, window_size=49)(x), std(x))


def test_gau_one_group_is_quadratic_gau_and_has_no_feedforward():
    gau = default_attention("GAU", 64, 4, group_size=64, qk_dim=32)
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    u, v, qq, kq, _, _ = gau._project(x, torch.arange(40))
    scores = (qq @ kq.transpose(-1, -2)) / 32**0.5
    A = torch.relu(scores).square().tril() / 64
    assert_close("GAU one group vs relu^2 attention", gau(x), gau.out_proj(u * (A @ v)))
    lm = build_model("GAU", vocab_size=50, hidden_dim=64, num_layers=2, num_heads=4, ff_dim=256)
    assert all(block.ff is None for block in lm.blocks)


def test_gau_qk_scale_init_sets_the_scales_and_wakes_the_attention():
    """The default keeps the common initialisation (std 0.02); a larger one makes the relu^2 attention's row sums
    at initialisation many orders of magnitude larger; bad values name the argument."""
    def first_layer(**opts):
        torch.manual_seed(0)
        return build_model("GAU", vocab_size=64, hidden_dim=128, num_layers=2, num_heads=4, ff_dim=256,
                           **opts).blocks[0].attn

    default, wide = first_layer(), first_layer(qk_scale_init=0.5)
    assert default.gamma.std().item() == pytest.approx(0.02, rel=0.1) and "qk_scale_init=0.02" in repr(default)
    assert wide.gamma.std().item() == pytest.approx(0.5, rel=0.1) and "qk_scale_init=0.5" in repr(wide)
    x = torch.randn(2, 128, 128)
    quiet, awake = (m._attention_weights(x).sum(-1).median().item() for m in (default, wide))
    assert quiet < 1e-8 and awake > 1e4 * quiet  # fourth order in gamma: (0.5 / 0.02)^4 ~ 4e5
    for bad in (0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=f"qk_scale_init must be a positive number, got {bad!r}"):
            first_layer(qk_scale_init=bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Standard", *SUBQUADRATIC])
def test_forward_backward_8192(name):
    """Forward + backward at T = 8192, hidden 256, 4 heads, 2 layers (fp32, batch 1)."""
    torch.manual_seed(0)
    lm = build_model(name, vocab_size=256, hidden_dim=256, num_layers=2, num_heads=4, ff_dim=1024, dropout=0.0,
                     causal_lm=True)
    ids = torch.randint(0, 256, (1, 8192))
    start = time.perf_counter()
    out = lm(ids, labels=ids)
    out.loss.backward()
    print(f"{name}: forward+backward at T=8192 in {time.perf_counter() - start:.1f} s")
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
