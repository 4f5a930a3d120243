"""Shared fixtures: small settings per mechanism so every invariant test crosses chunk/window boundaries."""

from __future__ import annotations

import pytest
import torch

from bsbr.models import build_model, list_models
from bsbr.models.registry import attention_class

# Options that make each mechanism's structure visible at test lengths (T ~ 10..70).
SMALL_OPTIONS: dict[str, dict] = {
    "BSBR": {"chunk_size": 8},
    "Standard": {},
    "Linear": {"chunk_size": 8},
    "SlidingWindow": {"window_size": 8},
    "DeltaNet": {"chunk_size": 8},
    "Hopfield": {"update_steps": 2},
    "GAU": {"group_size": 8, "qk_dim": 16, "expansion_dim": 48},
    # 2 of up to 7 earlier chunks selected, 3 sink tokens, the straight-through selection gradient
    "BSBRBlocks": {"chunk_size": 8, "top_k": 2, "sink_tokens": 3, "selection_grad": "straight_through"},
}


def small_options(name: str) -> dict:
    return dict(SMALL_OPTIONS.get(name, {}))


def make_attention(name: str, hidden_dim: int = 32, num_heads: int = 2, dtype=torch.float64, **extra):
    torch.manual_seed(0)
    cls = attention_class(name)
    attn = cls(hidden_dim, num_heads, dropout=0.0, **{**small_options(name), **extra})
    _perturb(attn)
    return attn.to(dtype).eval()


def make_lm(name: str, vocab_size: int = 50, hidden_dim: int = 32, num_layers: int = 2, num_heads: int = 2,
            dtype=torch.float64, **extra):
    torch.manual_seed(0)
    lm = build_model(name, vocab_size=vocab_size, hidden_dim=hidden_dim, num_layers=num_layers,
                     num_heads=num_heads, ff_dim=2 * hidden_dim, dropout=0.0, causal_lm=True,
                     **{**small_options(name), **extra})
    _perturb(lm)
    return lm.to(dtype).eval()


def _perturb(module: torch.nn.Module) -> None:
    """Randomise every parameter (zero-initialised gates or biases would hide bugs)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture(params=list_models())
def model_name(request) -> str:
    return request.param
