"""The BSBR models (bsbr.models: BSBRModel, BSBRForCausalLM, ModelConfig): every layer's attention maps, the config
round trip, gradient checkpointing, and a forward of a million tokens (slow)."""

from __future__ import annotations

import pytest
import torch

from bsbr import BSBRForCausalLM, BSBRModel
from bsbr.models import ModelConfig

from conftest import make_lm
from helpers import assert_close


def test_model_attention_weights_shape_and_sparsity():
    model = BSBRModel(vocab_size=50, hidden_dim=32, num_layers=2, num_heads=2, chunk_size=8, ff_dim=64)
    w = model.get_attention_weights(torch.randint(0, 50, (3, 20)))
    assert w.shape == (2, 3, 2, 20, 20)
    sparsity = (w == 0).float().mean().item()
    assert 0.45 < sparsity < 0.6  # the upper triangle (190/400 + diagonal excluded) is exactly zero
    with pytest.raises(NotImplementedError, match="compression"):
        BSBRModel(50, 32, 1, 2, 8, 64, compression_factor=2).get_attention_weights(torch.zeros(1, 5, dtype=torch.long))


def test_config_round_trip_rebuilds_the_same_model():
    lm = BSBRForCausalLM(50, 32, 2, 2, 8, 64, dropout=0.0, compression_factor=4)
    again = type(lm).__mro__[1](ModelConfig.from_dict(lm.config.to_dict()))
    again.load_state_dict(lm.state_dict())
    ids = torch.randint(0, 50, (2, 30))
    assert torch.equal(again(ids).logits, lm.eval()(ids).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    lm = make_lm("BSBR").train()
    ids = torch.randint(0, 50, (2, 40))
    grads = []
    for enable in (False, True):
        lm.zero_grad()
        if enable:
            lm.gradient_checkpointing_enable()
        lm(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    for a, b in zip(*grads, strict=True):
        assert_close("checkpointed grad", b, a)


@pytest.mark.slow
def test_million_token_forward():
    model = BSBRModel(vocab_size=256, hidden_dim=64, num_layers=2, num_heads=2, chunk_size=128, ff_dim=128,
                      dropout=0.0).eval()
    with torch.inference_mode():
        h = model(torch.randint(0, 256, (1, 1_000_000)))
    assert h.shape == (1, 1_000_000, 64) and torch.isfinite(h).all()
