"""The BSBR op (bsbr.ops.bsbr): its chunked parallel form against the token-by-token reference with gradients, the
long-sequence paths, continuing from past states, and non-finite inputs that change no earlier output."""

from __future__ import annotations

import math

import pytest
import torch

from bsbr.ops.bsbr import BSBRPast, bsbr_parallel, bsbr_reference

from helpers import NONFINITE, assert_close


def _op_inputs(B, H, T, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(5)]


def _chunk_meta(r, h, chunk, meta_query="first"):
    T = r.shape[2]
    C = math.ceil(T / chunk)
    starts = torch.arange(C) * chunk
    ends = (starts + chunk - 1).clamp(max=T - 1)
    if meta_query == "first":
        rq = r[:, :, starts]
    else:
        rq = torch.cat([torch.zeros_like(r[:, :, :1]), r[:, :, (starts - 1)[1:]]], dim=2)
    return rq, h[:, :, ends]


@pytest.mark.parametrize("T,chunk", [(1, 4), (7, 8), (8, 8), (9, 8), (63, 8), (100, 16), (130, 7)])
@pytest.mark.parametrize("variant", ["plain", "none_norm", "prev_last", "compressed", "window"])
def test_op_parallel_equals_reference_with_grads(T, chunk, variant):
    B, H, d = 2, 3, 60 if variant != "compressed" else 8
    q, k, v, r, h = _op_inputs(B, H, T, d)
    kw = {"state_norm": "none" if variant == "none_norm" else "mean"}
    if variant == "window":
        kw["window"] = 3
    meta_query = "prev_last" if variant == "prev_last" else "first"
    if variant == "compressed":
        g = torch.Generator().manual_seed(1)
        kw["compress"] = (0.1 * torch.randn(16, d * d, generator=g, dtype=torch.float64)).requires_grad_()
        kw["restore"] = (0.1 * torch.randn(d * d, 16, generator=g, dtype=torch.float64)).requires_grad_()
    leaves = [q, k, v, r, h] + [t for t in (kw.get("compress"), kw.get("restore")) if t is not None]
    ref = bsbr_reference(q, k, v, *_chunk_meta(r, h, chunk, meta_query), chunk, **kw)
    gout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * gout).sum(), leaves, allow_unused=True, materialize_grads=True)
    rq, hk = _chunk_meta(r, h, chunk, meta_query)
    par = bsbr_parallel(q, k, v, rq, hk, chunk, **kw).out
    par_grads = torch.autograd.grad((par * gout).sum(), leaves, allow_unused=True, materialize_grads=True)
    assert_close(f"output T={T} chunk={chunk} {variant}", par, ref)
    for name, a, b in zip(["q", "k", "v", "r", "h", "P", "P'"], par_grads, ref_grads, strict=False):
        assert_close(f"d/d{name} T={T} chunk={chunk} {variant}", a, b, atol=1e-12)


@pytest.mark.parametrize("group_bytes", [None, 1])
def test_op_long_sequence_all_paths(monkeypatch, group_bytes):
    """C >= 64 chunks switches on the triangular row groups; autograd and inference paths both match."""
    import bsbr.ops.bsbr as op

    if group_bytes:  # force one (batch, head) row per group in the autograd path
        monkeypatch.setattr(op, "_GROUP_BYTES", group_bytes)
    q, k, v, r, h = _op_inputs(2, 2, 301, 8)
    rq, hk = _chunk_meta(r, h, 4)
    ref = bsbr_reference(q, k, v, rq, hk, 4)
    with torch.no_grad():
        seg = bsbr_parallel(q, k, v, rq, hk, 4, need_states=True)
    assert_close("inference path", seg.out, ref)
    assert_close("autograd path", bsbr_parallel(q, k, v, rq, hk, 4).out, ref)
    # continuing from 40 past chunks (C0 < C) exercises the grouped mixture with a past
    with torch.no_grad():
        tail = bsbr_parallel(q[:, :, 160:], k[:, :, 160:], v[:, :, 160:], rq[:, :, 40:], hk[:, :, 40:], 4,
                             past=BSBRPast(states=seg.states[:, :, :40], keys=hk[:, :, :40], done=40))
    assert_close("continued inference path", tail.out, ref[:, :, 160:])


def test_op_continues_from_past_states():
    """Splitting a sequence at a chunk boundary and passing the first part's states gives the same outputs."""
    q, k, v, r, h = (t.detach() for t in _op_inputs(1, 2, 77, 16))
    rq, hk = _chunk_meta(r, h, 8)
    whole = bsbr_parallel(q, k, v, rq, hk, 8)
    first = bsbr_parallel(q[:, :, :40], k[:, :, :40], v[:, :, :40], rq[:, :, :5], hk[:, :, :5], 8, need_states=True)
    second = bsbr_parallel(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], rq[:, :, 5:], hk[:, :, 5:], 8,
                           past=BSBRPast(states=first.states, keys=hk[:, :, :5], done=5))
    assert_close("continued segment", torch.cat([first.out, second.out], 2), whole.out)


OP_OPTIONS = {  # multi-head; grouped-query with scaling, gate and sinks; window with compression; local only
    "mha": {}, "gqa": {"scaling": 0.3, "sink": 3, "gate": True}, "window": {"window": 2, "compress": True},
    "none": {"retrieval": "none", "sink": 2}}


def _nonfinite_op_inputs(options, B=2, H=4, Hk=2, T=37, d=8, chunk=8):
    g = torch.Generator().manual_seed(7)
    C = math.ceil(T / chunk)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, T, d, generator=g, dtype=torch.float64) for _ in range(2))
    r, h = torch.randn(B, H, C, d, generator=g, dtype=torch.float64), torch.randn(B, Hk, C, d, generator=g,
                                                                                    dtype=torch.float64)
    kw = dict(options)
    if kw.pop("gate", False):
        kw["gate"] = torch.rand(H, generator=g, dtype=torch.float64)
    if kw.pop("compress", False):
        kw["compress"] = 0.1 * torch.randn(16, d * d, generator=g, dtype=torch.float64)
        kw["restore"] = 0.1 * torch.randn(d * d, 16, generator=g, dtype=torch.float64)
    return (q, k, v, r, h), kw


def _op_form(form, chunk, kw):
    """The op's outputs [B, H, T, d] by one of its forms."""
    def run(q, k, v, r, h):
        if form == "reference":
            return bsbr_reference(q, k, v, r, h, chunk, **kw)
        if form == "autograd":  # the grouped, out-of-place path
            return bsbr_parallel(q.clone().requires_grad_(), k, v, r, h, chunk, **kw).out.detach()
        with torch.no_grad():
            if form == "inference":
                return bsbr_parallel(q, k, v, r, h, chunk, **kw).out
            # a stream in two segments: the second continues an open chunk (13 = 8 + 5) and stored states
            a = bsbr_parallel(q[:, :, :13], k[:, :, :13], v[:, :, :13], r[:, :, :2], h[:, :, :2], chunk,
                              need_states=True, **kw)
            b = bsbr_parallel(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], r[:, :, 1:], h[:, :, 1:], chunk,
                              past=a.past(), **kw)
            return torch.cat([a.out, b.out], dim=2)
    return run


@pytest.mark.parametrize("form", ["reference", "inference", "autograd", "continued"])
@pytest.mark.parametrize("options", list(OP_OPTIONS), ids=str)
def test_op_nonfinite_input_changes_no_earlier_output(form, options):
    """A NaN or inf in q, k or v at position p leaves every output before p exactly as it was (the chunked form's
    dense blocks would otherwise multiply it by the zero weights of earlier positions), and the output at p is not
    finite: the value is not hidden either."""
    (q, k, v, r, h), kw = _nonfinite_op_inputs(OP_OPTIONS[options])
    run = _op_form(form, 8, kw)
    base = run(q, k, v, r, h)
    assert torch.isfinite(base).all()
    for name in ("q", "k", "v"):
        for p in (0, 5, 8, 12, 13, 20, 36):
            for value in NONFINITE:
                inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
                inputs[name][:, :, p] = value
                out = run(inputs["q"], inputs["k"], inputs["v"], r, h)
                assert torch.equal(out[:, :, :p], base[:, :, :p]), f"{form} {options}: {value} in {name} at {p} leaked"
                assert not torch.isfinite(out[:, :, p]).all(), f"{form} {options}: {value} in {name} at {p} vanished"
