"""The helpers that keep non-finite values where they are (bsbr.ops.nonfinite), against loops from the definition."""

from __future__ import annotations

import pytest
import torch

from bsbr.ops.nonfinite import causal_sums, masked_sum, nonfinite_starts, split_nonfinite, window_sums

from conftest import make_attention
from helpers import assert_close

KINDS = torch.tensor([0.0, float("nan"), float("inf"), float("-inf")], dtype=torch.float64)


def sparse_nonfinite(shape, seed: int) -> torch.Tensor:
    """Mostly zeros, with NaN, inf and -inf here and there (what split_nonfinite's second part holds)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, 4, shape, generator=g) * (torch.rand(shape, generator=g) < 0.15)
    return KINDS[pick]


def same_class(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal entries, NaN where the other is NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8, 13, 40])
def test_window_and_causal_sums_equal_the_loop(window):
    bad = sparse_nonfinite((2, 3, 37, 4), seed=window)
    for tq in (37, 10):
        start = 37 - tq
        expect_w = torch.stack([bad[..., max(0, j - window + 1) : j + 1, :].sum(-2) for j in range(start, 37)], -2)
        expect_c = torch.stack([bad[..., : j + 1, :].sum(-2) for j in range(start, 37)], -2)
        assert same_class(window_sums(bad, window, tq), expect_w), f"window {window}, {tq} queries"
        assert same_class(causal_sums(bad, tq), expect_c), f"causal, {tq} queries"


def test_split_nonfinite_parts_add_up():
    v = torch.randn(2, 5, 3, dtype=torch.float64)
    assert split_nonfinite(v)[1] is None and split_nonfinite(v)[0] is v
    v[1, 2, 0], v[0, 4, 2] = float("nan"), float("-inf")
    finite, bad = split_nonfinite(v)
    assert torch.isfinite(finite).all() and same_class(finite + bad, v)
    assert torch.equal(finite[torch.isfinite(v)], v[torch.isfinite(v)]) and torch.all(bad[torch.isfinite(v)] == 0)
    big = torch.full((4,), torch.finfo(torch.float32).max)  # the sum overflows, every entry is finite
    assert split_nonfinite(big)[1] is None


def test_masked_sum_leaves_hidden_keys_out():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 6, 9, dtype=torch.float64, generator=g)
    v = torch.randn(2, 9, 4, dtype=torch.float64, generator=g)
    key, query = torch.arange(9)[None, :], torch.arange(6)[:, None]
    allowed = (key <= query + 2) & (key > query - 2)
    allowed[0] = False  # a query with no key gets zero
    dense = (w * allowed) @ v
    v_bad = v.clone()
    v_bad[:, 8] = float("nan")  # seen by no query
    assert_close("masked_sum", masked_sum(w, v_bad, allowed), dense)
    with pytest.raises(ValueError, match="contiguous"):
        masked_sum(w, v, allowed & (torch.arange(9) != 4))


def test_nonfinite_starts():
    x = torch.zeros(2, 2, 10, 3)
    assert nonfinite_starts(x) == []
    x[0, 1, 7, 2] = float("inf")
    x[0, 1, 9] = float("nan")
    y = torch.zeros(2, 2, 10, 1)
    y[1, 0, 4] = float("nan")
    assert nonfinite_starts(x, y) == [4, 7]


@pytest.mark.parametrize("form", ["reference", "parallel", "pieces"])
def test_sliding_window_nonfinite_stays_in_its_window(form):
    """A NaN at s reaches the outputs s .. s + W - 1 of a sliding-window layer and none after them (one layer)."""
    from test_invariants import run_layer

    attn = make_attention("SlidingWindow")  # window 8
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    clean = run_layer(attn, x, form)
    for s in (11, 20):
        bad = x.clone()
        bad[1, s] = float("nan")
        y = run_layer(attn, bad, form)
        assert_close(f"{form}: outputs after the window of {s}", y[1, s + 8 :], clean[1, s + 8 :])
        assert torch.isnan(y[1, s : s + 8]).all(), f"{form}: NaN at {s} left its window's outputs"
