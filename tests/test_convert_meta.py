"""BSBRMeta, the weights a conversion adds to each attention layer (bsbr.convert.meta): its chunked state readout
against the op's token-by-token reference, on outputs and on the gradients of q, k, v and every new weight, and with
one group as the native layer feeds the op."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from bsbr.convert import BSBRMeta  # noqa: E402
from bsbr.ops.bsbr import bsbr_reference  # noqa: E402

from helpers import assert_close  # noqa: E402


def _op_inputs(B=2, H=6, Hk=2, T=37, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hk, T, d, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("T,chunk", [(37, 8), (8, 8), (5, 8), (64, 16)])
@pytest.mark.parametrize("options", [{}, {"meta_key": "mean", "state_norm": "none"}, {"retrieval_window": 2},
                                     {"compression_factor": 4}, {"sink_tokens": 3}])
def test_segment_equals_reference_with_gradients(T, chunk, options):
    q, k, v = _op_inputs(T=T)
    meta = BSBRMeta(6, 2, 12, chunk, **options).double()
    with torch.no_grad():
        for p in meta.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    out = meta.segment(q, k, v, scaling=0.3).out
    C = -(-T // chunk)
    starts = torch.arange(C) * chunk
    r = meta.meta_query(q[:, :, starts])
    pad = C * chunk - T
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(2, 2, C, chunk, 12)
    h = meta.meta_key(kp)
    ref = bsbr_reference(q, k, v, r, h, chunk, scaling=0.3, gate=meta.gate, state_norm=meta.state_norm,
                             window=meta.retrieval_window, compress=meta.compress, restore=meta.restore,
                             sink=meta.sink_tokens)
    assert_close("out", out, ref)
    wrt = (q, k, v, *meta.parameters())
    g1 = torch.autograd.grad(out.square().sum(), wrt, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad(ref.square().sum(), wrt, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["q", "k", "v", *(n for n, _ in meta.named_parameters())], g1, g2, strict=True):
        assert_close(f"grad {name}", a, b)


def test_gqa_op_equals_the_library_reference_with_one_group():
    """With G = 1, gate 1 and BSBR's own scaling the conversion's meta maps feed the op as the native layer's do: the
    chunked form equals the reference given each chunk's meta query at its first token and meta key at its last."""
    q, k, v = _op_inputs(H=3, Hk=3, T=29, d=8)
    meta = BSBRMeta(3, 3, 8, 6).double()
    with torch.no_grad():
        meta.meta_q.add_(0.3 * torch.randn_like(meta.meta_q))
        meta.meta_k.add_(0.3 * torch.randn_like(meta.meta_k))
    out = meta.segment(q, k, v, scaling=8**-0.5).out
    r_all = meta.meta_query(q)  # meta query at every position; each chunk's first is picked below
    h_all = torch.einsum("bhnd,hed->bhne", k, meta.meta_k)  # meta key at every position; each chunk's last
    last = [min(t + 5, 28) for t in range(0, 29, 6)]
    assert_close("out", out, bsbr_reference(q, k, v, r_all[:, :, ::6], h_all[:, :, last], 6))
